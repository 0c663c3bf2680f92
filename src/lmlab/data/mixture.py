"""Data mixtures: several sources sampled with fixed ratios, deterministically and resumably.

Each source (a synthetic world or one of its subsets, or local files) is prepared into its own
shards with one shared tokenizer. The sampling ratio of source i is ``p_i ∝ weight_i^(1/T)``
(T = ``data.mixture_temperature``; T = 1 uses the weights as given, larger T flattens them).
Rows are assigned to sources by smooth weighted round-robin: row n goes to the source with the
largest deficit ``p_i·(n+1) − count_i``, so after any number of rows each source's share is
within one row of its ratio, with no randomness to replay. The state is the per-source row
counts plus each source's ``WindowSampler`` state.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lmlab.config import RunConfig
from lmlab.data import tempdirs
from lmlab.data.cache import cache_key, cache_root, prepare_files, prepare_synthetic, world_documents
from lmlab.data.prepare import expand_paths, read_documents
from lmlab.data.sampler import WindowSampler
from lmlab.data.shards import TokenShards
from lmlab.data.synthetic import get_world
from lmlab.data.tokenizer import TextTokenizer
from lmlab.errors import DataError
from lmlab.objectives.base import LossOutput

LOSS_WEIGHTS = "loss_weights"  # the batch key of per-row loss weights (mixture_balance=upweight)


def mixture_ratios(weights: list[float], temperature: float = 1.0) -> np.ndarray:
    """``p_i ∝ w_i^(1/T)``, normalised to sum to one."""
    w = np.asarray(weights, dtype=float)
    if np.any(w <= 0) or temperature <= 0:
        raise DataError("mixture weights and temperature must be > 0")
    p = w ** (1.0 / temperature)
    return p / p.sum()


def source_config(cfg: RunConfig, index: int, tokenizer_path: str | None) -> RunConfig:
    """The single-source run config of mixture source ``index`` (its own data section, shared tokenizer)."""
    src = cfg.data.mixture[index]
    data = dataclasses.replace(
        cfg.data,
        source="synthetic" if src.synthetic is not None else "files",
        synthetic=src.synthetic if src.synthetic is not None else cfg.data.synthetic,
        files=list(src.files),
        mixture=[],
    )
    tok = dataclasses.replace(cfg.tokenizer, path=tokenizer_path) if tokenizer_path else cfg.tokenizer
    return dataclasses.replace(cfg, data=data, tokenizer=tok)


def _source_documents(cfg: RunConfig, index: int, n: int) -> Iterator[str]:
    src = cfg.data.mixture[index]
    if src.synthetic is not None:
        s = src.synthetic
        return world_documents(get_world(s.world), s.seed, min(n, s.n_docs), s.subset)
    docs = read_documents(expand_paths(src.files), cfg.data.text_field)
    return (d.text for d in itertools.islice(docs, n))


def shared_tokenizer(cfg: RunConfig) -> tuple[TextTokenizer, Path]:
    """The mixture's tokenizer: ``tokenizer.path``, or a BPE trained on an equal share of every source (cached)."""
    t = cfg.tokenizer
    if t.path:
        return TextTokenizer.load(t.path), Path(t.path)
    spec = [dataclasses.asdict(m) for m in cfg.data.mixture]
    key = cache_key(
        {
            "mixture_tokenizer": spec,
            "vocab_size": t.vocab_size,
            "min_frequency": t.min_frequency,
            "train_docs": t.train_docs,
            **({"split_digits": True} if t.split_digits else {}),  # only when set: existing keys stay valid
        }
    )
    entry = cache_root() / "tokenizers" / f"mixture-{key[:16]}"
    path = entry / "tokenizer.json"
    if path.is_file():
        return TextTokenizer.load(path), path
    per_source = max(1, t.train_docs // len(cfg.data.mixture))
    texts = itertools.chain.from_iterable(_source_documents(cfg, i, per_source) for i in range(len(cfg.data.mixture)))
    tok = TextTokenizer.train_bpe(texts, t.vocab_size, t.min_frequency, split_digits=t.split_digits)
    entry.parent.mkdir(parents=True, exist_ok=True)
    tempdirs.remove_stale(entry.parent)
    tmp = tempdirs.work_dir(entry)
    tok.save(tmp / "tokenizer.json")
    try:
        os.rename(tmp, entry)  # atomic publish; a concurrent writer may have published first
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return TextTokenizer.load(path), path


def prepare_mixture_data(cfg: RunConfig) -> tuple[dict[str, Path], TextTokenizer]:
    """Prepared (cached) shards of every source, in config order, with the shared tokenizer."""
    tok, tok_path = shared_tokenizer(cfg)
    dirs: dict[str, Path] = {}
    for i, src in enumerate(cfg.data.mixture):
        sub = source_config(cfg, i, str(tok_path))
        data_dir, _ = prepare_synthetic(sub) if src.synthetic is not None else prepare_files(sub)
        dirs[src.name] = data_dir
    return dirs, tok


@dataclass(frozen=True)
class MixturePlan:
    """Target ratios over training and how rows are drawn (docs/science.md §4.5).

    The target after global row n is ``p(n) ∝ w^(1/T(n))``, with T moving linearly from ``temperature`` to
    ``temperature_end`` over ``total_rows`` (Cooldown; constant without an end). ``balance="sample"`` draws rows
    with p(n) (upsampling); ``"upweight"`` draws them with the sources' natural shares q (their sizes) and weights
    each row's loss by p_i(n)/q_i, which has the same expected gradient (Wang et al. 2024, arXiv 2410.04579:
    the two agree under full-batch descent, not under SGD).
    """

    weights: tuple[float, ...]
    temperature: float = 1.0
    temperature_end: float | None = None
    total_rows: int = 0
    balance: str = "sample"
    natural: tuple[float, ...] = ()

    @property
    def scheduled(self) -> bool:
        return self.temperature_end is not None and self.temperature_end != self.temperature

    def target(self, row: int) -> np.ndarray:
        """p(row): the ratios the mixture should have at global row ``row`` (0-based)."""
        temperature = self.temperature
        if self.scheduled:
            frac = min(1.0, row / max(1, self.total_rows - 1))
            temperature += (self.temperature_end - self.temperature) * frac
        return mixture_ratios(list(self.weights), temperature)

    def draw(self, row: int) -> np.ndarray:
        """The ratios rows are drawn with at ``row``."""
        return np.asarray(self.natural) if self.balance == "upweight" else self.target(row)

    def loss_weight(self, source: int, row: int) -> float:
        """The loss weight of a row of ``source`` drawn at ``row``: p_i/q_i when upweighting, else 1."""
        if self.balance != "upweight":
            return 1.0
        return float(self.target(row)[source] / self.natural[source])


class MixtureSampler:
    """Rows from several ``WindowSampler``s in fixed ratios (or a ``MixturePlan``); ``next_batch(b)`` -> inputs,
    labels, source ids (and, with an upweighting plan, the rows' loss weights)."""

    def __init__(
        self,
        samplers: dict,
        ratios: dict[str, float],
        *,
        rank: int = 0,
        world_size: int = 1,
        plan: MixturePlan | None = None,
    ):
        self.names = list(samplers)
        self.samplers = samplers
        self.ratios = np.array([ratios[n] for n in self.names], dtype=float)
        self.counts = np.zeros(len(self.names), dtype=np.int64)
        self.targets = np.zeros(len(self.names), dtype=float)  # Σ of the draw ratios so far (changing ratios)
        self.rank = rank
        self.world_size = world_size
        self.plan = plan

    def _assign(self, n: int) -> list[int]:
        """Source index of each of the next ``n`` global rows (smooth weighted round-robin)."""
        out = []
        changing = self.plan is not None and (self.plan.scheduled or self.plan.balance == "upweight")
        for _ in range(n):
            total = int(self.counts.sum()) + 1
            if changing:
                self.targets += self.plan.draw(total - 1)
                deficit = self.targets - self.counts
            else:
                deficit = self.ratios * total - self.counts
            i = int(np.argmax(deficit))
            self.counts[i] += 1
            out.append(i)
        return out

    def next_batch(self, batch_size: int) -> tuple[torch.Tensor, ...]:
        first_row = int(self.counts.sum())
        sources = self._assign(batch_size * self.world_size)
        need = np.bincount(sources, minlength=len(self.names))
        drawn = {i: self.samplers[self.names[i]].next_batch(int(k)) for i, k in enumerate(need) if k > 0}
        taken = dict.fromkeys(drawn, 0)
        xs, ys = [], []
        for i in sources:
            x, y = drawn[i]
            xs.append(x[taken[i]])
            ys.append(y[taken[i]])
            taken[i] += 1
        mine = slice(self.rank * batch_size, (self.rank + 1) * batch_size)
        src = torch.tensor(sources, dtype=torch.long)[mine]
        if self.plan is None or self.plan.balance != "upweight":
            return torch.stack(xs)[mine], torch.stack(ys)[mine], src
        weights = [self.plan.loss_weight(i, first_row + k) for k, i in enumerate(sources)]
        return torch.stack(xs)[mine], torch.stack(ys)[mine], src, torch.tensor(weights, dtype=torch.float32)[mine]

    def state_dict(self) -> dict:
        return {
            "names": list(self.names),
            "counts": [int(c) for c in self.counts],
            "targets": [float(t) for t in self.targets],
            "samplers": {n: s.state_dict() for n, s in self.samplers.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        if list(state["names"]) != self.names:
            raise DataError(f"the checkpoint's mixture sources {state['names']} differ from this run's {self.names}")
        self.counts = np.array(state["counts"], dtype=np.int64)
        self.targets = np.array(state.get("targets", [0.0] * len(self.names)), dtype=float)
        for n, s in self.samplers.items():
            s.load_state_dict(state["samplers"][n])


class MixtureBatches:
    """The loop's ``BatchSource`` over a mixture: dict batches with a ``source_ids`` row tag."""

    def __init__(self, sampler: MixtureSampler):
        self.sampler = sampler

    def next_batch(self, batch_size: int) -> dict[str, torch.Tensor]:
        x, y, src, *weights = self.sampler.next_batch(batch_size)
        batch = {"input_ids": x, "labels": y, "source_ids": src}
        if weights:
            batch[LOSS_WEIGHTS] = weights[0]
        return batch

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


def build_mixture(cfg: RunConfig, dirs: dict[str, Path], *, seed: int, rank: int = 0, world_size: int = 1):
    """``(MixtureBatches, validation splits by source, target ratios by source at the end of training)``."""
    t, d = cfg.train, cfg.data
    train = {name: TokenShards.open(path, "train") for name, path in dirs.items()}
    sizes = np.array([len(tokens) for tokens in train.values()], dtype=float)
    weights = np.array([m.weight for m in d.mixture], dtype=float) * (sizes if d.mixture_by_size else 1.0)
    total_rows = t.steps * t.micro_batch_size * t.grad_accum * world_size
    plan = MixturePlan(
        tuple(weights), d.mixture_temperature, d.mixture_temperature_end, total_rows, d.mixture_balance,
        tuple(sizes / sizes.sum()),
    )  # fmt: skip
    ratios = dict(zip(dirs, plan.target(total_rows - 1)))
    samplers = {
        name: WindowSampler(tokens, t.seq_len, seed + 7919 * i) for i, (name, tokens) in enumerate(train.items())
    }
    batches = MixtureBatches(MixtureSampler(samplers, ratios, rank=rank, world_size=world_size, plan=plan))
    val = {name: TokenShards.open(path, "val") for name, path in dirs.items()}
    return batches, val, ratios


def upweighted_loss(loss_fn: Callable[[nn.Module, dict], LossOutput]) -> Callable[[nn.Module, dict], LossOutput]:
    """``loss_fn`` with each row's loss scaled by the batch's ``loss_weights`` (``mixture_balance=upweight``). Rows
    of one source share a weight, so the loss runs once per source present; ``count`` and the metrics (plain
    cross-entropy) stay unweighted, so logged losses remain comparable."""

    def weighted(model: nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
        if LOSS_WEIGHTS not in batch:
            return loss_fn(model, batch)
        weights, sources = batch[LOSS_WEIGHTS], batch["source_ids"]
        total: LossOutput | None = None
        for source in torch.unique(sources).tolist():
            rows = sources == source
            part = loss_fn(model, {k: v[rows] for k, v in batch.items() if k != LOSS_WEIGHTS})
            scaled = LossOutput(part.loss_sum * weights[rows][0], part.count, part.metrics)
            total = scaled if total is None else _add(total, scaled)
        return total

    return weighted


def _add(a: LossOutput, b: LossOutput) -> LossOutput:
    metrics = {k: a.metrics.get(k, 0) + b.metrics.get(k, 0) for k in a.metrics.keys() | b.metrics.keys()}
    return LossOutput(a.loss_sum + b.loss_sum, a.count + b.count, metrics)
