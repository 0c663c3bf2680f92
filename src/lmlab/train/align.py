"""``lmlab align``: preference optimisation (DPO, IPO, SimPO, LN-DPO, ORPO) from an lmlab run.

The policy starts from ``init_from`` (an lmlab run directory, e.g. an SFT run or an imported HF
model); the reference is the same weights (or ``--reference RUN_DIR``) frozen in eval mode. Methods
that need a reference (DPO, IPO, LN-DPO) score each batch with it under ``no_grad``, once per batch;
with ``align.precompute_reference`` its log-probs are computed in one pass before training and cached
next to the data in the run directory (``reference_logps.pt``, keyed by the data files' SHA-256), so
training holds one model. The losses are the pure functions of ``lmlab.objectives.preference``
(SCIENCE.md §7, parity-tested against TRL, §7.1); the shared ``Trainer`` runs the updates.

Logged per step (means over pairs): ``loss``, ``rewards/{chosen,rejected,margins,accuracies}``,
``logps/{chosen,rejected}`` (policy), ``ref_logps/{chosen,rejected}``, ``length/{chosen,rejected}``
(completion tokens). Every ``align.diagnostics_every`` steps a ``kind: "diagnostic"`` record holds the
gradient-entanglement probe (Yuan et al., "A common pitfall of margin-based language model alignment:
gradient entanglement", PAPERS.md D02): on a fixed probe batch of held-out pairs, the cosine between
∇θ Σ log πθ(y_w|x) and ∇θ Σ log πθ(y_l|x), their norms, and the probe's chosen/rejected log-probs and
margin. A large cosine relative to the norms is the regime where a growing margin can lower the chosen
log-prob. Evaluation reports held-out preference accuracy; at the end, answers sampled at temperature 1
from held-out prompts go to ``samples.jsonl`` with their policy and reference log-probs, and their mean
difference is the Monte-Carlo estimate of KL(πθ ‖ πref) written to ``summary.json``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmlab.config import AlignConfig, RunConfig, save_config
from lmlab.data.preference import (
    PreferenceBatches,
    PreferenceData,
    collate_pairs,
    iterate_batches,
    load_preference_file,
    pad_id_of,
)
from lmlab.errors import CheckpointError, ConfigError, DataError
from lmlab.objectives.base import LossOutput
from lmlab.objectives.preference import (
    PreferenceLoss,
    dpo_loss,
    ipo_loss,
    ln_dpo_loss,
    orpo_loss,
    preference_objective,
    sft_term,
    simpo_loss,
)
from lmlab.train.commands import resolve_run, run_parser
from lmlab.train.loop import Trainer, fit_logged
from lmlab.train.metrics import MetricsLogger

REFERENCE_FREE = ("simpo", "orpo")
REF_CACHE = "reference_logps.pt"
PROBE_PAIRS = 8


# --------------------------------------------------------------------------- log-probs


def completion_logps(
    model: nn.Module, input_ids: torch.Tensor, completion_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of the completion tokens of each row [N] and their counts [N].

    Token j is scored by the logits at position j−1 (``log softmax`` in fp32, as TRL's
    ``selective_log_softmax``); non-completion positions contribute zero.
    """
    logits = model(input_ids)[:, :-1].float()
    targets = input_ids[:, 1:]
    mask = completion_mask[:, 1:].to(logits.dtype)
    token_logps = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return (token_logps * mask).sum(-1), mask.sum(-1)


def pair_logps(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """``(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths)`` of a pair batch, each [B]."""
    logps, lengths = completion_logps(model, batch["input_ids"], batch["completion_mask"])
    b = batch["pair_index"].numel()
    return logps[:b], logps[b:], lengths[:b], lengths[b:]


# --------------------------------------------------------------------------- loss


def check_align_config(cfg: RunConfig) -> None:
    """Cross-field checks of ``align`` that ``lmlab.config.validate`` leaves to this command."""
    a = cfg.align
    if a.beta <= 0:
        raise ConfigError(f"align.beta={a.beta} must be > 0")
    if not 0.0 <= a.label_smoothing < 0.5:
        raise ConfigError(f"align.label_smoothing={a.label_smoothing} must be in [0, 0.5)")
    if a.sft_weight < 0:
        raise ConfigError(f"align.sft_weight={a.sft_weight} must be >= 0")
    if a.orpo_lambda < 0:
        raise ConfigError(f"align.orpo_lambda={a.orpo_lambda} must be >= 0")
    if a.diagnostics_every < 0:
        raise ConfigError(f"align.diagnostics_every={a.diagnostics_every} must be >= 0 (0 disables the probe)")
    if a.max_prompt_len <= 0 or a.max_len <= a.max_prompt_len:
        raise ConfigError(f"align.max_prompt_len={a.max_prompt_len} must be > 0 and below align.max_len={a.max_len}")
    if a.max_len > cfg.model.max_seq_len:
        raise ConfigError(f"align.max_len={a.max_len} exceeds the model's max_seq_len={cfg.model.max_seq_len}")
    if not a.train_file:
        raise ConfigError("align.train_file is required (a preference JSONL with prompt, chosen, rejected)")


def preference_losses(
    a: AlignConfig,
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    ref_chosen: torch.Tensor | None,
    ref_rejected: torch.Tensor | None,
    chosen_len: torch.Tensor,
    rejected_len: torch.Tensor,
) -> PreferenceLoss:
    """Dispatch to the ``align.loss`` function of ``lmlab.objectives.preference`` and add the SFT term."""
    if a.loss == "dpo":
        out = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=a.beta, label_smoothing=a.label_smoothing)
    elif a.loss == "ipo":
        out = ipo_loss(chosen, rejected, ref_chosen, ref_rejected, chosen_len, rejected_len, beta=a.beta)
    elif a.loss == "ln_dpo":
        out = ln_dpo_loss(chosen, rejected, ref_chosen, ref_rejected, chosen_len, rejected_len, beta=a.beta)
    elif a.loss == "simpo":
        out = simpo_loss(
            chosen, rejected, chosen_len, rejected_len, beta=a.beta, gamma=a.gamma, label_smoothing=a.label_smoothing
        )
    else:
        out = orpo_loss(chosen, rejected, chosen_len, rejected_len, lam=a.orpo_lambda)
    if a.sft_weight > 0:
        sft = sft_term(chosen, chosen_len, weight=a.sft_weight)
        out.losses = out.losses + sft
        out.metrics = {**out.metrics, "sft": sft.detach()}
    return out


def build_align_loss(a: AlignConfig, reference: nn.Module | None):
    """``loss_fn(model, batch) -> LossOutput`` for the loop; the reference runs under ``no_grad``, once."""
    needs_ref = a.loss not in REFERENCE_FREE

    def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
        chosen, rejected, chosen_len, rejected_len = pair_logps(model, batch)
        ref_chosen = batch.get("ref_chosen_logps")
        ref_rejected = batch.get("ref_rejected_logps")
        if ref_chosen is None and reference is not None:
            with torch.no_grad():
                ref_chosen, ref_rejected, _, _ = pair_logps(reference, batch)
        if needs_ref and ref_chosen is None:
            raise RuntimeError(f"align.loss={a.loss} needs reference log-probs")  # a bug: run_align provides them
        result = preference_losses(a, chosen, rejected, ref_chosen, ref_rejected, chosen_len, rejected_len)
        out = preference_objective(result)
        out.metrics.update(
            {
                "logps/chosen": chosen.detach().sum(),
                "logps/rejected": rejected.detach().sum(),
                "length/chosen": chosen_len.sum(),
                "length/rejected": rejected_len.sum(),
            }
        )
        if ref_chosen is not None:
            out.metrics["ref_logps/chosen"] = ref_chosen.detach().sum()
            out.metrics["ref_logps/rejected"] = ref_rejected.detach().sum()
        return out

    return loss_fn


# --------------------------------------------------------------------------- reference


@torch.no_grad()
def reference_table(reference: nn.Module, data: PreferenceData, pad_id: int, batch_size: int, device) -> torch.Tensor:
    """[N, 2] summed reference log-probs of every pair's chosen and rejected completion (one pass)."""
    reference.eval()
    table = torch.zeros(len(data), 2, dtype=torch.float32)
    for batch in iterate_batches(data, pad_id, batch_size):
        batch = {k: v.to(device) for k, v in batch.items()}
        chosen, rejected, _, _ = pair_logps(reference, batch)
        table[batch["pair_index"].cpu(), 0] = chosen.float().cpu()
        table[batch["pair_index"].cpu(), 1] = rejected.float().cpu()
    return table


def cached_reference(
    run_dir: Path,
    reference_path: str,
    splits: dict[str, PreferenceData],
    load_reference,
    pad_id: int,
    batch_size: int,
    device,
) -> dict[str, torch.Tensor]:
    """Reference log-probs per split, read from ``run_dir/reference_logps.pt`` when it matches the data.

    The cache is keyed by each data file's SHA-256, the pairs' count and the reference's path; anything
    else recomputes (loading the reference once for all splits) and rewrites the cache.
    """
    path = run_dir / REF_CACHE
    key = {name: [d.sha256, len(d)] for name, d in splits.items()}
    if path.is_file():
        cache = torch.load(path, map_location="cpu", weights_only=True)
        if cache.get("key") == key and cache.get("reference") == str(reference_path):
            return cache["tables"]
    reference = load_reference()
    tables = {name: reference_table(reference, d, pad_id, batch_size, device) for name, d in splits.items()}
    del reference
    torch.save({"key": key, "reference": str(reference_path), "tables": tables}, path)
    return tables


def load_reference_model(path: str | Path, tokenizer, device) -> nn.Module:
    """Load a frozen reference; refuse one whose tokenizer differs from the policy's (DataError)."""
    from lmlab.train.checkpoint import load_model

    model, _, ref_tok = load_model(path, device)
    if ref_tok is None:
        raise CheckpointError(f"{path}: the reference run has no tokenizer.json, so its vocabulary cannot be checked")
    if ref_tok.hash != tokenizer.hash:
        raise DataError(
            f"reference model {path} uses another tokenizer than the policy (vocabulary {ref_tok.vocab_size}, "
            f"hash {ref_tok.hash[:12]} vs {tokenizer.vocab_size}, {tokenizer.hash[:12]}); "
            "log-prob ratios need the same tokenization"
        )
    model.requires_grad_(False)
    return model.eval()


# --------------------------------------------------------------------------- diagnostics


def entanglement_probe(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """Gradient entanglement on a probe batch (PAPERS.md D02).

    g_w = ∇θ Σ_i log πθ(y_w,i|x_i) and g_l = ∇θ Σ_i log πθ(y_l,i|x_i) over the probe pairs; returns
    ``grad_cos`` = ⟨g_w, g_l⟩/(‖g_w‖‖g_l‖), ``grad_dot``, ``grad_norm_chosen``, ``grad_norm_rejected``
    and the probe's mean ``probe_logps/chosen``, ``probe_logps/rejected`` and ``probe_margin`` (their
    difference). Uses ``torch.autograd.grad``, so the parameters' ``.grad`` buffers are untouched.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    chosen, rejected, _, _ = pair_logps(model, batch)
    g_w = torch.autograd.grad(chosen.sum(), params, retain_graph=True, allow_unused=True)
    g_l = torch.autograd.grad(rejected.sum(), params, allow_unused=True)
    dot = norm_w = norm_l = 0.0
    for a, b in zip(g_w, g_l):
        if a is None or b is None:
            continue
        a, b = a.double(), b.double()
        dot += float((a * b).sum())
        norm_w += float((a * a).sum())
        norm_l += float((b * b).sum())
    norm_w, norm_l = math.sqrt(norm_w), math.sqrt(norm_l)
    n = chosen.numel()
    return {
        "grad_cos": dot / max(norm_w * norm_l, 1e-30),
        "grad_dot": dot,
        "grad_norm_chosen": norm_w,
        "grad_norm_rejected": norm_l,
        "probe_logps/chosen": float(chosen.detach().sum()) / n,
        "probe_logps/rejected": float(rejected.detach().sum()) / n,
        "probe_margin": float((chosen - rejected).detach().sum()) / n,
    }


class AlignTrainer(Trainer):
    """The shared loop plus the gradient-entanglement probe every ``align.diagnostics_every`` steps."""

    def __init__(self, *args: Any, probe: dict[str, torch.Tensor] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.probe = probe
        self._logger: MetricsLogger | None = None

    def fit(self, logger: MetricsLogger | None = None):
        self._logger = logger
        return super().fit(logger)

    def train_step(self, sync: bool = True) -> dict[str, Any]:
        every = self.cfg.align.diagnostics_every
        if self.probe is not None and every > 0 and self.step == 0:
            self._emit(self._logger, {"kind": "diagnostic", "step": 0, **entanglement_probe(self.model, self.probe)})
        metrics = super().train_step(sync=sync)
        if self.probe is not None and every > 0 and (self.step % every == 0 or self.step == self.cfg.train.steps):
            record = {"kind": "diagnostic", "step": self.step, **entanglement_probe(self.model, self.probe)}
            self._emit(self._logger, record)
        return metrics


# --------------------------------------------------------------------------- evaluation and samples


@torch.no_grad()
def evaluate_pairs(
    model: nn.Module,
    loss_fn,
    data: PreferenceData,
    pad_id: int,
    batch_size: int,
    device,
    reference: torch.Tensor | None = None,
) -> dict[str, float]:
    """Held-out preference metrics: ``val_loss``, ``val_accuracy`` (chosen reward > rejected), margins, log-probs."""
    sums: dict[str, float] = {}
    count = 0.0
    for batch in iterate_batches(data, pad_id, batch_size):
        if reference is not None:
            ref = reference[batch["pair_index"]]
            batch["ref_chosen_logps"], batch["ref_rejected_logps"] = ref[:, 0], ref[:, 1]
        batch = {k: v.to(device) for k, v in batch.items()}
        out = loss_fn(model, batch)
        sums["val_loss"] = sums.get("val_loss", 0.0) + float(out.loss_sum)
        for k, v in out.metrics.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        count += float(out.count)
    means = {k: v / max(count, 1.0) for k, v in sums.items()}
    result = {"val_loss": means.pop("val_loss")}
    result["val_accuracy"] = means.pop("rewards/accuracies")
    result["val_margin"] = means.pop("rewards/margins")
    result.update({f"val_{k}": v for k, v in means.items()})
    return result


@torch.no_grad()
def sample_and_score(
    model: nn.Module,
    reference: nn.Module,
    tokenizer,
    data: PreferenceData,
    *,
    n_prompts: int,
    max_new_tokens: int,
    max_seq_len: int,
    seed: int,
    device,
) -> list[dict[str, Any]]:
    """Sample one answer per held-out prompt at temperature 1 and score it under policy and reference.

    Temperature 1 without top-k/top-p makes the answers draws from πθ itself, so the mean of
    ``log πθ(y|x) − log πref(y|x)`` is an unbiased estimate of KL(πθ ‖ πref) per prompt.
    """
    from lmlab.models.generation import generate

    gen = torch.Generator(device="cpu").manual_seed(seed)
    records = []
    for pair in data.pairs[:n_prompts]:
        prompt = list(pair.prompt_ids)
        budget = max(1, min(max_new_tokens, max_seq_len - len(prompt)))
        new = generate(model, prompt, max_new_tokens=budget, temperature=1.0, eos_id=tokenizer.eos_id, generator=gen)
        if not new:
            continue
        ids = torch.tensor([prompt + new], dtype=torch.long, device=device)
        mask = torch.zeros_like(ids, dtype=torch.bool)
        mask[0, len(prompt) :] = True
        policy_lp, length = completion_logps(model, ids, mask)
        ref_lp, _ = completion_logps(reference, ids, mask)
        answer_ids = new[:-1] if new[-1] == tokenizer.eos_id else new
        records.append(
            {
                "prompt": pair.prompt,
                "completion": tokenizer.decode(answer_ids, skip_special_tokens=True),
                "tokens": int(length),
                "finished": new[-1] == tokenizer.eos_id,
                "policy_logp": float(policy_lp),
                "reference_logp": float(ref_lp),
            }
        )
    return records


# --------------------------------------------------------------------------- the run


def _write_json(path: Path, value: Any) -> None:
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in value.items()}
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(clean, indent=1))
    tmp.replace(path)


def run_align(
    cfg: RunConfig,
    run_dir: str | Path,
    *,
    reference: str | Path | None = None,
    resume: bool = False,
    quiet: bool = False,
) -> dict[str, Any]:
    """Preference-train ``cfg.init_from`` per ``cfg.align`` into ``run_dir``; returns ``summary.json``'s content.

    ``reference``: the reference run directory (default: ``cfg.init_from``); it must share the policy's
    tokenizer. Raises ``ConfigError`` for a bad ``align`` section, ``DataError`` for bad data or a
    reference with another tokenizer, ``CheckpointError`` for a missing run.
    """
    from lmlab.models.counting import count_params
    from lmlab.train.pretrain import _write_summary, prepare_run_dir
    from lmlab.train.runtime import environment, start_from_run

    device, model, init_cfg, tokenizer = start_from_run(cfg, "align")
    cfg = dataclasses.replace(cfg, model=init_cfg.model)
    check_align_config(cfg)
    # The saved config must reload (train.seq_len <= model.max_seq_len): record the longest pair instead.
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seq_len=cfg.align.max_len))
    a = cfg.align
    ref_path = str(reference or cfg.init_from)
    needs_ref = a.loss not in REFERENCE_FREE

    def load_ref() -> nn.Module:
        return load_reference_model(ref_path, tokenizer, device)

    load_args = dict(max_prompt_len=a.max_prompt_len, max_len=a.max_len, identical_pairs=a.identical_pairs)
    train = load_preference_file(a.train_file, tokenizer, **load_args)
    val = load_preference_file(a.val_file, tokenizer, **load_args) if a.val_file else None
    # Check the reference early (tokenizer, existence) even when its log-probs come from the cache.
    ref_model = load_ref() if (needs_ref and not a.precompute_reference) else None

    run_dir = prepare_run_dir(Path(run_dir), resume)
    save_config(cfg, run_dir / "config.yaml")
    tokenizer.save(run_dir / "tokenizer.json")
    (run_dir / "env.json").write_text(json.dumps(environment(device), indent=1))

    pad_id = pad_id_of(tokenizer)
    mb = cfg.train.micro_batch_size
    tables: dict[str, torch.Tensor] = {}
    if needs_ref and a.precompute_reference:
        if reference is not None:
            load_ref()  # refuse a foreign reference before using any cache
        splits = {"train": train, **({"val": val} if val is not None else {})}
        tables = cached_reference(run_dir, ref_path, splits, load_ref, pad_id, mb, device)
    batches = PreferenceBatches(train, pad_id, cfg.data.seed + cfg.train.seed, tables.get("train"))
    loss_fn = build_align_loss(a, ref_model)
    eval_fn = None
    if val is not None:

        def eval_fn(m: nn.Module) -> dict[str, float]:
            return evaluate_pairs(m, loss_fn, val, pad_id, mb, device, tables.get("val"))

    probe_data = val if val is not None else train
    probe_idx = list(range(min(PROBE_PAIRS, len(probe_data))))
    probe = collate_pairs([probe_data.pairs[i] for i in probe_idx], pad_id, probe_idx)
    probe = {k: v.to(device) for k, v in probe.items()}
    trainer = AlignTrainer(cfg, run_dir, model, batches, loss_fn, device=device, eval_fn=eval_fn, probe=probe)
    if resume:
        trainer.resume()
    params = count_params(cfg.model)
    summary: dict[str, Any] = {
        "status": "running",
        "kind": "align",
        "loss": a.loss,
        "steps": trainer.step,
        "params": params["total"],
        "non_embedding_params": params["non_embedding"],
        "init_from": str(cfg.init_from),
        "reference": ref_path if needs_ref else None,
        "train_data": train.summary(),
        "val_data": val.summary() if val is not None else None,
    }
    _write_summary(run_dir, summary)
    if not quiet:
        print(
            f"align {a.loss} on {len(train)} pairs ({train.identical} identical skipped, {train.truncated} truncated): "
            f"{params['total'] / 1e6:.2f}M parameters, {cfg.train.steps} steps of {mb * cfg.train.grad_accum} pairs"
        )
    result, fields = fit_logged(trainer, run_dir, resume=resume)
    summary.update(
        fields,
        final_val_loss=result.final_eval.get("val_loss"),
        final_val_accuracy=result.final_eval.get("val_accuracy"),
        final_eval=result.final_eval,
    )
    if not result.diverged:
        held_out = val if val is not None else train
        ref_for_kl = ref_model if ref_model is not None else load_ref()
        samples = sample_and_score(
            model,
            ref_for_kl,
            tokenizer,
            held_out,
            n_prompts=min(64, len(held_out)),
            max_new_tokens=cfg.sample.max_new_tokens,
            max_seq_len=cfg.model.max_seq_len,
            seed=cfg.train.seed,
            device=device,
        )
        with open(run_dir / "samples.jsonl", "w") as f:
            for rec in samples:
                f.write(json.dumps(rec) + "\n")
        if samples:
            summary["kl_to_reference"] = sum(r["policy_logp"] - r["reference_logp"] for r in samples) / len(samples)
            summary["sample_tokens"] = sum(r["tokens"] for r in samples) / len(samples)
            summary["samples"] = len(samples)
    _write_summary(run_dir, summary)
    if not quiet:
        acc = summary.get("final_val_accuracy")
        kl = summary.get("kl_to_reference")
        print(
            f"finished {summary['steps']} steps; held-out accuracy {acc if acc is None else round(acc, 4)}, "
            f"KL to reference {kl if kl is None else round(kl, 4)} nats; run directory: {run_dir}"
        )
    return summary


def align_main(argv: list[str]) -> int:
    p = run_parser(
        "lmlab align",
        "Preference optimisation (DPO, IPO, SimPO, LN-DPO, ORPO) of the model in init_from. "
        "Overrides: dotted key=value after the config (e.g. align.loss=ln_dpo align.beta=1.0).",
    )
    p.add_argument("--reference", metavar="RUN_DIR", help="reference model (default: the init_from run)")
    args = p.parse_intermixed_args(argv)
    cfg, run_dir, _ = resolve_run(p, args, "align")
    summary = run_align(cfg, run_dir, reference=args.reference, resume=bool(args.resume), quiet=args.quiet)
    return 3 if summary["status"] == "diverged" else 0
