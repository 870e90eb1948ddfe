"""The fast engine's per-layer rule interface and its registry (keyed by layer type).

A rule states, for one layer type, how the fast engine gets each example's gradient of
that layer's parameters from what one ordinary backward pass saw (the layer's input and
its output gradient): its squared L2 norm, and the sum of the gradients scaled by each
example's clip factor. The engine adds the squared norms over layers, so the clip is over
all parameters jointly (sensitivity ``C`` per example). A rule must be exact for every
input its ``install`` accepts, and refuse (raise) the rest.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn


@dataclass(frozen=True)
class PersonGroups:
    """Which person each example of a batch belongs to, for user-level clipping.

    ``index[i]`` is example i's person, 0..count-1, and a person's examples are contiguous
    (the sampler emits them so); ``position[i]`` is i's place among its person's examples and
    ``width`` the most examples any person has in the batch. A rule then returns one squared
    norm per *person*: the norm of the sum of that person's per-example gradients, which is
    the person's gradient (their loss is the sum of their records' losses).
    """

    index: torch.Tensor
    count: int
    position: torch.Tensor
    width: int

    def to(self, device: torch.device) -> PersonGroups:
        return PersonGroups(self.index.to(device), self.count, self.position.to(device), self.width)

    @classmethod
    def from_sorted(cls, index: torch.Tensor, count: int) -> PersonGroups:
        """From a non-decreasing ``index`` (each person's examples contiguous)."""
        if index.numel() and bool((index[1:] < index[:-1]).any()):
            raise ValueError("PersonGroups: each person's examples must be contiguous and in order")
        sizes = torch.bincount(index, minlength=count) if index.numel() else index.new_zeros(count)
        starts = torch.cumsum(sizes, 0) - sizes
        position = torch.arange(index.numel(), device=index.device) - starts[index]
        return cls(index, count, position, int(sizes.max()) if count else 0)


class LayerRule(ABC):
    """Per-example gradient norms and clipped sums of one layer type."""

    # The parameters (by attribute name) the rule clips. The engine refuses a layer with any
    # other trainable parameter: the rule would neither clip it nor write its gradient.
    param_names: frozenset[str] = frozenset()

    @abstractmethod
    def check(self, name: str, module: nn.Module) -> None:
        """Raise ConfigError when this layer's configuration is one the rule is not exact for."""

    @abstractmethod
    def install(self, module: nn.Module, slot: list) -> None:
        """Patch the layer's forward so that its backward appends (input, output grad) to ``slot``
        instead of computing parameter gradients (only in training mode with grad enabled)."""

    @abstractmethod
    def sq_norms(
        self, module: nn.Module, a: torch.Tensor, g: torch.Tensor, groups: PersonGroups | None = None
    ) -> torch.Tensor:
        """Each example's squared gradient norm over the layer's trainable parameters, shape (B,);
        with ``groups``, each person's (the norm of the sum of their examples' gradients), shape (count,)."""

    @abstractmethod
    def write_grad(self, module: nn.Module, a: torch.Tensor, g: torch.Tensor, scale: torch.Tensor, out: dict) -> None:
        """Write sum_i scale_i * grad_i into ``out[param]`` for each trainable parameter.

        ``out[param]`` starts at zero (a rule may accumulate into it)."""


# Exactly these classes: a subclass may compute something else in its forward.
RULES: dict[type[nn.Module], LayerRule] = {}
_R = TypeVar("_R", bound=type[LayerRule])


def register_rule(layer_type: type[nn.Module]) -> Callable[[_R], _R]:
    """Class decorator: the fast engine clips layers of exactly ``layer_type`` with this rule."""

    def deco(cls: _R) -> _R:
        if layer_type in RULES and type(RULES[layer_type]) is not cls:
            raise RuntimeError(f"fast DP engine: a rule for {layer_type.__name__} is registered twice")
        RULES[layer_type] = cls()
        return cls

    return deco
