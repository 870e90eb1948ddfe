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
from typing import TypeVar

import torch
from torch import nn


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
    def sq_norms(self, module: nn.Module, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Each example's squared gradient norm over the layer's trainable parameters, shape (B,)."""

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
