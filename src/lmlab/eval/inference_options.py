"""The inference-time switches of ``lmlab generate`` and ``lmlab eval``: top-k attention (each query keeps its
k best keys, ``lmlab.models.attention.topk_attention``) and the iteration count of a recurrent-depth model
(``lmlab.models.recurrent``). One definition of the flags, their checks and how they apply to a model."""

from __future__ import annotations

import argparse
from contextlib import ExitStack

from torch import nn

from lmlab.errors import UserError
from lmlab.models.attention import topk_attention_of
from lmlab.models.recurrent import Recurrence, recurrence_iterations


def add_inference_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--attention-topk", type=int, default=None, metavar="K", help="each query attends to its K best keys only"
    )
    parser.add_argument(
        "--iterations", type=int, default=None, metavar="R", help="core iterations of a recurrent-depth model"
    )


def check_inference_options(args: argparse.Namespace, model: nn.Module) -> None:
    """One ``UserError`` for a bad value or a flag the model cannot use."""
    if args.attention_topk is not None and args.attention_topk < 1:
        raise UserError(f"--attention-topk={args.attention_topk} must be >= 1")
    if args.iterations is not None:
        if args.iterations < 1:
            raise UserError(f"--iterations={args.iterations} must be >= 1")
        if not any(isinstance(m, Recurrence) for m in model.modules()):
            raise UserError("--iterations needs a recurrent-depth model (model.recurrence.enabled); this one has none")


def inference_options(args: argparse.Namespace, model: nn.Module, *, topk: bool = True) -> ExitStack:
    """A context in which ``model`` runs with the flags' settings (``topk=False``: the caller applies top-k
    itself, as ``generate`` does after reading the prompt densely)."""
    check_inference_options(args, model)
    stack = ExitStack()
    stack.enter_context(recurrence_iterations(model, args.iterations))
    if topk:
        stack.enter_context(topk_attention_of(model, args.attention_topk))
    return stack
