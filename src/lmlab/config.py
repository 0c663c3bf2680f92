"""The typed config tree of a run: dataclasses, YAML in and out, dotted CLI overrides.

Every key is declared here with its type and default; each section checks its own values
(``validate()``) and ``validate(cfg)`` adds the rules that span sections. Loading refuses unknown
keys (with the closest valid names), wrong types, non-finite numbers, duplicate YAML keys and
impossible combinations by raising ``ConfigError`` before any work starts. The resolved config is
saved in every run.

Model components are slots: ``model.attention`` and ``model.ffn`` hold one variant each, chosen by
``kind`` from ``ATTENTION_KINDS`` / ``FFN_KINDS`` (the variant's dataclass lives beside its module;
``lmlab.models.component``). A new variant is its module plus one row here.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from lmlab.errors import ConfigError
from lmlab.models.abacus import AbacusConfig
from lmlab.models.attention import GQAConfig
from lmlab.models.component import NOT_IN_WEIGHTS
from lmlab.models.lora import AdapterConfig
from lmlab.models.mlp import SwiGLUConfig
from lmlab.models.moe import MoEConfig
from lmlab.models.mup import MuPConfig
from lmlab.models.recurrent import RecurrenceConfig
from lmlab.models.rope import RopeScalingConfig
from lmlab.models.sizes import SIZES
from lmlab.models.sparse_attention import S2Config, SlidingWindowConfig
from lmlab.objectives.unlearning_methods import UNLEARNING_METHODS, UnlearningMethod
from lmlab.objectives.weight_attribution import WeightMaskConfig
from lmlab.safe_io import write_text_atomic

# --------------------------------------------------------------------------- component slots

ATTENTION_KINDS: dict[str, type] = {"gqa": GQAConfig, "sliding": SlidingWindowConfig, "s2": S2Config}
FFN_KINDS: dict[str, type] = {"swiglu": SwiGLUConfig, "moe": MoEConfig}

AttentionConfig = GQAConfig | SlidingWindowConfig | S2Config  # the union of ATTENTION_KINDS' types
FFNConfig = SwiGLUConfig | MoEConfig  # the union of FFN_KINDS' types


def slot(kinds: dict[str, type], default: str) -> Any:
    """A dataclass field holding one variant of ``kinds``, chosen in YAML by its ``kind`` key."""
    return field(default_factory=kinds[default], metadata={"slot": kinds})


# Fields marked ``NOT_IN_WEIGHTS`` (lmlab.models.component) do not change what the weights mean (a label, the
# init scale, the context length the RoPE tables are built for), so continuing from a checkpoint may change them.


# --------------------------------------------------------------------------- sections


@dataclass
class ModelConfig:
    """Decoder architecture. ``size`` picks a named size (see ``lmlab.models.sizes``);
    explicit dimensions given alongside it override the named values."""

    size: str | None = field(default=None, metadata=NOT_IN_WEIGHTS)
    vocab_size: int = 0  # 0: taken from the run's tokenizer
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: same as n_heads (multi-head attention)
    head_size: int | None = None  # width of one attention head; None: d_model / n_heads (Qwen3 decouples them)
    max_seq_len: int = field(default=256, metadata=NOT_IN_WEIGHTS)
    # rotary position embedding on q/k (rope), or none: NoPE, positions only through the causal mask (and
    # Abacus digit places), as in length-generalisation work (Kazemnejad et al. 2023; McLeish et al. 2024)
    position: Literal["rope", "none"] = "rope"
    rope_theta: float = 10000.0
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)  # Llama 3.1's long-context RoPE
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = field(default=0.02, metadata=NOT_IN_WEIGHTS)
    # forwards without a KV cache: FlexAttention for sliding/S2 models on CUDA (auto), always (flex), never (sdpa)
    attention_backend: Literal["auto", "sdpa", "flex"] = field(default="auto", metadata=NOT_IN_WEIGHTS)
    attention: AttentionConfig = slot(ATTENTION_KINDS, "gqa")
    ffn: FFNConfig = slot(FFN_KINDS, "swiglu")
    abacus: AbacusConfig = field(default_factory=AbacusConfig)  # digit-place embeddings (lmlab.models.abacus)
    recurrence: RecurrenceConfig = field(default_factory=RecurrenceConfig)  # recurrent depth (models.recurrent)
    # standard, or μP (lmlab.models.mup): width-dependent init, per-layer Adam LR, embedding/logit multipliers and
    # q·k/d_head attention, relative to the base width model.mup.base_width
    parametrization: Literal["standard", "mup"] = "standard"
    mup: MuPConfig = field(default_factory=MuPConfig)
    # the Hugging Face family an imported model came from; export writes it back where it differs from the family
    # the architecture implies (Phi-3's fused projections), else the implied one
    hf_architecture: str | None = field(default=None, metadata=NOT_IN_WEIGHTS)

    # Flat keys of earlier versions (config.yaml of older runs, checkpoints' meta.json, command lines),
    # read as their place in the component sections.
    LEGACY_KEYS: typing.ClassVar[dict[str, tuple[str, str]]] = {
        "ffn_hidden": ("ffn", "hidden"),
        "ffn_multiple_of": ("ffn", "multiple_of"),
        "qk_norm": ("attention", "qk_norm"),
        "attn_bias": ("attention", "qkv_bias"),
    }

    @property
    def head_dim(self) -> int:
        return self.head_size or self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def width_mult(self) -> float:
        """μP's width multiplier m_d = d_model / mup.base_width; 1 under the standard parametrization."""
        return self.mup.width_mult(self.d_model) if self.parametrization == "mup" else 1.0

    @classmethod
    def upgrade(cls, data: dict) -> dict:
        """Move legacy flat keys (``qk_norm``, ``ffn_hidden`` …) into their component sections."""
        data = dict(data)
        for old, (section, key) in cls.LEGACY_KEYS.items():
            if old not in data:
                continue
            value = data.pop(old)
            part = data.get(section)
            part = dict(part) if isinstance(part, dict) else {}
            if key in part and part[key] != value:
                raise ConfigError(f"model.{old} and model.{section}.{key} are both set; keep model.{section}.{key}")
            part[key] = value
            data[section] = part
        return data

    def validate(self) -> None:
        for key in ("d_model", "n_layers", "n_heads", "max_seq_len", "rope_theta", "norm_eps", "init_std"):
            _positive(f"model.{key}", getattr(self, key))
        if self.head_size is not None:
            _positive("model.head_size", self.head_size)
        elif self.d_model % self.n_heads:
            raise ConfigError(
                f"model.n_heads={self.n_heads} must divide model.d_model={self.d_model} (or set model.head_size)"
            )
        if self.n_kv_heads is not None:
            _positive("model.n_kv_heads", self.n_kv_heads)
            if self.n_heads % self.n_kv_heads:
                raise ConfigError(f"model.n_kv_heads={self.n_kv_heads} must divide model.n_heads={self.n_heads}")
        if self.vocab_size < 0:
            raise ConfigError(f"model.vocab_size={self.vocab_size} must be >= 0 (0: from the tokenizer)")
        self.attention.validate(self, "model.attention")
        self.ffn.validate(self, "model.ffn")
        self.rope_scaling.validate(self, "model.rope_scaling")
        self.abacus.validate(self, "model.abacus")
        self.recurrence.validate(self, "model.recurrence")
        if self.parametrization == "mup":
            self.mup.validate(self, "model.mup")
        elif self.mup != MuPConfig():
            raise ConfigError(
                "model.mup is set but model.parametrization=standard; set model.parametrization=mup or remove model.mup"
            )


@dataclass
class TokenizerConfig:
    """Either load a ``tokenizer.json`` (``path``) or train a byte-level BPE on the run's data."""

    path: str | None = None
    vocab_size: int = 4096
    min_frequency: int = 2
    train_docs: int = 20000  # documents used to train the tokenizer
    split_digits: bool = False  # a trained BPE gives every digit its own token (a loaded one keeps its own)

    def validate(self) -> None:
        _positive("tokenizer.vocab_size", self.vocab_size)
        _positive("tokenizer.min_frequency", self.min_frequency)
        _positive("tokenizer.train_docs", self.train_docs)
        if self.vocab_size < 300 and self.path is None:
            raise ConfigError(f"tokenizer.vocab_size={self.vocab_size} must be >= 300 (256 bytes + specials)")


@dataclass
class SyntheticDataConfig:
    """A built-in synthetic world (``lmlab.data.synthetic``), generated by our own code."""

    world: str = "stories"
    n_docs: int = 20000
    seed: int = 0
    subset: str | None = None  # a world's named subset, e.g. one language of the "languages" world

    def validate(self, key: str = "data.synthetic") -> None:
        _positive(f"{key}.n_docs", self.n_docs)


@dataclass
class MixtureSourceConfig:
    """One source of a data mixture: a synthetic world (or one of its subsets), or local files."""

    name: str = ""
    weight: float = 1.0
    synthetic: SyntheticDataConfig | None = None
    files: list[str] = field(default_factory=list)


@dataclass
class DataConfig:
    """Where the training tokens come from.

    ``source``: ``synthetic`` (generate a world), ``files`` (tokenize local .txt/.jsonl/
    .parquet files) or ``prepared`` (shards already written by ``lmlab data prepare``).
    """

    source: Literal["synthetic", "files", "prepared", "mixture"] = "synthetic"
    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)
    mixture: list[MixtureSourceConfig] = field(default_factory=list)
    mixture_temperature: float = 1.0  # sampling ratio p_i ∝ weight_i^(1/T)
    mixture_temperature_end: float | None = None  # Cooldown: T moves linearly to this by the last step
    mixture_by_size: bool = False  # weight_i × the source's training tokens (p_i ∝ n_i^(1/T))
    mixture_balance: Literal["sample", "upweight"] = "sample"  # upweight: draw by size, weight the loss p_i/q_i
    # Continual pre-training: a share of rows from the parent's data (init_from's, or replay_dir), whose validation
    # loss is logged as val_loss/parent; 0 tracks that loss without replaying. None: off.
    replay_fraction: float | None = None
    replay_dir: str | None = None  # a prepared data directory to replay (default: the init_from run's data)
    files: list[str] = field(default_factory=list)
    val_files: list[str] = field(default_factory=list)  # the validation split (else val_fraction of files)
    text_field: str = "text"
    # how a .txt file becomes documents: at blank lines, at a separator line, in chunks, or whole
    txt_documents: Literal["paragraphs", "separator", "chunks", "file"] = "paragraphs"
    txt_separator: str = ""
    txt_chunk_chars: int = 4096
    prepared_dir: str | None = None
    val_fraction: float = 0.05
    num_workers: int = 2
    seed: int = 0

    def validate(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction={self.val_fraction} must be in [0, 1)")
        _positive("data.num_workers", self.num_workers, allow_zero=True)
        _positive("data.txt_chunk_chars", self.txt_chunk_chars)
        if self.txt_documents == "separator" and not self.txt_separator.strip():
            raise ConfigError("data.txt_documents=separator needs data.txt_separator (the line that ends a document)")
        if self.val_files and self.source != "files":
            raise ConfigError(f"data.val_files is for data.source=files (it is {self.source})")
        if self.source == "files" and not self.files:
            raise ConfigError(
                "data.source=files needs data.files (a list of .txt/.jsonl/.json/.csv/.parquet paths or save_to_disk folders)"
            )
        if self.source == "prepared" and not self.prepared_dir:
            raise ConfigError("data.source=prepared needs data.prepared_dir")
        self.synthetic.validate()
        if self.replay_fraction is not None and not 0.0 <= self.replay_fraction < 1.0:
            raise ConfigError(f"data.replay_fraction={self.replay_fraction} must be in [0, 1)")
        if self.replay_dir and self.replay_fraction is None:
            raise ConfigError(
                "data.replay_dir is set but data.replay_fraction is not (0 only tracks the parent's loss)"
            )
        if self.source == "mixture" and self.replay_fraction is not None:
            raise ConfigError(
                "data.replay_fraction is for a single data source; with a mixture, add the old data as a source"
            )
        if self.source == "mixture":
            self._validate_mixture()
        else:
            mixture_only = {
                "mixture_temperature_end": self.mixture_temperature_end is not None,
                "mixture_by_size": self.mixture_by_size,
                "mixture_balance": self.mixture_balance != "sample",
            }
            for key in (k for k, is_set in mixture_only.items() if is_set):
                raise ConfigError(f"data.{key} applies to data.source=mixture (this run's source is {self.source})")

    def _validate_mixture(self) -> None:
        if len(self.mixture) < 1:
            raise ConfigError("data.source=mixture needs data.mixture: a list of sources with name and weight")
        names = [m.name for m in self.mixture]
        for i, m in enumerate(self.mixture):
            if not m.name:
                raise ConfigError(f"data.mixture[{i}].name is required")
            _positive(f"data.mixture[{i}].weight", m.weight)
            if (m.synthetic is None) == (not m.files):
                raise ConfigError(f"data.mixture[{i}] ({m.name}) needs exactly one of synthetic or files")
            if m.synthetic is not None:
                m.synthetic.validate(f"data.mixture[{i}].synthetic")
        if len(set(names)) != len(names):
            raise ConfigError(f"data.mixture names must be unique, got {names}")
        _positive("data.mixture_temperature", self.mixture_temperature)
        if self.mixture_temperature_end is not None:
            _positive("data.mixture_temperature_end", self.mixture_temperature_end)


@dataclass
class MuonConfig:
    """Muon / NorMuon for the hidden matrices when ``optim.name: muon`` (docs/science.md §22).

    ``lr`` None: ``optim.lr`` (natural with ``adjust_lr: match_rms_adamw``, which gives Muon's update AdamW's
    RMS); Jordan's ``original`` convention wants its own, larger LR (0.02 in his runs). ``weight_decay`` None:
    ``optim.weight_decay``. The schedule scales this LR like AdamW's.
    """

    lr: float | None = None
    momentum: float = 0.95
    nesterov: bool = True
    ns_steps: int = 5
    adjust_lr: Literal["original", "match_rms_adamw"] = "match_rms_adamw"
    weight_decay: float | None = None
    normuon: bool = False  # NorMuon's per-row second-moment normalisation (Li et al. 2025)
    normuon_beta2: float = 0.95
    ns_dtype: Literal["auto", "bf16", "fp32"] = "auto"  # Newton–Schulz precision; auto: bf16 on GPUs, fp32 on CPUs

    def validate(self) -> None:
        if self.lr is not None:
            _positive("optim.muon.lr", self.lr)
        if self.weight_decay is not None:
            _positive("optim.muon.weight_decay", self.weight_decay, allow_zero=True)
        _positive("optim.muon.ns_steps", self.ns_steps)
        for key in ("momentum", "normuon_beta2"):
            value = getattr(self, key)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"optim.muon.{key}={value} must be in [0, 1)")


@dataclass
class OptimConfig:
    """The optimizer: AdamW, or Muon for the hidden matrices with AdamW for the rest (``name: muon``).

    AdamW's weight decay skips norms, biases and embeddings unless ``decay_embeddings``.
    """

    name: Literal["adamw", "muon"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping
    decay_embeddings: bool = False
    fused: bool | None = None  # None: fused when the device supports it (AdamW only)
    muon: MuonConfig = field(default_factory=MuonConfig)

    def validate(self) -> None:
        _positive("optim.lr", self.lr, allow_zero=True)
        self.muon.validate()
        if self.name != "muon" and self.muon != MuonConfig():
            changed = [
                f.name
                for f in dataclasses.fields(MuonConfig)
                if getattr(self.muon, f.name) != getattr(MuonConfig(), f.name)
            ]
            raise ConfigError(
                f"optim.muon.{changed[0]} is set but optim.name={self.name!r}; set optim.name=muon or remove optim.muon"
            )
        if self.name == "muon" and self.fused:
            raise ConfigError("optim.fused applies to AdamW; Muon has no fused kernel (unset optim.fused)")
        _positive("optim.weight_decay", self.weight_decay, allow_zero=True)
        _positive("optim.eps", self.eps)
        _positive("optim.grad_clip", self.grad_clip, allow_zero=True)
        for i, b in enumerate(self.betas):
            if not 0.0 <= b < 1.0:
                raise ConfigError(f"optim.betas[{i}]={b} must be in [0, 1)")


@dataclass
class ScheduleConfig:
    """LR schedule: warmup, then constant / linear / cosine / WSD down to ``min_lr_ratio``·lr; ``power`` (the Power
    scheduler, LR capped by a power law of the tokens seen) or ``rewarm`` (cosine, restart, re-warm, re-decay)."""

    name: Literal["constant", "linear", "cosine", "wsd", "power", "rewarm"] = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2  # WSD and power: fraction of the steps spent decaying
    decay_shape: Literal["linear", "cosine", "sqrt"] = "linear"  # WSD and power decay shape
    power_a: float = 4.6  # power: LR = min(optim.lr, batch_sequences · a · tokens^b)
    power_b: float = -0.51
    restart_fraction: float = 0.5  # rewarm: where the first cosine ends, as a fraction of the steps
    rewarm_steps: int = 0  # rewarm: linear re-warmup from the minimum back to restart_lr_ratio·lr
    restart_lr_ratio: float = 1.0

    def validate(self) -> None:
        if self.warmup_steps < 0:
            raise ConfigError(f"schedule.warmup_steps={self.warmup_steps} must be >= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"schedule.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        if not 0.0 < self.decay_fraction <= 1.0:
            raise ConfigError(f"schedule.decay_fraction={self.decay_fraction} must be in (0, 1]")
        if not self.power_a > 0 or not self.power_b < 0:
            raise ConfigError(
                f"schedule.power_a={self.power_a} must be > 0 and schedule.power_b={self.power_b} < 0 (the LR falls "
                "as a power of the tokens seen)"
            )
        if not 0.0 < self.restart_fraction < 1.0:
            raise ConfigError(f"schedule.restart_fraction={self.restart_fraction} must be in (0, 1)")
        if self.rewarm_steps < 0 or not self.restart_lr_ratio > 0:
            raise ConfigError("schedule.rewarm_steps must be >= 0 and schedule.restart_lr_ratio > 0")


@dataclass
class EvalTaskConfig:
    """One task evaluated during training (``train.evals``): an lm-evaluation-harness task by name (the
    synthetic worlds' ``lmlab_*`` tasks are built in; others come from lm-eval or ``include_path``)."""

    task: str = ""
    every: int = 0  # steps between evaluations (and at the last step); 0: train.eval_every
    limit: float | None = None  # documents per evaluation (a fraction if < 1); None: all
    num_fewshot: int | None = None
    batch_size: int = 16
    metadata: dict[str, Any] = field(default_factory=dict)  # passed to the task (e.g. a world's seed)
    include_path: list[str] = field(default_factory=list)

    def validate(self, key: str = "train.evals[]") -> None:
        if not self.task:
            raise ConfigError(f"{key}.task must name an lm-eval task (e.g. lmlab_facts_mc)")
        _positive(f"{key}.every", self.every, allow_zero=True)
        _positive(f"{key}.batch_size", self.batch_size)
        if self.limit is not None and not self.limit > 0:
            raise ConfigError(f"{key}.limit={self.limit} must be > 0 (a count, or a fraction if < 1)")
        if self.num_fewshot is not None:
            _positive(f"{key}.num_fewshot", self.num_fewshot, allow_zero=True)
        for path in self.include_path:
            if not Path(path).is_dir():
                raise ConfigError(f"{key}.include_path: {path} is not a directory")


@dataclass
class TrainConfig:
    """The loop: steps, batch geometry, precision, evaluation and checkpoint cadence.

    ``compile``: ``false``; ``true`` or ``blocks``: ``torch.compile`` each block in place; ``full``: the whole
    training forward (embedding, blocks, head and the token loss of ``objective.loss_impl``) as one graph with
    ``fullgraph=True``, so a graph break is an error, not a silent slowdown, and static shapes (each new batch
    shape compiles once: keep them fixed, e.g. packed rows). ``full`` is for one process
    (``distributed.strategy=none``); evaluation forwards stay eager. Parameter names never change.
    """

    steps: int = 1000
    micro_batch_size: int = 16
    grad_accum: int = 1
    global_batch_size: int = 0  # rows per optimizer step; 0: micro_batch_size × grad_accum × world size
    seq_len: int = 256
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    compile: bool | Literal["blocks", "full"] = False  # true == blocks
    float8: bool = False  # float8 matmuls in the block linears (torchao; GPUs of compute capability >= 8.9)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = 0  # torch intra-op threads on CPU; 0 leaves torch's default
    seed: int = 0
    eval_every: int = 100
    eval_tokens: int = 65536
    log_every: int = 10
    ckpt_every: int = 500
    keep_last: int = 2
    tensorboard: bool = False  # the same as listing tensorboard in trackers
    # mirror metrics, the resolved config and the summary to experiment trackers (lmlab.train.trackers)
    trackers: list[Literal["tensorboard", "wandb", "mlflow"]] = field(default_factory=list)
    tracker_project: str = "lmlab"  # W&B project / MLflow experiment (WANDB_PROJECT / MLFLOW_EXPERIMENT_NAME win)
    progress: bool = True
    evals: list[EvalTaskConfig] = field(default_factory=list)  # downstream tasks during training

    @property
    def tracker_names(self) -> list[str]:
        """The trackers to start: ``trackers``, with ``tensorboard: true`` as one of them."""
        return list(dict.fromkeys([*self.trackers, *(["tensorboard"] if self.tensorboard else [])]))

    def validate(self) -> None:
        for key in ("steps", "micro_batch_size", "grad_accum", "seq_len", "eval_every", "eval_tokens"):
            _positive(f"train.{key}", getattr(self, key))
        for i, task in enumerate(self.evals):
            task.validate(f"train.evals[{i}]")
        for key in ("log_every", "ckpt_every", "keep_last"):
            _positive(f"train.{key}", getattr(self, key))
        _positive("train.global_batch_size", self.global_batch_size, allow_zero=True)
        _positive("train.threads", self.threads, allow_zero=True)
        if self.compile not in (False, True, "blocks", "full"):
            raise ConfigError(f"train.compile={self.compile!r} must be false, true (= blocks), blocks or full")
        if self.precision == "fp16" and self.device == "cpu":
            raise ConfigError("train.precision=fp16 needs a GPU; use bf16 or fp32 on CPU")
        if self.float8 and self.device == "cpu":
            raise ConfigError(
                "train.float8 needs an NVIDIA GPU of compute capability >= 8.9 (H100/H200, L4, RTX 40xx); "
                "this run is on the CPU (set train.float8=false)"
            )
        if self.float8 and self.precision != "bf16":
            raise ConfigError(
                f"train.float8 trains with bf16 autocast around the float8 matmuls; set train.precision=bf16 (not {self.precision})"
            )

    @property
    def compile_mode(self) -> str:
        """``none``, ``blocks`` or ``full`` (``compile: true`` is ``blocks``)."""
        if self.compile is True:
            return "blocks"
        return self.compile or "none"


@dataclass
class SampleConfig:
    """Samples written to ``samples.txt`` at the end of a run."""

    prompts: list[str] = field(default_factory=lambda: ["Once upon a time", "The", "One day,"])
    max_new_tokens: int = 64
    temperature: float = 0.8
    top_k: int = 50  # 0: off
    top_p: float = 1.0

    def validate(self) -> None:
        _positive("sample.max_new_tokens", self.max_new_tokens)
        _positive("sample.temperature", self.temperature, allow_zero=True)
        _positive("sample.top_k", self.top_k, allow_zero=True)
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"sample.top_p={self.top_p} must be in (0, 1]")


@dataclass
class GoldfishConfig:
    """Goldfish loss (docs/science.md §5): drop ~1/k of the targets from the loss, chosen by a hash of the context."""

    enabled: bool = False
    k: int = 4
    strategy: Literal["hash", "static"] = "hash"
    context_width: int = 13
    start: int = 0

    def validate(self) -> None:
        if self.k < 2:
            raise ConfigError(f"objective.goldfish.k={self.k} must be >= 2")
        _positive("objective.goldfish.context_width", self.context_width)
        _positive("objective.goldfish.start", self.start, allow_zero=True)


@dataclass
class DistillConfig:
    """Knowledge distillation from a teacher (an lmlab run dir or an imported HF run) with the same tokenizer."""

    teacher: str | None = None
    kind: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    beta: float = 0.5  # generalized JSD mixture weight
    temperature: float = 1.0
    alpha: float = 0.5  # total = alpha * KD + (1 - alpha) * CE
    topk_cache: int = 0  # >0: cache the teacher's top-k log-probs on disk and run the teacher once

    def validate(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"objective.distill.alpha={self.alpha} must be in [0, 1]")
        _positive("objective.distill.temperature", self.temperature)
        if not 0.0 < self.beta < 1.0:
            raise ConfigError(f"objective.distill.beta={self.beta} must be in (0, 1)")
        _positive("objective.distill.topk_cache", self.topk_cache, allow_zero=True)


@dataclass
class ObjectiveConfig:
    """Switches on the token-level LM objective, combinable; each component is logged.

    ``coverage_n > 1`` swaps the token cross-entropy for the per-sequence Direct Coverage Optimization loss
    −log(1 − (1 − p)^N) with N = ``coverage_n`` (docs/science.md §20; ``lmlab.objectives.coverage``).

    ``loss_impl`` is how the output projection and the token loss are computed (same loss, different memory):
    ``standard`` forms the [B, T, V] logits (and, in eager mode, writes the loss's gradient over them:
    ``lmlab.objectives.inplace_ce``); ``chunked`` evaluates ``loss_chunk_tokens`` tokens at a time and
    recomputes their logits in backward; ``fused`` computes each chunk's gradient in the forward and never
    holds more than one chunk's logits (docs/science.md Appendix B). Distillation and ``coverage_n > 1`` need
    the full logits, so they take ``standard``.
    """

    label_smoothing: float = 0.0
    z_loss: float = 0.0  # PaLM z-loss coefficient (1e-4 in the paper)
    neftune_alpha: float = 0.0  # NEFTune noise (training only); 0 = off
    goldfish: GoldfishConfig = field(default_factory=GoldfishConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    coverage_n: int = 1  # 1: cross-entropy; N > 1: DCO for pass@N with this N
    loss_impl: Literal["standard", "chunked", "fused"] = "standard"
    loss_chunk_tokens: int = 4096  # tokens per chunk for loss_impl chunked / fused

    def validate(self) -> None:
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"objective.label_smoothing={self.label_smoothing} must be in [0, 1)")
        _positive("objective.z_loss", self.z_loss, allow_zero=True)
        _positive("objective.neftune_alpha", self.neftune_alpha, allow_zero=True)
        self.goldfish.validate()
        self.distill.validate()
        if self.coverage_n < 1:
            raise ConfigError(f"objective.coverage_n={self.coverage_n} must be >= 1 (1 = plain cross-entropy)")
        token_level = {
            "label_smoothing": self.label_smoothing > 0,
            "z_loss": self.z_loss > 0,
            "goldfish.enabled": self.goldfish.enabled,
            "distill.teacher": self.distill.teacher is not None,
        }
        clash = [f"objective.{k}" for k, on in token_level.items() if on]
        if self.coverage_n > 1 and clash:
            raise ConfigError(
                f"objective.coverage_n={self.coverage_n} is a loss on whole sequences and does not combine with the "
                f"token-level {', '.join(clash)}; turn those off or set objective.coverage_n=1"
            )
        _positive("objective.loss_chunk_tokens", self.loss_chunk_tokens)
        needs_logits = [
            key
            for key, on in (
                (f"objective.distill.teacher={self.distill.teacher!r}", self.distill.teacher is not None),
                (f"objective.coverage_n={self.coverage_n}", self.coverage_n > 1),
            )
            if on
        ]
        if self.loss_impl != "standard" and needs_logits:
            raise ConfigError(
                f"objective.loss_impl={self.loss_impl} never forms the full logits, which "
                f"{' and '.join(needs_logits)} needs; set objective.loss_impl=standard"
            )


@dataclass
class SFTConfig:
    """Supervised fine-tuning data: conversations (messages, ShareGPT), prompt/completion or Alpaca records in any
    format ``lmlab.data.rows`` reads (JSONL, JSON, CSV, parquet, a save_to_disk folder, a datasets id)."""

    train_file: str | None = None
    val_file: str | None = None
    columns: dict[str, str] = field(default_factory=dict)  # the dataset's column -> the name lmlab reads
    loss_on: Literal["assistant", "all"] = "assistant"
    packing: bool = True
    overlong: Literal["truncate", "drop"] = "truncate"
    chat_template: str | None = None  # None: the tokenizer's own, else lmlab's built-in template
    epochs: float = 0.0  # > 0: set train.steps from the dataset size
    # start each reply with a control token (docs/science.md §28): single: [refuse] / [respond] by the record's
    # 'refuse' label; category: a refusal's '[category]' token instead of [refuse]
    refusal_tokens: Literal["none", "single", "category"] = "none"
    # write training_order.jsonl: every training record with the draws that served it, for `lmlab eval
    # provenance` (it copies the records' text into the run directory; false for data that must not be copied)
    training_order: bool = True

    def validate(self) -> None:
        _positive("sft.epochs", self.epochs, allow_zero=True)


@dataclass
class AlignConfig:
    """Preference optimization (docs/science.md §7); data in TRL's formats from any source ``lmlab.data.rows``
    reads."""

    train_file: str | None = None
    val_file: str | None = None
    columns: dict[str, str] = field(default_factory=dict)  # the dataset's column -> prompt / chosen / rejected
    loss: Literal["dpo", "ipo", "simpo", "ln_dpo", "orpo"] = "dpo"
    beta: float = 0.1
    gamma: float = 0.5  # SimPO target margin
    label_smoothing: float = 0.0  # cDPO
    orpo_lambda: float = 0.1
    sft_weight: float = 0.0  # optional NLL on the chosen answer
    reference: str | None = None  # the frozen reference run (default: init_from)
    precompute_reference: bool = False
    identical_pairs: Literal["skip", "error"] = "skip"
    diagnostics_every: int = 50  # gradient-entanglement probe cadence (steps)
    max_prompt_len: int = 128
    max_len: int = 256

    def validate(self) -> None:
        if not self.beta > 0:
            raise ConfigError(f"align.beta={self.beta} must be > 0")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"align.label_smoothing={self.label_smoothing} must be in [0, 0.5)")
        _positive("align.sft_weight", self.sft_weight, allow_zero=True)
        _positive("align.orpo_lambda", self.orpo_lambda, allow_zero=True)
        if self.diagnostics_every < 0:
            raise ConfigError(f"align.diagnostics_every={self.diagnostics_every} must be >= 0 (0 disables the probe)")
        if self.max_prompt_len <= 0 or self.max_len <= self.max_prompt_len:
            raise ConfigError(
                f"align.max_prompt_len={self.max_prompt_len} must be > 0 and below align.max_len={self.max_len}"
            )


@dataclass
class RewardConfig:
    """Reward-model training (``lmlab reward train``): Bradley–Terry, optionally LM-regularised."""

    lm_weight: float = 0.0  # weight w of the chosen-answer text-generation loss (0: plain reward model)
    ood_file: str | None = None  # optional out-of-distribution preference JSONL for pairwise accuracy

    def validate(self) -> None:
        _positive("reward.lm_weight", self.lm_weight, allow_zero=True)


@dataclass
class UnlearnConfig:
    """Unlearning (``lmlab unlearn``) on a benchmark from ``lmlab unlearn bench prepare``: the forget split and the
    method (``lmlab.objectives.unlearning_methods``; its options sit under ``unlearn.method``)."""

    bench: str | None = None  # the benchmark directory
    split: str = "forget05"  # forget01 | forget05 | forget10
    method: UnlearningMethod = slot(UNLEARNING_METHODS, "npo")
    weight_mask: WeightMaskConfig = field(default_factory=WeightMaskConfig)  # WAGLE: update only attributed weights
    epochs: float = 10.0  # passes over the forget set; sets train.steps (0: train.steps as given)
    max_len: int = 128  # tokens of one question and answer
    eval_items: int = 0  # retain, world and holdout items scored by the evaluations (0: all; the forget split: all)
    stop_forget_quality: float = 0.0  # > 0: stop once forget quality (KS p-value vs the gold model) reaches it
    stop_utility_ratio: float = 0.0  # > 0: stop once model utility falls below this fraction of the target's

    def validate(self) -> None:
        self.method.validate("unlearn.method")
        self.weight_mask.validate("unlearn.weight_mask")
        _positive("unlearn.epochs", self.epochs, allow_zero=True)
        if self.max_len < 8:
            raise ConfigError(f"unlearn.max_len={self.max_len} must be >= 8")
        if self.eval_items < 0:
            raise ConfigError(f"unlearn.eval_items={self.eval_items} must be >= 0 (0: all)")
        if not 0.0 <= self.stop_forget_quality <= 1.0:
            raise ConfigError(f"unlearn.stop_forget_quality={self.stop_forget_quality} must be in [0, 1] (0: off)")
        if not 0.0 <= self.stop_utility_ratio < 1.0:
            raise ConfigError(f"unlearn.stop_utility_ratio={self.stop_utility_ratio} must be in [0, 1) (0: off)")


@dataclass
class DistributedConfig:
    """Multi-process training through torchrun (DDP or FSDP2)."""

    strategy: Literal["none", "ddp", "fsdp"] = "none"
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    activation_checkpointing: Literal["none", "full"] = "none"
    mixed_precision_param: Literal["fp32", "bf16"] = "fp32"
    timeout_s: float = 600.0  # collective timeout: a lost rank ends the job instead of hanging it

    def validate(self) -> None:
        _positive("distributed.timeout_s", self.timeout_s)


@dataclass
class RunConfig:
    """The whole run."""

    name: str = "run"
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    init_from: str | None = None  # start from the weights of an lmlab run dir (e.g. an imported HF model)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)  # LoRA / DoRA on init_from's frozen weights
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    unlearn: UnlearnConfig = field(default_factory=UnlearnConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)


# --------------------------------------------------------------------------- validation


def validate(cfg: RunConfig) -> RunConfig:
    """Check every section, then the rules that span sections; raise ``ConfigError`` naming the key."""
    for f in dataclasses.fields(cfg):
        section = getattr(cfg, f.name)
        if dataclasses.is_dataclass(section):
            section.validate()
    if not cfg.name.strip():
        raise ConfigError("name must not be empty")
    m, t, s = cfg.model, cfg.train, cfg.schedule
    if t.seq_len > m.max_seq_len:
        raise ConfigError(f"train.seq_len={t.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    if s.warmup_steps > t.steps:
        raise ConfigError(f"schedule.warmup_steps={s.warmup_steps} must be in [0, train.steps={t.steps}]")
    if s.name == "rewarm":
        restart = round(s.restart_fraction * t.steps)
        if not s.warmup_steps < restart < restart + s.rewarm_steps < t.steps - 1:
            raise ConfigError(
                f"schedule rewarm: the restart (step {restart} = restart_fraction·train.steps) must come after "
                f"warmup_steps={s.warmup_steps}, and the re-warmup (rewarm_steps={s.rewarm_steps}) must end before "
                f"the last step {t.steps - 1}"
            )
    if cfg.data.replay_fraction is not None and not (cfg.init_from or cfg.data.replay_dir):
        raise ConfigError(
            "data.replay_fraction replays the data of the run this one continues: set init_from (or data.replay_dir)"
        )
    if cfg.adapter.enabled and not cfg.init_from and not cfg.unlearn.bench:  # unlearn: the benchmark's target
        raise ConfigError(
            f"adapter.kind={cfg.adapter.kind} trains adapters on a frozen base model: set init_from to its run directory"
        )
    if cfg.adapter.quantize != "none" and cfg.distributed.strategy == "fsdp":
        raise ConfigError(
            f"adapter.quantize={cfg.adapter.quantize} (QLoRA) keeps 4-bit weights that FSDP cannot shard; "
            "use distributed.strategy=ddp or none"
        )
    if cfg.unlearn.method.needs_adapters and not cfg.adapter.enabled:
        raise ConfigError(
            f"unlearn.method.kind={cfg.unlearn.method.kind} trains its assistant as adapters on the starting model: "
            "set adapter.kind=lora (ULD's paper: adapter.rank=16 adapter.alpha=32 adapter.dropout=0.05)"
        )
    if m.parametrization == "mup" and cfg.optim.name == "muon":
        raise ConfigError(
            "model.parametrization=mup scales AdamW's per-layer learning rates; optim.name=muon sets its own "
            "update size per matrix (no μP rule here): use optim.name=adamw with μP"
        )
    if m.parametrization == "mup" and cfg.adapter.enabled:
        raise ConfigError(
            f"model.parametrization=mup has no learning-rate rule for adapter.kind={cfg.adapter.kind} matrices "
            "(one dimension is the rank, not the width); fine-tune a μP model with all weights trainable"
        )
    if cfg.adapter.enabled and cfg.optim.name == "muon":
        raise ConfigError("optim.name=muon orthogonalises whole weight matrices; train adapters with optim.name=adamw")
    if t.compile_mode == "full" and cfg.distributed.strategy != "none":
        raise ConfigError(
            f"train.compile=full compiles the whole forward in one process, but distributed.strategy="
            f"{cfg.distributed.strategy}; use train.compile=blocks with DDP / FSDP"
        )
    if t.compile_mode == "full" and isinstance(m.ffn, MoEConfig):
        raise ConfigError(
            "train.compile=full cannot trace model.ffn.kind=moe in one graph: how many tokens each expert gets "
            "depends on the routing; use train.compile=blocks"
        )
    return cfg


def _positive(key: str, value: float, allow_zero: bool = False) -> None:
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{key}={value} must be {bound}")


def model_config_diff(saved: ModelConfig | dict, current: ModelConfig) -> list[str]:
    """``key: saved vs current`` for every weight-defining model setting that differs (all keys, nested
    component sections included, except the ``NOT_IN_WEIGHTS`` ones). ``saved`` may be a dict from a
    checkpoint's meta.json, in this version's layout or an earlier flat one."""
    if isinstance(saved, dict):
        saved = from_dict(ModelConfig, saved, "model.")
    ours, theirs = _weight_settings(current), _weight_settings(saved)
    keys = sorted(set(ours) | set(theirs))
    return [f"{k}: checkpoint {theirs.get(k)!r} vs run {ours.get(k)!r}" for k in keys if ours.get(k) != theirs.get(k)]


def _weight_settings(cfg: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        if f.metadata.get("weights", True) is False:
            continue
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out.update(_weight_settings(value, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = value
    if isinstance(cfg, ModelConfig):
        out["n_kv_heads"] = cfg.kv_heads  # None and n_heads are the same model
    return out


def sanitize_run_name(name: str) -> str:
    """A run name usable as one directory name: letters, digits, ``.``, ``-``, ``_`` (others become ``-``),
    no leading dots or dashes, so ``name=../../x`` can never place a run outside ``runs/``."""
    clean = re.sub(r"[^\w.-]+", "-", name).strip("-.")
    return clean or "run"


# --------------------------------------------------------------------------- conversion


def from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from nested dicts, checking keys and types."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {type(data).__name__}")
    if hasattr(cls, "upgrade"):
        data = cls.upgrade(data)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=3)
            hint = f"; did you mean {', '.join(prefix + c for c in close)}?" if close else ""
            raise ConfigError(
                f"unknown config key '{full}'{hint} (valid keys: {', '.join(prefix + n for n in fields)})"
            )
        kinds = fields[key].metadata.get("slot")
        kwargs[key] = _slot_variant(kinds, value, full) if kinds else _coerce(hints[key], value, full)
    return cls(**kwargs)


def _slot_variant(kinds: dict[str, type], value: Any, key: str) -> Any:
    """The variant of a component slot named by ``value["kind"]`` (default: the registry's first kind)."""
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise ConfigError(f"{key} must be a mapping with a 'kind' (one of {', '.join(kinds)})")
    kind = value.get("kind", next(iter(kinds)))
    if kind not in kinds:
        raise ConfigError(f"{key}.kind={kind!r} is not a valid choice; valid choices: {', '.join(kinds)}")
    own = {f.name for f in dataclasses.fields(kinds[kind])}
    for option in value:
        owners = [k for k, cls in kinds.items() if option in {f.name for f in dataclasses.fields(cls)}]
        if option not in own and owners:
            raise ConfigError(
                f"{key}.{option} is an option of {key}.kind={'/'.join(owners)}, not of kind={kind} "
                f"({kind}'s options: {', '.join(sorted(own - {'kind'})) or 'none'})"
            )
    return from_dict(kinds[kind], value, key + ".")


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{key}={value!r} has the wrong type: expected {_type_name(tp)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}={value!r} is not a valid choice; valid choices: {', '.join(map(str, args))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r} has the wrong type: expected {_type_name(tp)}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key} must have {len(args)} elements, got {len(value)}")
            return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        out = [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r} has the wrong type: expected a mapping")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} has the wrong type: expected bool (true/false)")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}={value!r} has the wrong type: expected int")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{key}={value!r} has the wrong type: expected float")
        if not math.isfinite(number):
            raise ConfigError(f"{key}={value} must be a finite number")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}={value!r} has the wrong type: expected str")
    raise TypeError(f"unsupported config type {tp} for {key}")  # a bug in this module


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def to_dict(cfg: Any) -> dict:
    """Plain nested dict (tuples become lists) suitable for YAML/JSON."""

    def convert(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: convert(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [convert(x) for x in v]
        if isinstance(v, dict):
            return {k: convert(x) for k, x in v.items()}
        return v

    return convert(cfg)


# --------------------------------------------------------------------------- overrides and files


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a","b","c"], value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key=value (e.g. optim.lr=3e-4)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    # YAML reads "3e-4" as a string; floats are coerced by the typed loader.
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply dotted overrides to a nested dict in place and return it."""
    for text in overrides:
        path, value = parse_override(text)
        node: Any = data
        for part in path[:-1]:
            if isinstance(node, list):  # list element by index: data.mixture.0.weight=2
                node = _list_item(node, part, text)
                continue
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, (dict, list)):
                raise ConfigError(f"override '{text}': '{part}' is not a section")
            node = child
        if isinstance(node, list):
            index = _list_index(node, path[-1], text)
            node[index] = value
        else:
            node[path[-1]] = value
    return data


def _list_index(node: list, part: str, text: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"override '{text}': '{part}' is not an index of a list of {len(node)} items")
    return int(part)


def _list_item(node: list, part: str, text: str) -> Any:
    item = node[_list_index(node, part, text)]
    if not isinstance(item, (dict, list)):
        raise ConfigError(f"override '{text}': item {part} is not a section")
    return item


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key repeated in one mapping (plain YAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(f"duplicate key {key!r} at line {line} (first at line {seen[key]})")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping; a missing file, non-UTF-8 bytes, YAML syntax errors and duplicate keys are
    ``ConfigError``."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ConfigError(f"{p}:{line}: not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except ConfigError as err:
        raise ConfigError(f"{p}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{p}: not valid YAML: {err}".replace("\n", " ")) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections")
    return data


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Load a YAML config (or the defaults when ``path`` is None), apply overrides, validate."""
    data = load_yaml(path) if path is not None else {}
    _drop_dims_of_overridden_size(data, list(overrides))
    apply_overrides(data, list(overrides))
    _expand_named_size(data)
    try:
        return validate(from_dict(RunConfig, data))
    except ConfigError as err:
        if path is None or str(path) in str(err):
            raise
        raise ConfigError(f"{err} (in {path})") from None


def _drop_dims_of_overridden_size(data: dict, overrides: list[str]) -> None:
    """A ``model.size`` given on the command line beats dimensions written in the YAML file
    (explicit dimension overrides on the command line still beat the named size)."""
    if not any(o.split("=", 1)[0].strip() == "model.size" for o in overrides):
        return
    model = data.get("model")
    if isinstance(model, dict):
        for key in {k for dims in SIZES.values() for k in dims}:
            model.pop(key, None)


def _expand_named_size(data: dict) -> None:
    """Fill ``model`` dimensions from ``model.size``; explicit keys win."""
    model = data.get("model")
    if not isinstance(model, dict) or model.get("size") is None:
        return
    size = model["size"]
    if size not in SIZES:
        raise ConfigError(f"model.size={size!r} is not a named size; valid choices: {', '.join(SIZES)}")
    data["model"] = {**SIZES[size], **model}


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write ``cfg`` as YAML atomically (a temporary file renamed over ``path``, never through a symlink)."""
    write_text_atomic(path, dump_yaml(cfg))
