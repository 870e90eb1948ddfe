"""Fast-engine rule for plain ``nn.Embedding`` with one lookup per example.

Each example looks up exactly one row ``idx_i``: its gradient is ``g_i`` in that row and
zero elsewhere, so the squared norm is ``|g_i|^2`` exactly and the clipped sum is an
``index_add`` of ``c_i g_i``. Several lookups per example could hit the same row, and
their gradients would add before the norm, so other index shapes are refused.

Per person (user-level DP): the person's gradient is ``sum_{i in u} g_i`` placed at row
``idx_i``; examples of one person that share a row add up there, so the squared norm is
``sum_rows |sum_{i in u, idx_i = row} g_i|^2``, an ``index_add`` over (person, row) cells.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import ConfigError
from common.privacy.engines.rules.base import LayerRule, PersonGroups, register_rule


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

    def sq_norms(
        self, module: nn.Module, idx: torch.Tensor, g: torch.Tensor, groups: PersonGroups | None = None
    ) -> torch.Tensor:
        if groups is None:
            return torch.linalg.vecdot(g, g)
        # A person's gradient in this table: per row, the sum of their examples' g_i that look
        # it up. Rows several of a person's examples share (their own user row, the 1-row mean,
        # two items hashed to one bucket) add before the norm; so key by (person, row).
        rows = int(module.num_embeddings)  # type: ignore[arg-type]
        cells, cell_of = torch.unique(groups.index * rows + idx, return_inverse=True)
        summed = g.new_zeros(cells.numel(), g.shape[1]).index_add_(0, cell_of, g)
        return g.new_zeros(groups.count).index_add_(0, cells // rows, torch.linalg.vecdot(summed, summed))

    def write_grad(self, module: nn.Module, idx: torch.Tensor, g: torch.Tensor, scale: torch.Tensor, out: dict) -> None:
        out[module.weight].index_add_(0, idx, g * scale.unsqueeze(1))
