"""The optimizer of a run: AdamW, or Muon for the hidden matrices with AdamW for the rest.

AdamW's parameter groups decay matrices only: norm gains, biases and embeddings are not decayed by
default (as in GPT-2/Llama recipes); an untied output head is a matrix and is decayed. With
``optim.name: muon`` the 2-D weights inside the transformer blocks (attention and FFN projections)
go to Muon (``lmlab.train.muon``); the embedding, the output head and any other head stay on AdamW,
as Muon's authors prescribe.

Under μP (``model.parametrization: mup``; lmlab.models.mup, docs/science.md §25) the hidden matrices form their
own AdamW group at LR η/m_d, with weight decay λ·m_d so that the decay per step, LR × λ, stays η·λ at every width
(without it wider models would decay less), and with ``model.mup.scale_eps`` Adam's ε/m_d (their gradients
shrink as 1/m_d); the embedding, head, gains and biases keep η and ε.
"""

from __future__ import annotations

import torch
from torch import nn

from lmlab.config import OptimConfig
from lmlab.train.muon import MuonWithAdamW


def hidden_matrices(model: nn.Module) -> list[nn.Parameter]:
    """The 2-D weights inside the model's transformer blocks (every ``layers`` module list), in order."""
    found: dict[int, nn.Parameter] = {}
    for module in model.modules():
        blocks = getattr(module, "layers", None)
        if isinstance(blocks, nn.ModuleList):
            for p in blocks.parameters():
                if p.ndim == 2 and p.requires_grad:
                    found.setdefault(id(p), p)
    return list(found.values())


def param_groups(
    model: nn.Module,
    cfg: OptimConfig,
    exclude: set[int] = frozenset(),
    width_mult: float | None = None,
    scale_eps: bool = False,
) -> list[dict]:
    """Split parameters (other than ``exclude``, by id) into AdamW's decayed and non-decayed groups; with μP's
    ``width_mult`` m_d, the hidden matrices first, in a group at LR η/m_d (``lr_scale``) and decay λ·m_d (and
    ε/m_d with ``scale_eps``)."""
    embedding_params = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    mup_groups = []
    if width_mult is not None:
        hidden = [p for p in hidden_matrices(model) if id(p) not in exclude]
        scale = 1.0 / width_mult
        group = {
            "params": hidden,
            "lr": cfg.lr * scale,
            "lr_scale": scale,
            "weight_decay": cfg.weight_decay * width_mult,
        }
        if scale_eps:
            group["eps"] = cfg.eps * scale
        mup_groups = [group]
        exclude = set(exclude) | {id(p) for p in hidden}
    decay, no_decay = [], []
    seen: set[int] = set(exclude)
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        is_embedding = id(p) in embedding_params
        if p.ndim >= 2 and (not is_embedding or cfg.decay_embeddings):
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [*mup_groups, {"params": decay, "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(
    model: nn.Module,
    cfg: OptimConfig,
    device: torch.device,
    width_mult: float | None = None,
    scale_eps: bool = False,
) -> torch.optim.Optimizer:
    """AdamW (fused on CUDA when ``cfg.fused`` is None or True), or Muon + AdamW for ``cfg.name == "muon"``.
    ``width_mult``: μP's m_d (``lmlab.models.mup.mup_width_mult``; None: the standard parametrization);
    ``scale_eps``: ``model.mup.scale_eps`` (ε/m_d on the hidden matrices).

    Every group may carry ``lr_scale``: the trainer sets ``lr = schedule(step) · lr_scale`` (Muon's own
    peak LR, ``optim.muon.lr``, is a scale on ``optim.lr``; μP's hidden matrices run at 1/m_d).
    """
    if cfg.name == "muon":
        if width_mult is not None:
            raise ValueError(
                "μP's per-layer learning rates are AdamW's; Muon has no μP rule (config validation refuses it)"
            )
        return build_muon(model, cfg, device)
    fused = cfg.fused if cfg.fused is not None else device.type == "cuda"
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if fused:
        kwargs["fused"] = True
    groups = param_groups(model, cfg, width_mult=width_mult, scale_eps=scale_eps)
    return torch.optim.AdamW([g for g in groups if g["params"]] if width_mult is not None else groups, **kwargs)


def build_muon(model: nn.Module, cfg: OptimConfig, device: torch.device) -> MuonWithAdamW:
    """Muon (or NorMuon) on ``hidden_matrices(model)``, AdamW with ``param_groups`` on the rest.

    Newton–Schulz runs in bfloat16 on GPUs and in float32 on CPUs (``optim.muon.ns_dtype: auto``), where
    bfloat16 matrix products are emulated unless the CPU has AMX/AVX512-BF16.
    """
    m = cfg.muon
    ns = m.ns_dtype if m.ns_dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    hidden = hidden_matrices(model)
    if not hidden:
        raise ValueError("optim.name=muon found no 2-D weights inside transformer blocks to orthogonalise")
    muon_lr = cfg.lr if m.lr is None else m.lr
    muon_group = {
        "params": hidden,
        "use_muon": True,
        "weight_decay": cfg.weight_decay if m.weight_decay is None else m.weight_decay,
        "lr_scale": muon_lr / cfg.lr if cfg.lr > 0 else 1.0,
    }
    groups = [muon_group, *param_groups(model, cfg, exclude={id(p) for p in hidden})]
    return MuonWithAdamW(
        [g for g in groups if g["params"]],
        lr=cfg.lr,
        betas=tuple(cfg.betas),
        eps=cfg.eps,
        momentum=m.momentum,
        nesterov=m.nesterov,
        ns_steps=m.ns_steps,
        adjust_lr=m.adjust_lr,
        normuon=m.normuon,
        normuon_beta2=m.normuon_beta2,
        ns_dtype=torch.bfloat16 if ns == "bf16" else torch.float32,
    )
