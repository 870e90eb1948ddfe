"""Errors a user can act on. Each renders as one line that names what is wrong."""

from __future__ import annotations


class PrivfedError(Exception):
    """Base class: the CLI prints ``error: <message>`` and exits 2, never a traceback."""


class ConfigError(PrivfedError, ValueError):
    """An invalid configuration value; the message names the offending key."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(f"config key '{key}': {message}")


class DataError(PrivfedError, ValueError):
    """A missing or corrupt data file; the message names the file."""

    def __init__(self, path: object, message: str) -> None:
        self.path = str(path)
        super().__init__(f"data file '{path}': {message}")


class TrainingFailure(PrivfedError):
    """A run that cannot produce a meaningful model (divergence, mode collapse); it ends
    the run, and the last checkpoint stays the last good round's."""
