"""FlexAttention on CUDA (issue 14 item 2): packed documents, sliding windows and S2 shards as block masks give
the dense-mask SDPA values and gradients (the CPU tests cover the forward only: PyTorch has no CPU backward)."""

from __future__ import annotations

import pytest
import torch

from lmlab.models.decoder import Decoder

from helpers import model_cfg

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

ATTENTIONS = [
    {"kind": "gqa"},
    {"kind": "sliding", "window": 100},
    {"kind": "s2", "block_size": 16, "local_blocks": 2, "vert_stride": 2, "dense_every": 2},
]


@pytest.mark.parametrize("attention", ATTENTIONS, ids=["dense", "sliding", "s2"])
@pytest.mark.parametrize("packed", [False, True], ids=["rows", "documents"])
def test_flex_training_forward_and_backward_equal_sdpa(attention, packed):
    torch.manual_seed(0)
    cfg = model_cfg(vocab_size=128, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=512,
                    attention=attention, attention_backend="sdpa")  # fmt: skip
    sdpa = Decoder(cfg).cuda()
    flex = Decoder(model_cfg(cfg, attention_backend="flex")).cuda()
    flex.load_state_dict(sdpa.state_dict())
    x = torch.randint(0, 128, (2, 384), device="cuda")
    doc_ids = (torch.arange(384, device="cuda") // 100).expand(2, 384).contiguous() if packed else None
    losses = [m(x, doc_ids=doc_ids).float().logsumexp(-1).mean() for m in (sdpa, flex)]
    torch.testing.assert_close(losses[1], losses[0], atol=1e-4, rtol=1e-4)
    for loss in losses:
        loss.backward()
    for (name, a), b in zip(sdpa.named_parameters(), flex.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-4, rtol=1e-3, msg=name)
