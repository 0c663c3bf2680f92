"""Synthetic worlds: generators of training text written by our own code.

A *world* is any object with a ``name: str`` and a method
``documents(seed: int, n_docs: int | None = None) -> Iterator[str]``. Documents must be a
pure function of ``(seed, doc_index)`` so that document ``i`` is the same however many are
generated, and the iterator must stream (``n_docs=None`` is an endless stream), so corpora of
hundreds of millions of tokens never sit in memory.

A world may also define an integer ``version`` and bump it whenever its text changes: the
pipeline's shard cache key includes it, so stale cached shards are not reused.

Worlds register themselves with :func:`register_world`; importing this package imports every
module in it, so the built-in worlds are registered. Later modules (facts, preference pairs, languages) add theirs the
same way, and configs refer to them by name (``data.synthetic.world``).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterator
from typing import Protocol, TypeVar, runtime_checkable

from lmlab.errors import ConfigError


@runtime_checkable
class World(Protocol):
    """What the data pipeline needs from a synthetic world."""

    name: str

    def documents(self, seed: int, n_docs: int | None = None) -> Iterator[str]: ...


_REGISTRY: dict[str, Callable[[], World]] = {}

F = TypeVar("F", bound=Callable[[], World])


def register_world(name: str) -> Callable[[F], F]:
    """Register a world factory (a class or a zero-argument callable) under ``name``.

    Registering the same name twice with a different factory is a bug and raises ``ValueError``.
    """

    def decorator(factory: F) -> F:
        existing = _REGISTRY.get(name)
        if existing is not None and existing is not factory:
            raise ValueError(f"a synthetic world named {name!r} is already registered ({existing!r})")
        _REGISTRY[name] = factory
        return factory

    return decorator


def world_names() -> list[str]:
    """Names of the registered worlds, sorted."""
    return sorted(_REGISTRY)


def get_world(name: str) -> World:
    """A fresh instance of the world ``name``; an unknown name is a ``ConfigError`` listing the known ones."""
    factory = _REGISTRY.get(name)
    if factory is None:
        known = ", ".join(world_names()) or "(none)"
        raise ConfigError(f"unknown synthetic world {name!r}; registered worlds: {known}")
    return factory()


def _import_builtin_worlds() -> None:
    """Import every public module of this package, so each built-in world registers itself and a
    new world needs only a new module here (no list to keep in sync)."""
    for module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
        if not module.startswith("_"):
            importlib.import_module(f"{__name__}.{module}")


_import_builtin_worlds()
