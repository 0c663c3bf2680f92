"""A function of the user's own code named on the command line as ``module:function`` (checkers, judges)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from lmlab.errors import UserError


def import_function(spec: str, flag: str) -> Callable[..., Any]:
    """The callable ``spec`` = ``module:function`` names; a wrong spec is a one-line error naming ``flag``."""
    module_name, sep, func_name = spec.partition(":")
    if not sep or not module_name or not func_name:
        raise UserError(f"{flag} {spec!r}: expected module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise UserError(
            f"{flag} {spec!r}: cannot import module {module_name!r} ({err}); is it on PYTHONPATH?"
        ) from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise UserError(f"{flag} {spec!r}: module {module_name!r} has no function {func_name!r}")
    return func
