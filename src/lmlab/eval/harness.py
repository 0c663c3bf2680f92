"""An lm-evaluation-harness model backed by an lmlab model: ``lm_eval`` tasks on a run with no export.

``LmlabLM`` implements lm-eval's three request types on lmlab's own decoder:

- ``loglikelihood``: lm-eval's tokenisation convention (``TemplateLM``: the context and the continuation
  are encoded together and split, an empty context is conditioned on the prefix token), batched with
  right padding (causal attention makes padding after a row's tokens harmless);
- ``loglikelihood_rolling``: lm-eval's disjoint rolling windows of the model's context length;
- ``generate_until``: lmlab's KV-cache generation, batched over prompts of any length (left padding
  under the cache's key mask), cut at the first stop string.

By default every context starts with the tokenizer's ``document_prefix`` (``add_bos_token=True``): the
EOS token that every document follows in lmlab's training data, or the BOS a foreign tokenizer adds. The
tokenizer ``lmlab export-hf`` writes adds the same prefix, so lm-eval's ``hf`` model on the export scores
the same tokens with its defaults; ``add_bos_token=False`` scores the bare text. It is registered as ``lmlab`` (``--model lmlab --model_args run=RUN``) when this
module is imported; ``python -m lmlab.eval.lm_eval_cli`` is lm-eval's own CLI with it registered.

Distributed (in-loop evaluation under ``torchrun``): lm-eval gives each rank a shard of the documents
and pads the request counts so ranks run the same number of batches; the gathers below use
``torch.distributed``. Every rank then runs every forward pass (FSDP needs it), and generation always
runs ``max_gen_toks`` steps (no rank may stop early).
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lm_eval.models  # noqa: F401  (lm-eval's own models first: it loads them only into an empty registry)
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from torch import nn

from lmlab.data.chat import end_of_turn_id, resolve_template
from lmlab.data.tokenizer import TextTokenizer
from lmlab.errors import UserError
from lmlab.models.generation import generate
from lmlab.train.pretrained import load_model
from lmlab.train.runtime import resolve_device

TASKS_DIR = Path(__file__).parent / "tasks"  # the synthetic worlds' task YAMLs


def _flag(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


@register_model("lmlab")
class LmlabLM(TemplateLM):
    """lm-eval ``LM`` over an lmlab model; build it from a run (``run=``) or, in-loop, with ``from_model``."""

    def __init__(
        self,
        run: str | None = None,
        device: str = "cpu",
        batch_size: int | str = 16,
        max_batch_size: int | None = None,
        add_bos_token: bool | str = True,
        max_length: int | None = None,
        seed: int | str = 1234,
        *,
        model: nn.Module | None = None,
        tokenizer: TextTokenizer | None = None,
        **unused: Any,
    ) -> None:
        super().__init__()
        if model is None:
            if run is None:
                raise UserError("the lmlab lm-eval model needs run=RUN_DIR (a run directory or checkpoint)")
            if str(device).startswith("cuda") and not torch.cuda.is_available():
                # lm-eval's CLI asks for cuda:0 unless told otherwise; like its hf model, run where we can
                print(f"lmlab: device={device} but CUDA is not available; evaluating on cpu", file=sys.stderr)
                device = "cpu"
            model, cfg, tokenizer = load_model(run, device=resolve_device(str(device), "device", UserError))
            max_length = max_length or cfg.model.max_seq_len
            if tokenizer is None:
                raise UserError(f"{run}: the run has no tokenizer.json")
        if tokenizer is None or max_length is None:
            raise ValueError("from a model, LmlabLM needs its tokenizer and max_length")
        self.model = model
        self.tokenizer = tokenizer
        self._device = next(model.parameters()).device
        self.batch_size = 16 if str(batch_size).startswith("auto") else int(batch_size)
        self.add_bos_token = _flag(add_bos_token)
        self._max_length = int(max_length)
        self.run = run
        # sampled generations draw from their own generator: reproducible, and an in-loop evaluation leaves the
        # training's global random state alone
        self.generator = torch.Generator(device="cpu").manual_seed(int(seed))
        if dist.is_available() and dist.is_initialized():
            self._rank, self._world_size = dist.get_rank(), dist.get_world_size()

    @classmethod
    def from_model(cls, model: nn.Module, tokenizer: TextTokenizer, max_length: int, **options: Any) -> LmlabLM:
        """Wrap a live model (in-loop evaluation): no loading, the caller's ranks and device."""
        return cls(model=model, tokenizer=tokenizer, max_length=max_length, **options)

    # ------------------------------------------------------------------ what lm-eval asks of a model

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "source", "lmlab"))

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.tokenizer.encode(string)

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True)

    # ------------------------------------------------------------------ chat (lm-eval's --apply_chat_template)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """The run's chat template (its tokenizer's own, else lmlab's built-in one) when lm-eval asks for one."""
        if chat_template is False or chat_template is None:
            return None
        return resolve_template(self.tokenizer, None if chat_template is True else chat_template).source

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        chat = resolve_template(self.tokenizer)
        return chat.render(chat_history, add_generation_prompt=add_generation_prompt, tokenizer=self.tokenizer)

    def _stop_ids(self) -> set[int]:
        """Tokens that end a generation: the tokenizer's stop tokens (EOS, an end of turn) and lmlab's chat end."""
        return {*getattr(self.tokenizer, "stop_ids", ()), self.eot_token_id, end_of_turn_id(self.tokenizer)}

    @property
    def prefix_token_id(self) -> int:
        """The token an empty context (and each rolling window) is conditioned on: the document start, or EOS
        for a tokenizer that starts documents with nothing (lm-eval's own choice then)."""
        return (self.tokenizer.document_prefix or [self.eot_token_id])[-1]

    def _prefix_for(self, context: list[int]) -> list[int]:
        """The document prefix before ``context``, unless lm-eval already put it there (an empty context)."""
        prefix = self.tokenizer.document_prefix
        if not self.add_bos_token or not prefix or context[: len(prefix)] == prefix:
            return []
        return prefix

    # ------------------------------------------------------------------ scoring

    @torch.no_grad()
    def _score(self, rows: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(context ids, continuation ids) -> (sum log p(continuation), continuation is the greedy path)."""
        fulls = [
            (self._prefix_for(context) + context + continuation)[-(self.max_length + 1) :]
            for context, continuation in rows
        ]
        width = max(len(full) - 1 for full in fulls)
        batch = torch.zeros(len(rows), width, dtype=torch.long, device=self.device)  # [B, T], right-padded
        for i, full in enumerate(fulls):
            batch[i, : len(full) - 1] = torch.tensor(full[:-1], dtype=torch.long)
        logp = F.log_softmax(self.model(batch).float(), dim=-1)  # [B, T, V]
        out = []
        for i, (full, (_, continuation)) in enumerate(zip(fulls, rows)):
            end = len(full) - 1
            n = min(len(continuation), end)  # a continuation longer than the window: its last tokens
            targets = torch.tensor(full[-n:], dtype=torch.long, device=self.device)  # [n]
            span = logp[i, end - n : end]  # [n, V]: position j predicts token j + 1
            picked = span.gather(-1, targets[:, None]).squeeze(-1)
            out.append((float(picked.sum()), bool((span.argmax(-1) == targets).all())))
        return out

    def _batches(self, items: list) -> Iterator[list]:
        for start in range(0, len(items), self.batch_size):
            yield items[start : start + self.batch_size]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        # longest first: batches of similar lengths waste little padding (and OOM shows up at once)
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1] + requests[i][2]))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        for chunk in self._batches(order):
            scored = self._score([(requests[i][1], requests[i][2]) for i in chunk])
            for i, res in zip(chunk, scored):
                results[i] = res
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], res)
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Sum of log p over a whole text, scored in disjoint windows of the context length."""
        windows, owner = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            for context, continuation in map(
                make_disjoint_window,
                get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                # the window already starts with the prefix token: add none
                windows.append((None, context, continuation))
                owner.append(i)
        add_bos, self.add_bos_token = self.add_bos_token, False
        try:
            scores = self._loglikelihood_tokens(windows)
        finally:
            self.add_bos_token = add_bos
        totals = [0.0] * len(requests)
        for i, (logp, _) in zip(owner, scores):
            totals[i] += logp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ------------------------------------------------------------------ generation

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy or sampled continuations, batched by lmlab's KV-cache generation, cut at ``until``."""
        results: list[str | None] = [None] * len(requests)
        args = [req.args for req in requests]
        order = sorted(range(len(args)), key=lambda i: -len(args[i][0]))
        distributed = self.world_size > 1
        for chunk in self._batches(order):
            kwargs = copy.deepcopy(args[chunk[0]][1])
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", 256))
            greedy = not kwargs.get("do_sample", False) or float(kwargs.get("temperature", 1.0)) == 0.0
            temperature = 0.0 if greedy else float(kwargs.get("temperature", 1.0))
            keep = self.max_length - max_new
            prompts = []
            for i in chunk:
                context = self.tok_encode(args[i][0])
                prompts.append((self._prefix_for(context) + context)[-keep:])

            stop_ids = self._stop_ids()

            def stop(new_ids: list[int], until=until, stop_ids=stop_ids) -> bool:
                return new_ids[-1] in stop_ids or any(s in self.tok_decode(new_ids) for s in until)

            outputs = generate(
                self.model,
                prompts,
                max_new_tokens=max_new,
                temperature=temperature,
                top_p=float(kwargs.get("top_p", 1.0) or 1.0),
                top_k=int(kwargs.get("top_k", 0) or 0),
                eos_id=None if distributed else self.eot_token_id,
                stop=None if distributed else stop,
                generator=self.generator,
            )
            for i, new_ids in zip(chunk, outputs):
                ends = [j for j, token in enumerate(new_ids) if token in stop_ids]
                new_ids = new_ids[: ends[0]] if ends else new_ids
                text = self.tok_decode(new_ids)
                for s in until:
                    text = text.split(s)[0]
                results[i] = text
                self.cache_hook.add_partial("generate_until", args[i], text)
        return results  # type: ignore[return-value]

    # ------------------------------------------------------------------ ranks

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        parts = [torch.zeros_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor)
        return torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)

    def gather_object(self, obj: Any, dst: int = 0) -> list[Any] | None:
        if self.world_size == 1:
            return [obj]
        parts: list[Any] = [None] * self.world_size
        dist.all_gather_object(parts, obj)  # all ranks: gloo has no gather_object to one rank on every backend
        return parts if self.rank == dst else None

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()
