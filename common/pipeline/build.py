"""The one place the update pipeline is put together, for the site and the server alike.

The order is the privacy argument, read top to bottom as the site runs it (the server runs
it bottom to top):

0. frozen_entries server: refuse an update moving a never-trained layer; zero it in the aggregate
1. norm_bound      server: absolute and round-relative norm bounds (plain rounds)
2. client_level_dp site: clip to C (less SecAgg+'s rounding) | server: + N(0,(zC)^2), / qN
3. secagg_guard    site: refuse NaN/Inf or |x| > clipping-range (nothing else can, once masked)
4. faults          site: injected lost reply / corruption / delay (only with [faults])
5. metrics_dp      site: Gaussian noise on the evaluation sums (metrics.dp) | server: their noise std
6. eval_sums       site: append the packed (noisy) evaluation sums | server: split them off, unpack
7. weighting       site: num_examples (1 under SecAgg+) | server: each reply's weight, the divisor
8. update_checks   server: arrays, dtypes, shapes, finite values (plain rounds)
9. secagg          site: Flower's secaggplus_mod masks | server: Flower unmasks; mean x count = sum

Clipping comes before everything that could move a value (so the sensitivity is C), the
guard after the last such stage, the evaluation sums after both (never clipped by the
client-level DP stage), their metrics.dp noise just before they are packed (so each
site's release is DP before masking, and eval_sums can refuse un-noised sums), and masking
last. The metrics_dp stage is in every metrics.dp run: the evaluate reply uses its
mechanism too (client/app.py), secure sums or not.
"""

from __future__ import annotations

from typing import Any

from common.config import RunConfig
from common.pipeline.base import Pipeline, Stage
from common.pipeline.stages.client_level_dp import ClientLevelDP
from common.pipeline.stages.eval_sums import EvalSums
from common.pipeline.stages.faults import FaultInjection, faults_at_upload
from common.pipeline.stages.frozen import FrozenEntries
from common.pipeline.stages.metrics_dp import MetricsDP
from common.pipeline.stages.norm_bound import NormBound
from common.pipeline.stages.secagg import SecAgg
from common.pipeline.stages.secagg_guard import SecAggGuard
from common.pipeline.stages.update_checks import UpdateChecks
from common.pipeline.stages.weighting import Weighting
from common.privacy.secagg_stats import secure_statistics


def build_pipeline(cfg: RunConfig, task: Any = None) -> Pipeline:
    """This run's stages in site order. ``task``: for its evaluation sums (None: a task without any)."""
    fed, cdp, sa = cfg.federation, cfg.central_dp, cfg.secagg
    private = cfg.metrics.dp and task is not None
    bounds = task.metric_bounds() if private else None
    # Under metrics.dp the secure sums carry exactly the released schema (the noisy keys).
    keys = bounds.keys if bounds is not None and task.sum_keys() else (task.sum_keys() if task is not None else ())
    codec = secure_statistics(keys, sa)
    # A Task's frozen layers (a stand-in task without the method has none).
    frozen = getattr(task, "frozen_entries", lambda: ((), ()))()
    stages: list[Stage | None] = [
        FrozenEntries(*frozen) if frozen[0] else None,
        NormBound(fed.max_update_norm, fed.norm_outlier_factor, central=cdp.enabled),
        ClientLevelDP(cdp.clip_norm, sa) if cdp.enabled else None,
        SecAggGuard(sa.clipping_range) if sa.enabled else None,
        FaultInjection(cfg.faults, fed.seed) if faults_at_upload(cfg.faults) else None,
        MetricsDP(bounds, cfg.metrics.noise_multiplier, in_fit=codec is not None) if bounds is not None else None,
        EvalSums(codec, private=private) if codec is not None else None,
        Weighting(secure=sa.enabled, uniform=cfg.uniform_weights),
        UpdateChecks(),
        SecAgg() if sa.enabled else None,
    ]
    return Pipeline([s for s in stages if s is not None])
