"""Task plug-ins. A task is one module in this package that registers itself with
:func:`register_task`; every module here is imported on first lookup, so adding a task
means adding a file, not editing shared code.

The registry is the config's (:func:`common.config.register_task_spec`): the config
reads a task's ``[name]`` table and declarations from it without importing this
package (which imports the config), and discovers the plug-ins by this package's name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar, cast

from common.config import register_task_spec, registered_tasks, task_spec
from common.tasks.base import Task

__all__ = ["Task", "register_task", "get_task", "task_names"]

_T = TypeVar("_T", bound=type[Task])


def register_task(name: str) -> Callable[[_T], _T]:
    """Class decorator: make a :class:`Task` subclass available as ``task = name``."""

    def deco(cls: _T) -> _T:
        cls.name = name
        register_task_spec(name, cls)
        return cls

    return deco


def task_names() -> list[str]:
    return sorted(registered_tasks())


def get_task(name: str) -> type[Task]:
    """The task class registered as ``name``; a ConfigError naming ``task`` if there is none."""
    return cast(type[Task], task_spec(name))
