import torch
from torch import nn

from lmlab.config import OptimConfig
from lmlab.train.optim import build_optimizer, param_groups


class Toy(nn.Module):
    def __init__(self, tie=True):
        super().__init__()
        self.tok_embeddings = nn.Embedding(10, 4)
        self.proj = nn.Linear(4, 4, bias=True)
        self.norm = nn.LayerNorm(4)
        self.lm_head = nn.Linear(4, 10, bias=False)
        if tie:
            self.lm_head.weight = self.tok_embeddings.weight


def ids(params):
    return {id(p) for p in params}


def test_decay_only_matrices_not_embeddings_norms_biases():
    m = Toy(tie=False)
    decay, no_decay = param_groups(m, OptimConfig(weight_decay=0.1))
    assert ids(decay["params"]) == {id(m.proj.weight), id(m.lm_head.weight)}
    assert ids(no_decay["params"]) == {id(m.tok_embeddings.weight), id(m.proj.bias), id(m.norm.weight), id(m.norm.bias)}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0


def test_tied_weight_counted_once_and_not_decayed():
    m = Toy(tie=True)
    groups = param_groups(m, OptimConfig())
    all_ids = [id(p) for g in groups for p in g["params"]]
    assert len(all_ids) == len(set(all_ids))
    assert id(m.tok_embeddings.weight) in ids(groups[1]["params"])


def test_decay_embeddings_option():
    m = Toy(tie=False)
    decay, _ = param_groups(m, OptimConfig(decay_embeddings=True))
    assert id(m.tok_embeddings.weight) in ids(decay["params"])


def test_build_optimizer_cpu_not_fused():
    opt = build_optimizer(Toy(), OptimConfig(lr=0.5), torch.device("cpu"))
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.param_groups[0]["lr"] == 0.5
    assert not opt.defaults.get("fused")
