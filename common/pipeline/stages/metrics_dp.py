"""Private metrics (``metrics.dp``): Gaussian noise on the statistics a site releases, before they leave.

Site side (``before_training``, under SecAgg+ for a task with evaluation sums): the site's
per-record-clipped sums of the model it received (``Task.dp_evaluate``) go through the
Gaussian mechanism of :mod:`common.privacy.metrics_dp` here, *before* the ``eval_sums``
stage packs them into the masked vector, so each site's release is DP on its own, whatever
the server could see. ``eval_sums`` refuses to pack anything that did not come out of this
stage. The evaluate reply (plain rounds, and tasks without secure sums) uses the same
:meth:`MetricsDP.noise` (``client/app.py``).

Sensitivity (add/remove one validation record): the task's schema bounds each key's
per-record contribution by ``b_k`` and the number of keys one record touches by ``t``;
the noise on key k has std ``z * sqrt(t) * b_k``, a Gaussian mechanism with noise
multiplier ``z`` on the scaled vector, whose L2 sensitivity is ``sqrt(t)``. One release
is charged as ``(z, q = 1, 1 step)`` to the site's ledger (mechanism ``gaussian-metrics``).

Server side (``server``): nothing is removed or added; the stage records the noise std
of the secure sum of m sites' releases, ``sqrt(m) * z * sqrt(t) * b_k`` per key, for the
report's error bars. A site over its budget sends no release (zeros under SecAgg+).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from common.errors import PrivfedError
from common.pipeline.base import Aggregate, ServerContext, SiteContext, Stage
from common.privacy.metrics_dp import MetricBounds, NoisyMetrics, noise_std_of_sum, release


class MetricsDP(Stage):
    name = "metrics_dp"

    def __init__(self, bounds: MetricBounds, noise_multiplier: float, in_fit: bool = False) -> None:
        self.bounds = bounds
        self.z = noise_multiplier
        # Whether the fit reply carries the sums (SecAgg+ with eval_sums); otherwise only the
        # evaluate reply releases statistics, and a fit must not release (or charge) anything.
        self.in_fit = in_fit

    def noise(self, values: Mapping[str, float], rng: np.random.Generator | None) -> NoisyMetrics:
        """The released (noisy) values of the schema's keys; every other key is withheld."""
        if rng is None:
            raise PrivfedError("metrics.dp: no noise generator for this release; nothing is sent")
        return release(values, self.bounds, self.z, rng)

    def before_training(self, ctx: SiteContext) -> None:
        if not self.in_fit or ctx.evaluate is None or not ctx.metrics_allowed:
            return
        ctx.release = self.noise(ctx.evaluate(), ctx.metrics_rng)

    def sum_std(self, sites: int) -> dict[str, float]:
        """Noise std of each key of a sum over ``sites`` releases (all at this stage's z)."""
        return noise_std_of_sum({k: self.bounds.std(k, self.z) for k in self.bounds.keys}, sites)

    def server(self, agg: Aggregate, ctx: ServerContext) -> Aggregate:
        # Runs after eval_sums in the server's (reverse) order: the sums are split off by then.
        if ctx.sums is not None:
            ctx.sums_std = self.sum_std(agg.count)
        return agg
