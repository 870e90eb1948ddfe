"""The site's own checks on an update that SecAgg+ will mask (the server cannot check it after).

Sensitivity: none of its own; it only refuses. It assumes it runs after every stage that
changes the update's values (the client-level clip) and before masking: a NaN, an Inf or a
coordinate beyond ``secagg.clipping-range`` would otherwise be clipped silently by Flower's
quantizer (breaking the clip-norm bound the accountant assumes) or poison the whole sum. A
refusing site raises, and the protocol treats it as a dropout.
"""

from __future__ import annotations

import numpy as np

from common.errors import PrivfedError
from common.pipeline.base import SiteContext, SiteUpdate, Stage


class SecAggGuard(Stage):
    name = "secagg_guard"

    def __init__(self, clipping_range: float) -> None:
        self.clipping_range = clipping_range

    def site(self, update: SiteUpdate, ctx: SiteContext) -> SiteUpdate:
        if not ctx.trained:
            return update  # zeros
        # Once masked, a bad update cannot be told apart from the others: the site
        # refuses to send it, and the protocol treats the site as dropped out.
        if not all(np.isfinite(a).all() for a in update.arrays):
            raise PrivfedError("update contains NaN or Inf: not sent to secure aggregation")
        peak = max((float(np.abs(a).max()) for a in update.arrays if a.size), default=0.0)
        if peak > self.clipping_range:
            raise PrivfedError(
                f"update has a coordinate of size {peak:.3g} > secagg.clipping-range={self.clipping_range:g}; "
                "SecAgg+ would clip it silently: raise the range or lower the learning rate"
            )
        return update
