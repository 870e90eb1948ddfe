"""Client-level DP (DP-FedAvg, common.privacy.client_level): clip at the site, noise and /qN at the server.

Sensitivity: after this stage's site step a site's update has L2 norm at most ``C``
(``central-dp.clip-norm``), *after* SecAgg+'s quantization too: the clip bound is lowered
by the rounding error ``step * sqrt(d)`` (:func:`secure_clip_norm`). Adding or removing
one site therefore changes the round's sum by at most ``C``.

What it assumes of the stages around it:

* everything after it at the site leaves the update's values alone (the SecAgg+ guard
  only refuses; the evaluation sums ride in a separate array that the server splits off
  before this stage's release; weighting only sets ``num_examples``, to 1 under SecAgg+,
  and the server weighs sites equally: config validation requires uniform weighting);
* the server's inner aggregation is a plain *sum* of the clipped updates that does not
  increase sensitivity (SecAgg+'s modular sum, or the FedAvg sum of weight-1 updates;
  robust rules are refused with central DP by config validation);
* the noise is added to that sum, then divided by the *expected* sample size ``qN``
  (fixed, public), never by the realised count, so the released step has sensitivity
  ``C / (qN)`` and noise ``zC / (qN)``; sites are Poisson-sampled (server.sampling).
"""

from __future__ import annotations

import numpy as np

from common.config import SecAggConfig
from common.pipeline.base import Aggregate, ServerContext, SiteContext, SiteUpdate, Stage
from common.privacy.accounting import RoundPlan
from common.privacy.client_level import add_noise, clip_update, secure_clip_norm, update_norm


def noised_step(total: list[np.ndarray], plan: RoundPlan, rng: np.random.Generator) -> list[np.ndarray]:
    """``(sum + N(0, (zC)^2)) / (qN)``: the Gaussian mechanism on the round's sum, then the fixed divisor."""
    noisy = add_noise(total, plan.noise_multiplier * plan.max_grad_norm, rng)
    return [n / (plan.sample_rate * plan.dataset_size) for n in noisy]


class ClientLevelDP(Stage):
    name = "client_level_dp"

    def __init__(self, clip_norm: float, secagg: SecAggConfig) -> None:
        self.clip_norm = clip_norm
        self.secagg = secagg

    def site(self, update: SiteUpdate, ctx: SiteContext) -> SiteUpdate:
        if not ctx.trained:
            return update  # a zero update has norm 0
        bound = secure_clip_norm(self.clip_norm, self.secagg, update.arrays)
        update.arrays = clip_update(update.arrays, bound)
        return update

    def check(self, arrays: list[np.ndarray], num_examples: int, dataset_size: int, ctx: ServerContext) -> str:
        """A plain round's update must already be clipped: the server does not clip for the site."""
        clip = ctx.central.clip_norm if ctx.central is not None else self.clip_norm
        norm = update_norm(arrays)
        if norm > clip * (1 + 1e-4):
            return f"update norm {norm:.4g} exceeds central-dp.clip-norm={clip:g}"
        return ""

    def release(self, agg: Aggregate, ctx: ServerContext) -> Aggregate:
        """Noise, then /qN. ``ctx.central`` is set only for a round whose mechanism runs (ledgered first)."""
        if ctx.central is None:
            return agg
        step = noised_step(agg.arrays, ctx.central.plan, ctx.central.noise_rng(ctx.round))
        return Aggregate(step, 1.0, agg.count)
