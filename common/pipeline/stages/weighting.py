"""How much each site's update counts: the one place weighting is decided, at the site and at the server.

Site: ``num_examples`` is the site's declared public size n-hat (never its real
training-set size, which would tell add/remove neighbours apart; docs/PRIVACY.md), or 1
under SecAgg+. Flower's
``secaggplus_mod`` scales every update by ``num_examples / max_weight`` before quantizing
with a fixed absolute step, so weighting by example count would shrink small sites'
updates towards the grid; with 1 (and ``max_weight`` 1) no precision is lost and the
unmasked result is the plain mean. A budget-exhausted site sends weight 0 (1 under
SecAgg+, where its zero update still takes part so the sum stays recoverable).

Server: the weight of a plain reply is 1 under uniform weighting (``weighting = uniform``,
or ``auto`` with SecAgg+ or client-level DP), its ``num_examples`` otherwise; the round's
step is the weighted sum divided by the sum of the weights. With client-level DP the
divisor is the fixed ``qN`` instead, applied by that stage after its noise.

Sensitivity: under client-level DP every weight is 1 (config validation refuses example
weighting there), so a site's contribution to the sum stays bounded by the clip norm.
"""

from __future__ import annotations

import numpy as np

from common.pipeline.base import Aggregate, ServerContext, SiteContext, SiteUpdate, Stage


class Weighting(Stage):
    name = "weighting"

    def __init__(self, secure: bool, uniform: bool) -> None:
        self.secure = secure
        self.uniform = uniform

    def site(self, update: SiteUpdate, ctx: SiteContext) -> SiteUpdate:
        if self.secure:
            update.num_examples = 1
        return update

    def weight(self, num_examples: int) -> int:
        """A plain reply's weight in the round's sum."""
        return 1 if self.uniform else num_examples

    def check(self, arrays: list[np.ndarray], num_examples: int, dataset_size: int, ctx: ServerContext) -> str:
        """The weight a site claims must be the size it declared (n-hat, the plan's dataset_size)."""
        if num_examples != dataset_size:
            return f"num_examples={num_examples} but dataset_size={dataset_size}"
        return ""

    def release(self, agg: Aggregate, ctx: ServerContext) -> Aggregate:
        if ctx.central is not None:
            return agg  # client-level DP divides by qN after its noise
        return Aggregate([t / agg.divisor for t in agg.arrays], 1.0, agg.count)
