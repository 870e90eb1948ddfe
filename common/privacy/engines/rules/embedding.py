"""Fast-engine rule for plain ``nn.Embedding`` with one lookup per example.

Each example looks up exactly one row ``idx_i``: its gradient is ``g_i`` in that row and
zero elsewhere, so the squared norm is ``|g_i|^2`` exactly and the clipped sum is an
``index_add`` of ``c_i g_i``. Several lookups per example could hit the same row, and
their gradients would add before the norm, so other index shapes are refused.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import ConfigError
from common.privacy.engines.rules.base import LayerRule, register_rule


class _CaptureEmbedding(torch.autograd.Function):
    """``F.embedding`` whose backward records (indices, grad_output) instead of the table grad."""

    @staticmethod
    def forward(ctx, idx, weight, slot):
        ctx.save_for_backward(idx)
        ctx.slot = slot
        return F.embedding(idx, weight)

    @staticmethod
    def backward(ctx, grad_out):
        (idx,) = ctx.saved_tensors
        ctx.slot.append((idx, grad_out))
        return None, None, None


@register_rule(nn.Embedding)
class EmbeddingRule(LayerRule):
    """One row per example: squared norm ``|g_i|^2``, clipped sum ``index_add`` of ``c_i g_i``."""

    param_names = frozenset({"weight"})

    def check(self, name: str, module: nn.Module) -> None:
        if module.padding_idx is not None or module.max_norm is not None or module.scale_grad_by_freq or module.sparse:
            raise ConfigError(
                "dp.engine",
                f"fast engine supports plain nn.Embedding (no padding_idx, max_norm, scale_grad_by_freq or sparse); "
                f"{name} is not (use dp.engine=opacus)",
            )

    def install(self, module: nn.Module, slot: list) -> None:
        def forward(self: nn.Embedding, idx: torch.Tensor) -> torch.Tensor:
            if not (torch.is_grad_enabled() and self.training):
                return F.embedding(idx, self.weight)
            if idx.dim() != 1:
                raise RuntimeError(
                    "fast DP engine needs one index per example for Embedding, "
                    f"got shape {tuple(idx.shape)} (use dp.engine=opacus)"
                )
            return _CaptureEmbedding.apply(idx, self.weight, slot)

        module.forward = types.MethodType(forward, module)

    def sq_norms(self, module: nn.Module, idx: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vecdot(g, g)

    def write_grad(self, module: nn.Module, idx: torch.Tensor, g: torch.Tensor, scale: torch.Tensor, out: dict) -> None:
        out[module.weight].index_add_(0, idx, g * scale.unsqueeze(1))
