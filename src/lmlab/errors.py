"""User-facing error types.

A ``UserError`` is bad input from the user (config, data, checkpoint, paths): the CLI
prints its message on one line and exits non-zero without a traceback. Anything else
is a bug and is allowed to raise normally.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user; the CLI prints ``str(err)`` and exits with ``exit_code``."""

    exit_code = 1


class ConfigError(UserError):
    """An unknown key, a wrong type or an impossible combination in a config (exit code 2)."""

    exit_code = 2


class DataError(UserError):
    """Missing, empty or malformed data, or data that does not fit the run (e.g. tokenizer)."""


class CheckpointError(UserError):
    """A missing, corrupted or foreign checkpoint, or a run directory that does not exist."""
