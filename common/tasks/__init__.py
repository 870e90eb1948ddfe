"""Task plug-ins. A task is one package here, so adding a task means adding files, not
editing shared code:

* ``common/tasks/<name>/config.py``: its ``[name]`` table's dataclass and ``SPEC``, the
  :class:`~common.config.rules.TaskSpec` the config reads (data sources, partitions,
  primary metric...). It must not import torch: every config is read and checked through
  it, by ``privfed config`` and a typo's one-line error too;
* ``common/tasks/<name>/task.py``: the :class:`Task` subclass, decorated with
  :func:`register_task`, imported only when a run builds the task (:func:`get_task`).

The config discovers the specs by this package's name (:func:`common.config.registered_tasks`);
this package's own import is light for the same reason (:class:`Task` loads on first use).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import fields
from typing import TYPE_CHECKING, Any, TypeVar

from common.config import registered_tasks, task_spec

if TYPE_CHECKING:
    from common.tasks.base import Task

__all__ = ["Task", "register_task", "get_task", "task_names"]

# The module of a plug-in package that holds its Task class.
TASK_MODULE = "task"
_CLASSES: dict[str, type[Task]] = {}
_T = TypeVar("_T", bound="type[Task]")


def register_task(name: str) -> Callable[[_T], _T]:
    """Class decorator: make a :class:`Task` subclass available as ``task = name``.

    The class takes its declarations from the plug-in's ``SPEC``, their one home (the config
    checks a run against them without importing the class); declaring one in the class
    body too would let the two disagree, so it is refused.
    """

    def deco(cls: _T) -> _T:
        from common.tasks.base import Task  # loaded already: cls subclasses it

        spec = task_spec(name)
        # The class and its own task bases (a registered parent got its values here, from its spec).
        own = [k for k in cls.__mro__ if issubclass(k, Task) and k is not Task and k not in _CLASSES.values()]
        for f in fields(spec):
            if any(f.name in vars(k) for k in own):
                raise RuntimeError(
                    f"{cls.__name__} declares {f.name}: it belongs in the plug-in's SPEC ({spec.config_cls.__module__})"
                )
        if name in _CLASSES and _CLASSES[name] is not cls:
            raise RuntimeError(f"task {name!r} registered twice")
        for f in fields(spec):
            setattr(cls, f.name, getattr(spec, f.name))
        _CLASSES[name] = cls
        return cls

    return deco


def task_names() -> list[str]:
    return sorted(registered_tasks())


def get_task(name: str) -> type[Task]:
    """The task class registered as ``name``; a ConfigError naming ``task`` if there is none.

    Imports the plug-in's model code (torch) on first use.
    """
    task_spec(name)  # ConfigError naming 'task' for an unknown task
    if name not in _CLASSES:
        importlib.import_module(f"{__name__}.{name}.{TASK_MODULE}")
    if name not in _CLASSES:
        raise RuntimeError(f"{__name__}.{name}.{TASK_MODULE} registered no task {name!r} (@register_task)")
    return _CLASSES[name]


def __getattr__(name: str) -> Any:
    # Task imports torch: only code that builds or subclasses a task pays for it.
    if name == "Task":
        from common.tasks.base import Task

        return Task
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
