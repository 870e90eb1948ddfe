"""The step-engine interface and the registry behind ``dp.engine`` (Opacus's accountant
registry pattern: a dict, a decorator, one file per implementation).

An engine turns one sampled batch's per-example losses into exactly one optimiser step.
What every DP engine must guarantee (the accountant's assumption): the step releases the
sum of the per-example gradients, each clipped to L2 norm ``C`` over all trained
parameters jointly (sensitivity ``C`` for adding or removing one example; under user-level
DP, the sum of one person's examples' gradients clipped as a whole, sensitivity ``C`` for
adding or removing one person), plus
N(0, (sigma*C)^2 I) noise, divided by the expected batch size q*n. The engine never sees
how the batch was drawn; :class:`common.privacy.training.LocalSession` makes it a Poisson
sample.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TypeVar

import torch

from common.privacy.engines.rules.base import PersonGroups


class StepEngine(ABC):
    """One optimiser step from a vector of per-example losses.

    A DP engine is constructed as ``Engine(model, optimizer, plan, generator=None,
    secure_mode=False)`` (see :func:`common.privacy.engines.make_engine`).
    """

    @abstractmethod
    def step(self, per_sample_loss: torch.Tensor, groups: PersonGroups | None = None) -> None:
        """One step. ``groups`` (user-level DP): the person of each example; the engine then clips
        each person's summed gradient, not each example's (an engine that cannot must raise)."""

    def close(self) -> None:  # noqa: B027  (optional: an engine that changes nothing has nothing to undo)
        """Undo any changes made to the model (hooks, patched forwards)."""


# dp.engine name -> DP engine class. Filled by @register_engine in each engine's module.
ENGINES: dict[str, Callable[..., StepEngine]] = {}
_E = TypeVar("_E", bound=type[StepEngine])


def register_engine(name: str) -> Callable[[_E], _E]:
    """Class decorator: make a DP :class:`StepEngine` available as ``dp.engine = name``."""

    def deco(cls: _E) -> _E:
        if name in ENGINES and ENGINES[name] is not cls:
            raise RuntimeError(f"DP engine {name!r} registered twice")
        ENGINES[name] = cls
        return cls

    return deco
