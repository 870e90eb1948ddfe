"""SecAgg+ (Flower's ``secaggplus_mod`` at the site, ``SecAggPlusWorkflow`` at the server): mask, then sum.

Site: nothing here. After the ClientApp returns, Flower's ``secaggplus_mod``
(client/mods.py wraps it for SecAgg+ messages only) scales the update by
``num_examples / max_weight`` (1 / 1: see the weighting stage), clips each coordinate to
``[-c, c]``, quantizes it stochastically onto ``Q`` levels and masks it.

Server: Flower's ``SecAggPlusWorkflow`` (server/secagg.py) unmasks and dequantizes, and
hands every reply the same *mean* over all replying sites (out-of-budget sites' zero
updates included); this stage turns it back into their sum (``mean x count``, float64).

Sensitivity: the modular sum adds no sensitivity beyond the stages before it (a site's
masked contribution is its clipped update, rounded by less than one step per
coordinate, which the client-level DP clip allows for). It assumes the guard has refused
anything that quantization would clip silently.
"""

from __future__ import annotations

import numpy as np

from common.pipeline.base import Aggregate, ServerContext, Stage


class SecAgg(Stage):
    name = "secagg"

    def server(self, agg: Aggregate, ctx: ServerContext) -> Aggregate:
        return Aggregate([m.astype(np.float64) * agg.count for m in agg.arrays], agg.divisor, agg.count)
