"""Evaluation sums inside the SecAgg+ vector (common.privacy.secagg_stats): packed at the site, split off at the server.

Under SecAgg+, a task with ``sum_keys()`` (the recommender) evaluates the model it
received, *before* training, on its validation split, and appends the sums as one extra
array in exact fixed point on the quantization grid. The server learns only their sum over
the sites that uploaded.

Sensitivity: these are statistics of validation data. With ``metrics.dp`` (the default
outside simulations) they are the noisy release of the ``metrics_dp`` stage, which runs
before this one, charged to the site's ledger as its own ``gaussian-metrics`` row; this
stage refuses to pack anything else. Without it they are not covered by any epsilon
(docs/PRIVACY.md, "Private metrics"). They must not be
clipped or noised by the client-level DP stage, so this stage comes after it at the site
(the array is appended after the clip and the guard) and before it at the server (split
off before any release). It assumes the secure aggregation after it is an exact modular
sum (digits lie on SecAgg+'s grid, so its stochastic rounding leaves them unchanged) and
that weighting leaves each site's contribution unscaled (num_examples = 1 under SecAgg+).
"""

from __future__ import annotations

from common.errors import PrivfedError
from common.pipeline.base import Aggregate, ServerContext, SiteContext, SiteUpdate, Stage
from common.privacy.metrics_dp import require_noisy
from common.privacy.secagg_stats import SecureStats


class EvalSums(Stage):
    name = "eval_sums"

    def __init__(self, codec: SecureStats, private: bool = False) -> None:
        self.codec = codec
        self.private = private  # metrics.dp: only the metrics_dp stage's noisy release may be packed

    def before_training(self, ctx: SiteContext) -> None:
        """The sums of the model just received: the model the previous round's evaluate measured."""
        if ctx.evaluate is None:
            return
        if not self.private:
            ctx.sums = [self.codec.pack(ctx.evaluate(), ctx.is_sum_key)]
        elif not ctx.metrics_allowed:
            ctx.sums = [self.codec.pack({})]  # over budget: zeros, nothing about the data released
        else:
            ctx.sums = [self.codec.pack(require_noisy(ctx.release).values)]

    def site(self, update: SiteUpdate, ctx: SiteContext) -> SiteUpdate:
        # Also for a budget-exhausted site's zero update: validation data, not training data.
        update.extras = update.extras + ctx.sums
        return update

    def server(self, agg: Aggregate, ctx: ServerContext) -> Aggregate:
        """Take the sums off the unmasked sum (valid even when the update sum is not); ``ctx.sums`` gets them."""
        if len(agg.arrays) != len(ctx.global_arrays) + 1:
            ctx.failures.append("secure sum carries no evaluation statistics; no test metrics this round")
            return agg
        try:
            ctx.sums = self.codec.unpack(agg.arrays[-1])
        except PrivfedError as exc:
            ctx.failures.append(f"secure evaluation statistics discarded: {exc}")
        return Aggregate(agg.arrays[:-1], agg.divisor, agg.count)
