import torch

from lmlab.config import GoldfishConfig, ObjectiveConfig
from lmlab.models.decoder import Decoder
from lmlab.objectives.lm import causal_lm_loss
from lmlab.objectives.lm_objective import attach_objective_hooks, build_lm_loss
from lmlab.recipes.pretrain import run_pretraining
from lmlab.train.metrics import read_metrics

from helpers import tiny_config


def batch(vocab=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, vocab, (2, 40), generator=g)
    return {"input_ids": x, "labels": torch.roll(x, -1, 1)}


def model():
    torch.manual_seed(0)
    return Decoder(tiny_config("model.vocab_size=64").model)


def test_default_objective_is_plain_cross_entropy():
    m, b = model(), batch()
    out = build_lm_loss(ObjectiveConfig())(m, b)
    ref = causal_lm_loss(m(b["input_ids"]), b["labels"])
    assert torch.equal(out.loss_sum, ref.loss_sum) and int(out.count) == 80


def test_goldfish_drops_about_a_quarter_and_counts_kept_tokens():
    m, b = model(), batch()
    obj = ObjectiveConfig(goldfish=GoldfishConfig(enabled=True, k=4, strategy="static"))
    out = build_lm_loss(obj)(m, b)
    assert int(out.count) == 80 - 2 * 10  # static k=4 drops positions 0,4,...,36 in each row
    assert float(out.metrics["goldfish_dropped"]) == 20


def test_z_loss_metric_logged_in_a_run(tmp_path):
    run_pretraining(tiny_config("objective.z_loss=1e-4", "train.steps=2"), tmp_path / "z", quiet=True)
    rec = [r for r in read_metrics(tmp_path / "z") if r["kind"] == "train"][0]
    assert rec["z_loss"] > 0


def test_neftune_hook_only_in_training():
    m, b = model(), batch()
    attach_objective_hooks(m, ObjectiveConfig(neftune_alpha=5.0))
    m.eval()
    with torch.no_grad():
        clean = model()(b["input_ids"])
        assert torch.equal(m(b["input_ids"]), clean)
        m.train()
        assert not torch.equal(m(b["input_ids"]), clean)
