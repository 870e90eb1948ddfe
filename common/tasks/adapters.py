"""Low-rank adapters: DP-SGD trains a few directions of each layer instead of all of it.

Why: DP-SGD adds N(0, (sigma*C)^2) to *every* trained coordinate, while a clipped
per-example gradient has norm at most C however many coordinates share it. So the noise
grows with sqrt(#trained parameters) and the signal does not. With a few hundred images
per site the full VAE (18k parameters) learns almost nothing at eps = 1 (docs/TASKS.md).

An adapted layer computes ``base(x) + B(A(x))``: ``base`` is the layer as initialised
(frozen: random, drawn from the run's model seed, never fitted to data), ``A`` maps to
``rank`` dimensions and ``B`` back (``B`` starts at zero, so the adapted model starts
equal to the base one). Only ``A`` and ``B`` (and ``B``'s bias) train. Both are
``nn.Linear``, so the fast DP engine clips them exactly; the frozen base is public
post-processing (any value keeps the guarantee, which holds for every starting model).
This is LoRA (Hu et al., 2021) on a random base, i.e. training in a random low-dimensional
subspace of the weights (Li et al., 2018, "intrinsic dimension").
"""

from __future__ import annotations

import torch
from torch import nn


class LowRankAdapter(nn.Module):
    """``base(x) + B(A(x))`` with ``base`` frozen (see the module docstring)."""

    def __init__(self, base: nn.Linear, rank: int) -> None:
        super().__init__()
        self.base = base
        base.requires_grad_(False)
        self.A = nn.Linear(base.in_features, rank, bias=False)
        self.B = nn.Linear(rank, base.out_features)
        nn.init.zeros_(self.B.weight)
        nn.init.zeros_(self.B.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.B(self.A(x))


def add_adapters(module: nn.Module, rank: int) -> nn.Module:
    """Replace every ``nn.Linear`` under ``module`` (itself included) by a rank-``rank``
    adapter around it, in place; returns the module (or its replacement). rank 0: unchanged."""
    if rank <= 0:
        return module
    if isinstance(module, nn.Linear):
        return LowRankAdapter(module, rank)
    for name, child in list(module.named_children()):
        setattr(module, name, add_adapters(child, rank))
    return module
