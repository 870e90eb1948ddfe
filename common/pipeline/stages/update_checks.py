"""A plain reply's update must fit the model: as many arrays, the same dtypes and shapes, finite values.

Server-only (under SecAgg+ the site's guard checks what can be checked). Last in the list,
so that at the server, where checks run in reverse, it runs first: a malformed update is
rejected as malformed before any norm is taken of it.
"""

from __future__ import annotations

import numpy as np

from common.pipeline.base import ServerContext, Stage


class UpdateChecks(Stage):
    name = "update_checks"

    def check(self, arrays: list[np.ndarray], num_examples: int, dataset_size: int, ctx: ServerContext) -> str:
        model = ctx.global_arrays
        if len(arrays) != len(model):
            return f"expected {len(model)} arrays, got {len(arrays)}"
        for i, (a, g) in enumerate(zip(arrays, model)):
            if a.shape != g.shape or a.dtype != g.dtype:
                return f"array {i} has dtype/shape {a.dtype}{list(a.shape)}, expected {g.dtype}{list(g.shape)}"
            if not np.isfinite(a).all():
                return f"array {i} contains NaN or Inf"
        return ""
