"""Task plug-ins. A task is one module in this package that registers itself with
:func:`register_task`; every module here is imported on first lookup, so adding a task
means adding a file, not editing shared code."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from typing import TypeVar

from common.errors import ConfigError
from common.tasks.base import Task

__all__ = ["Task", "register_task", "get_task", "task_names"]

_REGISTRY: dict[str, type[Task]] = {}
_T = TypeVar("_T", bound=type[Task])


def register_task(name: str) -> Callable[[_T], _T]:
    """Class decorator: make a :class:`Task` subclass available as ``task = name``."""

    def deco(cls: _T) -> _T:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise RuntimeError(f"task {name!r} registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def _discover() -> None:
    for mod in pkgutil.iter_modules(__path__):
        if mod.name not in ("base", "images"):
            importlib.import_module(f"{__name__}.{mod.name}")


def task_names() -> list[str]:
    _discover()
    return sorted(_REGISTRY)


def get_task(name: str) -> type[Task]:
    if name not in _REGISTRY:
        _discover()
    if name not in _REGISTRY:
        raise ConfigError("task", f"unknown task {name!r} (known: {', '.join(sorted(_REGISTRY))})")
    return _REGISTRY[name]
