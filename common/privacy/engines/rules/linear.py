"""Fast-engine rule for ``nn.Linear`` on (batch, features) inputs.

The per-example gradient of ``y = a W^T + b`` is the outer product ``g a^T`` (and ``g``
for the bias), so its squared norm is ``|g|^2 |a|^2 (+ |g|^2)`` exactly and the clipped
sum is one matmul ``(c * g)^T a``. Exact only when each example is one row of the input;
other shapes are refused.

Per person (user-level DP) the gradient is ``sum_{i in u} g_i a_i^T``, whose squared norm
is ``sum_{i,j in u} (g_i . g_j)(a_i . a_j)`` (plus ``sum_{i,j} g_i . g_j`` for the bias): two
Gram matrices per person, at the cost of per-example clipping times the examples per person.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import ConfigError
from common.privacy.engines.rules.base import LayerRule, PersonGroups, register_rule


class _CaptureLinear(torch.autograd.Function):
    """``F.linear`` whose backward records (input, grad_output) instead of weight grads."""

    @staticmethod
    def forward(ctx, x, weight, bias, slot):
        ctx.save_for_backward(x, weight)
        ctx.slot = slot
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        ctx.slot.append((x, grad_out))
        grad_x = grad_out @ weight if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None


def _padded(x: torch.Tensor, groups: PersonGroups) -> torch.Tensor:
    """(count, width, features): each person's rows, zero-padded (zeros add nothing to a Gram)."""
    out = x.new_zeros(groups.count, groups.width, x.shape[1])
    out[groups.index, groups.position] = x
    return out


def _trainable_bias(module: nn.Module) -> bool:
    return bool(module.bias is not None and module.bias.requires_grad)


@register_rule(nn.Linear)
class LinearRule(LayerRule):
    """Per-example gradient of ``y = a W^T + b`` is ``g a^T`` (and ``g``):
    squared norm ``|g|^2 |a|^2 (+ |g|^2)``, clipped sum ``(c * g)^T a``."""

    param_names = frozenset({"weight", "bias"})

    def check(self, name: str, module: nn.Module) -> None:
        if not module.weight.requires_grad:
            raise ConfigError(
                "dp.engine", f"fast engine: {name} has a frozen weight and a trainable bias (use dp.engine=opacus)"
            )

    def install(self, module: nn.Module, slot: list) -> None:
        def forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
            if not (torch.is_grad_enabled() and self.training):
                return F.linear(x, self.weight, self.bias)
            if x.dim() != 2:
                raise RuntimeError(f"fast DP engine needs (batch, features) inputs to Linear, got {tuple(x.shape)}")
            return _CaptureLinear.apply(x, self.weight, self.bias, slot)

        module.forward = types.MethodType(forward, module)

    def sq_norms(
        self, module: nn.Module, a: torch.Tensor, g: torch.Tensor, groups: PersonGroups | None = None
    ) -> torch.Tensor:
        bias_term = 1.0 if _trainable_bias(module) else 0.0
        if groups is None:
            return torch.linalg.vecdot(g, g) * (torch.linalg.vecdot(a, a) + bias_term)
        # |sum_{i in u} g_i a_i^T|_F^2 = sum_{i,j in u} (g_i . g_j)(a_i . a_j) (+ (g_i . g_j) for the
        # bias): two Gram matrices per person, never the (out x in) gradient itself.
        # In float64, floored at 0: a person whose gradients (nearly) cancel would otherwise get a
        # float32 sum below 0 (sqrt -> NaN clip factor -> NaN update) or an understated norm.
        pa, pg = _padded(a.double(), groups), _padded(g.double(), groups)
        gram_a = torch.bmm(pa, pa.transpose(1, 2))
        gram_g = torch.bmm(pg, pg.transpose(1, 2))
        return (gram_g * (gram_a + bias_term)).sum((1, 2)).clamp_min(0).to(g.dtype)

    def write_grad(self, module: nn.Module, a: torch.Tensor, g: torch.Tensor, scale: torch.Tensor, out: dict) -> None:
        gc = g * scale.unsqueeze(1)
        torch.mm(gc.t(), a, out=out[module.weight])
        if _trainable_bias(module):
            torch.sum(gc, 0, out=out[module.bias])
