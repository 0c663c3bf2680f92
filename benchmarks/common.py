"""Shared pieces of the throughput benchmarks (``throughput.py``, ``suite.py``).

Both scripts compare lmlab's real training step (``lmlab.train.loop.Trainer.train_step``: gradient
accumulation normalised by the token count, clipping, AdamW parameter groups, autocast) with a peer
implementation of the *same* model (Hugging Face ``LlamaForCausalLM``, built from the lmlab config by
``lmlab.models.hf.model_config_to_hf_config`` and loaded with the lmlab weights) on the same batches.

Measurement rules (docs/design.md: "performance is measured in benchmarks that print ratios against a peer
run in the same process or job"):

- warmup steps are run and discarded before anything is timed;
- implementations are measured in *interleaved* repetitions (A B A B …) so that drifts of a shared or
  throttling machine hit both sides alike; the reported figure is the median over repetitions;
- achieved FLOP/s use the training FLOPs per token of ``lmlab.models.counting.flops_per_token``
  (Kaplan et al. 2020: 3 × forward) and are compared with a matmul peak *measured in the same run*
  (a large square ``torch.mm`` loop in the benchmark's dtype) and, on known GPUs, with the data-sheet
  dense bf16 peak;
- every result row carries the device name, dtype, threads, torch/transformers versions and the exact
  command line, so a table can be traced back to what produced it.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import platform
import resource
import shlex
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmlab.config import (
    DistributedConfig,
    ModelConfig,
    ObjectiveConfig,
    OptimConfig,
    RunConfig,
    ScheduleConfig,
    TrainConfig,
)
from lmlab.errors import UserError
from lmlab.models.counting import count_params, flops_per_token
from lmlab.models.decoder import Decoder
from lmlab.models.hf import lmlab_state_dict_to_hf, model_config_to_hf_config
from lmlab.objectives.lm_objective import build_lm_loss
from lmlab.train.distributed import DistContext, setup_distributed
from lmlab.train.loop import Trainer
from lmlab.train.runtime import autocast_context

# --------------------------------------------------------------------------- model presets

# name -> (d_model, n_layers, n_heads, vocab_size, seq_len). "tiny" exists for the smoke test only.
PRESETS: dict[str, tuple[int, int, int, int, int]] = {
    "tiny": (64, 2, 4, 256, 32),
    "7m": (256, 8, 8, 8192, 256),
    "25m": (512, 8, 8, 8192, 256),
    "124m": (768, 12, 12, 32768, 1024),
    "350m": (1024, 24, 16, 32768, 1024),
}

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets, FLOP/s; matched against
# ``torch.cuda.get_device_name`` in order (the first pattern whose words all occur wins).
GPU_BF16_PEAKS: list[tuple[tuple[str, ...], float]] = [
    (("H100", "PCIe"), 756e12),
    (("H100", "NVL"), 835e12),
    (("H100",), 989e12),  # SXM5 ("NVIDIA H100 80GB HBM3")
    (("H200",), 989e12),
    (("GH200",), 989e12),
    (("A100",), 312e12),
    (("L40S",), 362e12),
    (("L4",), 121e12),
    (("A10",), 125e12),
]


def model_config(preset: str) -> tuple[ModelConfig, int]:
    """The lmlab ``ModelConfig`` of a preset and its sequence length (tied embeddings, MHA, SwiGLU 8/3·d)."""
    if preset not in PRESETS:
        raise UserError(f"unknown size '{preset}'; choose from {', '.join(PRESETS)}")
    d, layers, heads, vocab, seq = PRESETS[preset]
    cfg = ModelConfig(vocab_size=vocab, d_model=d, n_layers=layers, n_heads=heads, max_seq_len=seq)
    return cfg, seq


def parse_list(text: str, allowed: tuple[str, ...] | None = None, what: str = "value") -> list[str]:
    """``"a,b"`` -> ``["a", "b"]``; values outside ``allowed`` are a ``UserError``."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise UserError(f"empty {what} list '{text}'")
    if allowed is not None:
        bad = [item for item in items if item not in allowed]
        if bad:
            raise UserError(f"unknown {what} '{bad[0]}'; choose from {', '.join(allowed)}")
    return items


def resolve_device(name: str) -> torch.device:
    """``cpu`` or ``cuda``; asking for CUDA on a machine without it is a ``UserError``."""
    if name not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: choose cpu or cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: CUDA is not available on this machine")
    return torch.device(name)


# --------------------------------------------------------------------------- environment


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model from /proc/cpuinfo (``platform.processor()`` elsewhere)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def command_line() -> str:
    """The exact command that started this process, shell-quoted."""
    argv = getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv]
    return shlex.join(argv)


def environment(device: torch.device, dtype: str, threads: int) -> dict[str, Any]:
    """Fields every result row carries."""
    try:
        import transformers

        hf_version = transformers.__version__
    except ImportError:
        hf_version = None
    return {
        "device": device.type,
        "device_name": device_name(device),
        "dtype": dtype,
        "threads": threads,
        "torch": torch.__version__,
        "transformers": hf_version,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "command": command_line(),
    }


def nominal_bf16_peak(device: torch.device) -> float | None:
    """Data-sheet dense bf16 FLOP/s of a known GPU, else None (CPUs have no such table)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for words, peak in GPU_BF16_PEAKS:
        if all(word in name for word in words):
            return peak
    return None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss) if sys.platform == "darwin" else int(rss) * 1024


# --------------------------------------------------------------------------- matmul peak


def measure_matmul_peak(device: torch.device, dtype: str, seconds: float, size: int | None = None) -> tuple[float, int]:
    """``(FLOP/s, n)``: the achieved rate of an n × n ``torch.mm`` in ``dtype`` (fp32 or bf16),
    repeated for about ``seconds`` after a warmup product; 2·n³ FLOPs per product.

    Without ``size``, n starts at 512 and doubles (up to 8192 on CUDA, 4096 on CPU) while one product
    takes under a tenth of ``seconds``, so a machine with slow bf16 (no AVX-512-BF16/AMX: emulated)
    is not stuck for minutes and a fast one still gets products large enough to reach its peak.
    """
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    limit = 8192 if device.type == "cuda" else 4096

    def operands(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        gen = torch.Generator(device="cpu").manual_seed(0)
        a = torch.randn(n, n, generator=gen).to(device=device, dtype=torch_dtype)
        b = torch.randn(n, n, generator=gen).to(device=device, dtype=torch_dtype)
        return a, b, torch.empty(n, n, device=device, dtype=torch_dtype)

    def one_product(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> float:
        synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        synchronize(device)
        return time.perf_counter() - start

    n = size or 512
    a, b, out = operands(n)
    one_product(a, b, out)  # warmup: kernel selection, allocator, lazy init
    while size is None and n < limit and one_product(a, b, out) < seconds / 10:
        n *= 2
        a, b, out = operands(n)
        one_product(a, b, out)
    iterations, start = 0, time.perf_counter()
    while True:
        torch.mm(a, b, out=out)
        iterations += 1
        if iterations % 4 == 0 or device.type == "cpu":
            synchronize(device)
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                break
    return 2.0 * n**3 * iterations / elapsed, n


# --------------------------------------------------------------------------- data


class SyntheticBatches:
    """A ``BatchSource`` cycling over ``n_batches`` fixed random token batches held in memory.

    Each window has ``seq_len + 1`` tokens: ``input_ids`` are the first ``seq_len`` and ``labels``
    the last ``seq_len`` (already shifted, as lmlab's data loaders deliver them). ``windows`` gives
    the same tokens to the peer implementations.
    """

    def __init__(self, vocab_size: int, seq_len: int, batch_size: int, n_batches: int = 16, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.windows = torch.randint(0, vocab_size, (n_batches, batch_size, seq_len + 1), generator=gen)
        self.index = 0

    def next_batch(self, batch_size: int) -> dict[str, torch.Tensor]:
        window = self.windows[self.index % len(self.windows)]
        if window.shape[0] != batch_size:
            raise ValueError(f"SyntheticBatches holds batches of {window.shape[0]}, asked for {batch_size}")
        self.index += 1
        return {"input_ids": window[:, :-1], "labels": window[:, 1:]}

    def state_dict(self) -> dict[str, Any]:
        return {"index": self.index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.index = int(state["index"])


# --------------------------------------------------------------------------- implementations

LR = 1e-4  # small and constant on both sides: throughput must not depend on a diverging loss


def run_config(
    cfg: ModelConfig, seq_len: int, batch: int, dtype: str, compile_model: bool | str, steps: int, float8: bool = False
) -> RunConfig:
    """The lmlab run configuration the benchmark trains with (constant LR, clipping at 1, wd 0.1).

    ``compile_model``: False, True (= per block) or ``"full"`` (the whole forward with the loss, one graph).
    """
    return RunConfig(
        model=cfg,
        optim=OptimConfig(lr=LR, weight_decay=0.1, grad_clip=1.0),
        schedule=ScheduleConfig(name="constant"),
        train=TrainConfig(
            steps=max(steps, 1),
            micro_batch_size=batch,
            grad_accum=1,
            seq_len=seq_len,
            precision=dtype,  # type: ignore[arg-type]
            compile=compile_model,  # type: ignore[arg-type]
            float8=float8,
            progress=False,
        ),
    )


def build_lmlab(
    cfg: ModelConfig,
    seq_len: int,
    batch: int,
    dtype: str,
    device: torch.device,
    *,
    compile_model: bool | str = False,
    dist: DistContext | None = None,
    seed: int = 0,
    loss_impl: str = "standard",
    float8: bool = False,
) -> tuple[Trainer, SyntheticBatches]:
    """A real lmlab ``Trainer`` (LM objective, default switches) on a synthetic in-memory source.

    ``dist`` (from ``lmlab.train.distributed.setup_distributed``) makes it one rank of a DDP or FSDP2
    job: the Trainer then wraps the model itself (``prepare_model``), as ``lmlab train`` does.
    """
    torch.manual_seed(0)
    model = Decoder(cfg).to(device)
    batches = SyntheticBatches(cfg.vocab_size, seq_len, batch, seed=seed)
    run_cfg = run_config(cfg, seq_len, batch, dtype, compile_model, steps=10**6, float8=float8)
    if dist is not None:
        run_cfg.distributed = DistributedConfig(strategy=dist.strategy, backend=dist.backend or "auto")  # type: ignore[arg-type]
    run_dir = Path(tempfile.gettempdir()) / "lmlab-benchmark-unused"  # never written: the benchmark saves nothing
    loss_fn = build_lm_loss(ObjectiveConfig(loss_impl=loss_impl))  # type: ignore[arg-type]
    trainer = Trainer(run_cfg, run_dir, model, batches, loss_fn, device=device, dist=dist)
    return trainer, batches


def lmlab_dist_context(strategy: str, backend: str, device: torch.device, rank: int, world: int) -> DistContext:
    """Join (or, for FSDP2 on one process, create) a process group exactly as ``lmlab train`` does,
    through ``setup_distributed`` with torchrun's variables; ``MASTER_ADDR``/``MASTER_PORT`` must be
    set for several ranks."""
    run_cfg = RunConfig(
        train=TrainConfig(device=str(device)),
        distributed=DistributedConfig(strategy=strategy, backend=backend),  # type: ignore[arg-type]
    )
    env = {"WORLD_SIZE": str(world), "RANK": str(rank), "LOCAL_RANK": str(rank)}
    return setup_distributed(run_cfg, env)


def hf_llama(cfg: ModelConfig, lmlab_model: nn.Module | None = None) -> nn.Module:
    """``transformers.LlamaForCausalLM`` with the dimensions of ``cfg`` (SDPA attention), loaded with
    ``lmlab_model``'s weights when given so both sides start from the same point."""
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = model_config_to_hf_config(cfg)
    for key in ("architectures", "model_type", "torch_dtype"):
        fields.pop(key, None)
    hf_cfg = LlamaConfig(**fields)
    hf_cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(hf_cfg)
    if lmlab_model is not None:
        state = lmlab_state_dict_to_hf(lmlab_model.state_dict())
        missing, unexpected = model.load_state_dict(state, strict=False)
        leftover = [name for name in missing if name != "lm_head.weight"]  # tied: the embedding
        if leftover or unexpected:
            raise RuntimeError(f"HF Llama does not match the lmlab model: missing {leftover}, unexpected {unexpected}")
        if cfg.tie_embeddings:
            model.tie_weights()
    return model


@dataclass
class Runner:
    """One implementation under test: ``step()`` does one optimizer update and returns the loss."""

    name: str
    step: Callable[[], float]
    tokens_per_step: int
    device: torch.device
    error: str | None = None
    losses: list[float] = field(default_factory=list)

    def warm(self, steps: int) -> None:
        """``steps`` untimed updates (compilation, allocator and optimizer-state warmup)."""
        for _ in range(steps):
            self.step()

    def measure(self, steps: int) -> float:
        """Tokens/s over ``steps`` updates (the device is synchronised before and after)."""
        synchronize(self.device)
        start = time.perf_counter()
        for _ in range(steps):
            self.losses.append(self.step())
        synchronize(self.device)
        return self.tokens_per_step * steps / (time.perf_counter() - start)


def lmlab_runner(trainer: Trainer, batch: int, seq_len: int) -> Runner:
    def step() -> float:
        return trainer.train_step(sync=False)["loss"]  # no host sync inside the timed loop

    return Runner("lmlab", step, batch * seq_len, trainer.device)


def hf_plain_runner(
    model: nn.Module, batches: SyntheticBatches, dtype: str, device: torch.device, *, compile_model: bool = False
) -> Runner:
    """HF Llama in a plain PyTorch loop: ``model(input_ids, labels=…)``, backward, clip, AdamW, zero_grad.

    HF shifts ``labels`` inside the model, so it gets the window's first ``seq_len`` tokens as both
    inputs and labels: the same forward/backward work as lmlab on the same tokens (T − 1 targets).
    """
    model = model.to(device).train()
    forward = torch.compile(model) if compile_model else model
    fused = {"fused": True} if device.type == "cuda" else {}
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.1, **fused)
    cursor = {"index": 0}

    def step() -> float:
        window = batches.windows[cursor["index"] % len(batches.windows)]
        cursor["index"] += 1
        input_ids = window[:, :-1].to(device, non_blocking=True)
        with autocast_context(device, dtype):
            loss = forward(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()  # no host sync inside the timed loop (as for lmlab)

    tokens = batches.windows.shape[1] * (batches.windows.shape[2] - 1)
    return Runner("hf", step, tokens, device)


def interleaved(runners: list[Runner], warmup: int, steps: int, reps: int) -> dict[str, list[float]]:
    """``warmup`` discarded updates per runner, then ``reps`` rounds A B … A B … of ``steps`` timed
    updates each; returns the tokens/s of every repetition per runner. A runner that raises (e.g. out
    of memory) records its error and leaves the rounds; the others go on."""
    rates: dict[str, list[float]] = {r.name: [] for r in runners}
    for runner in runners:
        _guard(runner, lambda r=runner: r.warm(warmup))
    for _ in range(reps):
        for runner in runners:
            if runner.error is None:
                _guard(runner, lambda r=runner: rates[r.name].append(r.measure(steps)))
    return rates


def _guard(runner: Runner, fn: Callable[[], Any]) -> None:
    try:
        fn()
    except Exception as err:  # noqa: BLE001  OOM, compile and backend failures are reported per row
        runner.error = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]
        if runner.device.type == "cuda":
            torch.cuda.empty_cache()


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def params_of(cfg: ModelConfig) -> int:
    return count_params(cfg)["total"]


def training_flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    return flops_per_token(cfg, seq_len)["training"]


# --------------------------------------------------------------------------- output


def fmt(value: Any, kind: str = "") -> str:
    """Human formatting for the markdown tables: ``tok`` (tokens/s), ``x`` (ratio), ``pct``, ``flops``,
    ``mib``; None is an em dash."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if kind == "tok":
        return f"{value:,.0f}"
    if kind == "x":
        return f"{value:.2f}×"
    if kind == "pct":
        return f"{100 * value:.1f}%"
    if kind == "flops":
        for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6)):
            if value >= scale:
                return f"{value / scale:.2f} {unit}FLOP/s"
        return f"{value:.0f} FLOP/s"
    if kind == "mib":
        return f"{value / 2**20:,.0f} MiB"
    return str(value)


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    if path:
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(payload, indent=2) + "\n")


# --------------------------------------------------------------------------- HF Trainer


class _TokenWindows(torch.utils.data.Dataset):
    """The benchmark's windows as an HF-style dataset of ``{"input_ids", "labels"}`` rows (HF shifts)."""

    def __init__(self, batches: SyntheticBatches):
        self.rows = batches.windows[:, :, :-1].reshape(-1, batches.windows.shape[-1] - 1)  # [n·B, T]

    def __len__(self) -> int:
        return self.rows.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[index], "labels": self.rows[index]}


class HFTrainerRunner(Runner):
    """``transformers.Trainer`` (``report_to=[]``, no eval, no saving, constant LR, clip 1, wd 0.1, its
    default optimizer) timed by a callback: each ``measure(steps)`` is one ``train()`` of ``steps + 1``
    updates whose first update is discarded; the rate is taken between the ends of update 1 and
    update ``steps + 1``, so it includes the Trainer's data loading and bookkeeping."""

    def __init__(
        self,
        model: nn.Module,
        batches: SyntheticBatches,
        dtype: str,
        device: torch.device,
        out_dir: str,
        *,
        compile_model: bool = False,
    ):
        from transformers import PrinterCallback, TrainerCallback, TrainingArguments
        from transformers import Trainer as HFTrainer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        batch, seq_len = batches.windows.shape[1], batches.windows.shape[2] - 1
        super().__init__("hf_trainer", self._one_step, batch * seq_len, device)
        self.step_ends: list[float] = []
        ends = self.step_ends

        class StepClock(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003
                synchronize(device)
                ends.append(time.perf_counter())

        self.args = TrainingArguments(
            output_dir=out_dir,
            max_steps=1,
            per_device_train_batch_size=batch,
            learning_rate=LR,
            weight_decay=0.1,
            adam_beta2=0.95,
            max_grad_norm=1.0,
            lr_scheduler_type="constant",
            logging_strategy="no",
            save_strategy="no",
            eval_strategy="no",
            report_to=[],
            bf16=dtype == "bf16",
            use_cpu=device.type == "cpu",
            dataloader_pin_memory=device.type == "cuda",
            disable_tqdm=True,
            torch_compile=compile_model,
            seed=0,
        )
        self.trainer = HFTrainer(
            model=model, args=self.args, train_dataset=_TokenWindows(batches), callbacks=[StepClock()]
        )
        self.trainer.remove_callback(PrinterCallback)  # it prints the end-of-train metrics dict

    def _train(self, updates: int) -> None:
        self.step_ends.clear()
        self.trainer.args.max_steps = updates
        output = self.trainer.train()
        self.losses.append(float(output.training_loss))

    def _one_step(self) -> float:
        self._train(1)
        return self.losses[-1]

    def warm(self, steps: int) -> None:
        if steps:
            self._train(steps)

    def measure(self, steps: int) -> float:
        self._train(steps + 1)
        elapsed = self.step_ends[-1] - self.step_ends[0]
        return self.tokens_per_step * steps / elapsed


# --------------------------------------------------------------------------- isolated probes (child processes)


def current_rss_bytes() -> int:
    """Resident set size now (/proc/self/statm; the peak where /proc is missing)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_rss_bytes()


def build_runner(
    impl: str, cfg: ModelConfig, seq_len: int, batch: int, dtype: str, device: torch.device, out_dir: str
) -> Runner:
    """One implementation alone: ``lmlab``, ``hf`` (plain loop) or ``hf_trainer``."""
    if impl == "lmlab":
        trainer, _ = build_lmlab(cfg, seq_len, batch, dtype, device)
        return lmlab_runner(trainer, batch, seq_len)
    torch.manual_seed(0)
    batches = SyntheticBatches(cfg.vocab_size, seq_len, batch)
    if impl == "hf":
        return hf_plain_runner(hf_llama(cfg), batches, dtype, device)
    if impl == "hf_trainer":
        return HFTrainerRunner(hf_llama(cfg), batches, dtype, device, out_dir)
    raise ValueError(f"unknown implementation '{impl}'")


class RssSampler:
    """Peak resident set size of this process over a ``with`` block, sampled every ``interval`` s by a
    background thread (``ru_maxrss`` cannot be reset, and an import spike would mask the training peak)."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, current_rss_bytes())
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self.peak = current_rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, current_rss_bytes())


def memory_probe(impl: str, size: str, dtype: str, batch: int, steps: int, threads: int, queue: Any) -> None:
    """Child-process body: build one implementation, train ``steps`` updates, put
    ``{"impl", "baseline_rss", "peak_rss", "error"}`` on ``queue`` (bytes). The baseline is the RSS
    after the imports, the peak the largest RSS while building and training. A fresh process per implementation is what
    makes the peak attributable to it; every probe imports the same modules (transformers' model and
    Trainer, torch._dynamo, which the optimizers import lazily) before the baseline, so the peaks of
    the three implementations are comparable."""
    torch.set_num_threads(threads)
    for module in CHILD_PRELOAD[1:]:
        importlib.import_module(module)

    baseline = current_rss_bytes()
    try:
        cfg, seq_len = model_config(size)
        with tempfile.TemporaryDirectory() as out_dir, RssSampler() as sampler:
            runner = build_runner(impl, cfg, seq_len, batch, dtype, torch.device("cpu"), out_dir)
            runner.warm(steps)
        queue.put({"impl": impl, "baseline_rss": baseline, "peak_rss": sampler.peak, "error": None})
    except Exception as err:  # noqa: BLE001  reported in the table
        queue.put({"impl": impl, "baseline_rss": baseline, "peak_rss": None, "error": f"{type(err).__name__}: {err}"})


# Modules the child processes need, imported once by the fork server instead of once per child.
CHILD_PRELOAD = ["common", "torch._dynamo", "transformers.models.llama.modeling_llama", "transformers.trainer"]


def child_context() -> Any:
    """The multiprocessing context for the probes and ranks: a fork server that has imported torch,
    lmlab, this module and transformers once (so each child costs a fork, not a fresh interpreter and
    its imports), or plain spawn where fork servers do not exist. Children never inherit the
    parent's OpenMP/autograd threads either way."""
    import multiprocessing as mp

    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(CHILD_PRELOAD)
    return ctx


def run_in_child(target: Callable[..., None], *args: Any, timeout: float = 600.0) -> dict[str, Any]:
    """Run ``target(*args, queue)`` in a fresh child process and return what it put on the queue."""
    ctx = child_context()
    queue = ctx.SimpleQueue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    proc.join(timeout)
    if proc.is_alive():
        proc.terminate()
        proc.join()
        return {"error": f"timed out after {timeout:.0f} s"}
    if queue.empty():
        return {"error": f"child exited with code {proc.exitcode} and no result"}
    return queue.get()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ddp_worker(
    rank: int, world: int, port: int, size: str, dtype: str, batch: int, warmup: int, steps: int, threads: int, queue
) -> None:
    """One rank of lmlab's own data-parallel path on CPU: ``setup_distributed`` with
    ``distributed.strategy=ddp``, ``backend=gloo`` and torchrun's variables, then the ``Trainer``,
    which wraps the model in DDP (on one process it trains plainly, as ``lmlab train`` does).
    Weak scaling: ``batch`` sequences per rank, different tokens per rank. Rank 0 puts the global
    tokens/s on ``queue``."""
    torch.set_num_threads(threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    ctx = lmlab_dist_context("ddp", "gloo", torch.device("cpu"), rank, world)
    try:
        cfg, seq_len = model_config(size)
        trainer, _ = build_lmlab(cfg, seq_len, batch, dtype, torch.device("cpu"), dist=ctx, seed=rank)
        for _ in range(warmup):
            trainer.train_step()
        ctx.barrier()
        start = time.perf_counter()
        for _ in range(steps):
            trainer.train_step()
        ctx.barrier()
        elapsed = time.perf_counter() - start
        if rank == 0:
            wrapped = type(trainer.forward_model).__name__
            queue.put(
                {
                    "world": world,
                    "tokens_per_s": world * batch * seq_len * steps / elapsed,
                    "wrapper": wrapped,
                    "error": None,
                }
            )
    finally:
        ctx.close()


def ddp_scaling(world: int, size: str, dtype: str, batch: int, warmup: int, steps: int, threads: int) -> dict:
    """Global tokens/s of ``world`` gloo ranks (fresh processes); ``{"error": …}`` on failure."""
    ctx = child_context()
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [
        ctx.Process(target=ddp_worker, args=(rank, world, port, size, dtype, batch, warmup, steps, threads, queue))
        for rank in range(world)
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(900)
    failed = [proc.exitcode for proc in procs if proc.exitcode != 0]
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
            proc.join()
    if failed or queue.empty():
        return {"world": world, "tokens_per_s": None, "error": f"ranks exited with codes {failed or 'none'}"}
    return queue.get()
