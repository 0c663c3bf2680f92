"""ULD's logit-difference model (lmlab.models.contrast): the formula, and decoding through paired KV caches."""

from __future__ import annotations

import torch

from lmlab.models.contrast import LogitDifference, uld_logits
from lmlab.models.decoder import Decoder
from lmlab.models.generation import generate
from lmlab.models.lora import AdapterConfig, adapters_disabled, apply_adapters

from helpers import model_cfg


def adapter_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = Decoder(model_cfg(vocab_size=50, d_model=32, n_layers=2, n_heads=2, max_seq_len=64))
    apply_adapters(model, AdapterConfig(kind="lora", rank=4, alpha=8))
    with torch.no_grad():  # a trained-looking assistant: the adapters' B matrices are not zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return model.eval()


def test_forward_is_the_target_minus_the_assistant():
    model = adapter_model()
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        with adapters_disabled(model):
            target = model(ids)
        assistant = model(ids)
        out = LogitDifference(model, alpha=0.8, rho=0.1)(ids)
    assert torch.allclose(out, uld_logits(target, assistant, alpha=0.8, rho=0.1))
    assert not torch.allclose(out, target)


def test_greedy_decoding_with_paired_caches_matches_full_forwards():
    model = LogitDifference(adapter_model(), alpha=0.8, rho=0.1)
    prompt = [3, 7, 11, 2]
    new = generate(model, prompt, max_new_tokens=6, temperature=0.0)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(6):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert new == ids[len(prompt) :]
