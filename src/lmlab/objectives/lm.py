"""Causal language-modelling cross-entropy (next-token prediction), with its usual add-ons.

Labels are the inputs shifted by one; positions whose label is ``ignore_index`` (or that an
extra ``loss_mask`` turns off, e.g. the goldfish mask of docs/science.md §5) do not count. Options:
label smoothing, the PaLM z-loss (docs/science.md §10) and a chunked evaluation that bounds the
float32 memory used for large vocabularies. Returns sums and counts (``LossOutput``) so gradient
accumulation normalises by the number of target tokens across all micro-batches.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lmlab.objectives.base import LossOutput

IGNORE_INDEX = -100


def check_loss_options(label_smoothing: float, z_loss: float) -> None:
    """The token-loss switches every implementation shares: 0 <= ε < 1, c_z >= 0."""
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if z_loss < 0.0:
        raise ValueError(f"z_loss must be >= 0, got {z_loss}")


def counted_tokens(labels: torch.Tensor, ignore_index: int, loss_mask: torch.Tensor | None) -> torch.Tensor:
    """Flat bool [N]: the tokens of ``labels`` (any shape) that count, i.e. not ``ignore_index`` and, when given,
    kept by ``loss_mask`` (bool, labels' shape)."""
    valid = labels.reshape(-1) != ignore_index
    if loss_mask is None:
        return valid
    if loss_mask.shape != labels.shape:
        raise ValueError(f"loss_mask {tuple(loss_mask.shape)} must have the shape of labels {tuple(labels.shape)}")
    return valid & loss_mask.reshape(-1).to(torch.bool)


def token_loss_output(
    loss_sum: torch.Tensor, sums: torch.Tensor, valid: torch.Tensor, label_smoothing: float, z_loss: float
) -> LossOutput:
    """The ``LossOutput`` of a token loss from its [ce, smoothed, z] ``sums`` (metrics detached: ``ce`` always,
    ``smoothed`` when ε > 0, ``z_loss`` when c_z > 0) and the counted-token mask ``valid``."""
    ce, smoothed, z_term = sums.detach().unbind(0)
    metrics = {"ce": ce}
    if label_smoothing > 0.0:
        metrics["smoothed"] = smoothed
    if z_loss > 0.0:
        metrics["z_loss"] = z_term
    return LossOutput(loss_sum=loss_sum, count=valid.sum(), metrics=metrics)


def _token_loss_sums(
    logits: torch.Tensor,
    labels: torch.Tensor,
    valid: torch.Tensor,
    label_smoothing: float,
    z_loss: float,
) -> torch.Tensor:
    """Sums over tokens of [ce, smoothed, z_loss] for flat ``logits`` [N, V], ``labels`` [N], ``valid`` [N].

    Per token, with log Z = logsumexp(logits) (computed in float32):
    ``ce = log Z − logit[y]``; ``smoothed = (1 − ε)·ce + ε·(log Z − mean_v logit_v)`` (the
    label-smoothed cross-entropy, identical to ``F.cross_entropy(label_smoothing=ε)``);
    ``z = coeff·(log Z)²``.
    """
    x = logits.float()  # [N, V]
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    targets = torch.where(valid, labels, torch.full_like(labels, IGNORE_INDEX))  # [N]
    ce = F.cross_entropy(x, targets, ignore_index=IGNORE_INDEX, reduction="sum")  # fused; no [N, V] temporaries
    if label_smoothing > 0.0 or z_loss > 0.0:
        log_z = torch.logsumexp(x, dim=-1)  # [N]
    if label_smoothing > 0.0:
        uniform_ce = torch.where(valid, log_z - x.mean(dim=-1), zero).sum()
        smoothed = (1.0 - label_smoothing) * ce + label_smoothing * uniform_ce
    else:
        smoothed = ce
    z_term = z_loss * torch.where(valid, log_z.square(), zero).sum() if z_loss > 0.0 else zero
    return torch.stack([ce, smoothed, z_term])


def causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    loss_mask: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> LossOutput:
    """Summed token cross-entropy of ``logits`` [B, T, V] against ``labels`` [B, T].

    ``labels[b, t]`` is the target for position t (already shifted by the data loader). A token
    counts iff ``labels != ignore_index`` and, when given, ``loss_mask`` (bool [B, T]) is True;
    ``count`` is the number of such tokens, so ``loss_sum / count`` is the mean over kept tokens
    (the goldfish objective of docs/science.md §5, ``−(1/|G|) Σ G_i log P(x_i | x_<i)``).

    Per counted token the loss is

        (1 − ε)·CE + ε·CE_uniform + c_z·(log Z)²,      log Z = logsumexp(logits)

    where ε = ``label_smoothing`` (Szegedy et al. 2016; ``CE_uniform`` is the cross-entropy against
    the uniform distribution, as in ``torch.nn.functional.cross_entropy``) and c_z = ``z_loss``,
    the PaLM z-loss coefficient (Chowdhery et al. 2022, "Loss function"; docs/science.md §10: 1e-4).

    Metrics are sums over counted tokens, like ``loss_sum``: ``ce`` (plain cross-entropy, so
    perplexity stays interpretable), ``smoothed`` (the label-smoothed CE, only when ε > 0) and
    ``z_loss`` (the weighted z-loss term c_z·Σ(log Z)², only when c_z > 0). ``loss_sum`` equals
    ``smoothed + z_loss``.

    ``chunk_size`` (tokens) evaluates the loss over chunks of the flattened [B·T] tokens; under
    autograd each chunk is recomputed in the backward pass (activation checkpointing), so the
    float32 copies of the logits are only ever held for one chunk. Results equal the unchunked
    loss up to floating-point summation order. To avoid materialising the [B, T, V] logits at
    all, use ``chunked_causal_lm_loss`` on the final hidden states.
    """
    check_loss_options(label_smoothing, z_loss)
    if chunk_size is not None and chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size}")
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree on [B, T]")

    vocab = logits.size(-1)
    flat_logits = logits.reshape(-1, vocab)  # [B*T, V]
    flat_labels = labels.reshape(-1)  # [B*T]
    valid = counted_tokens(labels, ignore_index, loss_mask)  # [B*T]

    n_tokens = flat_labels.numel()
    if chunk_size is None or chunk_size >= n_tokens:
        sums = _token_loss_sums(flat_logits, flat_labels, valid, label_smoothing, z_loss)
    else:
        sums = torch.zeros(3, dtype=torch.float32, device=logits.device)
        use_checkpoint = torch.is_grad_enabled() and flat_logits.requires_grad
        for start in range(0, n_tokens, chunk_size):
            end = min(start + chunk_size, n_tokens)
            args = (flat_logits[start:end], flat_labels[start:end], valid[start:end], label_smoothing, z_loss)
            if use_checkpoint:
                sums = sums + checkpoint(_token_loss_sums, *args, use_reentrant=False)
            else:
                sums = sums + _token_loss_sums(*args)

    return token_loss_output(sums[1] + sums[2], sums, valid, label_smoothing, z_loss)  # smoothed + z


def chunked_causal_lm_loss(
    hidden: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    labels: torch.Tensor,
    *,
    chunk_size: int,
    ignore_index: int = IGNORE_INDEX,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    loss_mask: torch.Tensor | None = None,
) -> LossOutput:
    """``causal_lm_loss(head(hidden), labels, ...)`` without ever holding the full [B, T, V] logits.

    ``hidden`` [B, T, d] are the final-normed hidden states (``Decoder.forward_hidden``) and
    ``head`` maps [N, d] to logits [N, V] (``Decoder.output``). The flattened B·T tokens are
    processed ``chunk_size`` at a time; under autograd each chunk's logits are recomputed in the
    backward pass (activation checkpointing), so peak memory holds one chunk's logits instead of
    all of them: the difference that matters for large vocabularies. Same value, metrics and
    gradients as the unchunked loss, up to floating-point summation order.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size}")
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} disagree on [B, T]")
    if loss_mask is not None and loss_mask.shape != labels.shape:
        raise ValueError(f"loss_mask {tuple(loss_mask.shape)} must have the shape of labels {tuple(labels.shape)}")
    flat_hidden = hidden.reshape(-1, hidden.size(-1))  # [B*T, d]
    flat_labels = labels.reshape(-1)  # [B*T]
    flat_mask = None if loss_mask is None else loss_mask.reshape(-1)  # [B*T]
    options = {"ignore_index": ignore_index, "label_smoothing": label_smoothing, "z_loss": z_loss}

    def chunk_sums(chunk_hidden: torch.Tensor, chunk_labels: torch.Tensor, chunk_mask: torch.Tensor | None):
        logits = head(chunk_hidden)  # [n, V]
        out = causal_lm_loss(logits, chunk_labels, loss_mask=chunk_mask, **options)
        return out.loss_sum, out.count, out.metrics

    use_checkpoint = torch.is_grad_enabled()
    loss_sum: torch.Tensor | None = None
    count: torch.Tensor | None = None
    metrics: dict[str, torch.Tensor] = {}
    for start in range(0, flat_labels.numel(), chunk_size):
        end = start + chunk_size
        args = (flat_hidden[start:end], flat_labels[start:end], None if flat_mask is None else flat_mask[start:end])
        if use_checkpoint:
            part_loss, part_count, part_metrics = checkpoint(chunk_sums, *args, use_reentrant=False)
        else:
            part_loss, part_count, part_metrics = chunk_sums(*args)
        loss_sum = part_loss if loss_sum is None else loss_sum + part_loss
        count = part_count if count is None else count + part_count
        for name, value in part_metrics.items():
            metrics[name] = value if name not in metrics else metrics[name] + value
    if loss_sum is None or count is None:
        raise ValueError("chunked_causal_lm_loss needs at least one token")
    return LossOutput(loss_sum=loss_sum, count=count, metrics=metrics)
