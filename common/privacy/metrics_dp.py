"""Private metrics (``metrics.dp``): the Gaussian mechanism on a site's released statistics.

Every per-round statistic a site releases about its validation data (the evaluate reply,
or under SecAgg+ the evaluation sums inside the masked vector) is a vector of sums over
its validation records, with a fixed public schema declared by the task
(:meth:`common.tasks.base.Task.metric_bounds`): for each key k, ``b_k`` bounds one record's
contribution to that sum (losses and errors are clipped to a bound, counts contribute 1),
and ``touched`` bounds how many keys one record contributes to.

**Neighbouring relation and sensitivity.** Add/remove one validation record (unit: "one
validation example"; for the recommender one held-out rating). Released is
``y_k = x_k + b_k * z * Delta * N(0, 1)`` with ``Delta = sqrt(touched)``. In the scaled
coordinates ``x_k / b_k`` one record moves at most ``touched`` keys by at most 1 each, so
the L2 sensitivity of the whole scaled vector is ``Delta`` and the noise is ``z * Delta``:
a Gaussian mechanism with noise multiplier ``z`` (TFF's rule for a vector of sums: the
L2 norm of the per-record contribution bound, here by its sum of squares over the keys
it may touch). The schema does not depend on the data (no group is dropped because it is
small: small groups are suppressed by the server, from the noisy counts, as
post-processing), so adding a record can change a value but never which keys are sent.

**Accounting.** One release is the subsampled Gaussian mechanism with q = 1, one step,
noise multiplier ``z``: the ledger row ``(z, 1.0, 1)`` of mechanism
:data:`MECHANISM`, composed by the site's accountant (RDP by default) with every other
row of that site, its DP-SGD rounds included. That is sequential composition over one
record of the site, wherever the split puts it (conservative: under a stable per-record
split, train and validation are disjoint and parallel composition would give the max of
the two, not their composition).

**Under SecAgg+** each site adds its own noise before masking, so each site's release
is DP on its own (the same row, whatever the server could see); the server sees the sum
of m such vectors, whose noise has std ``sqrt(m) * z * Delta * b_k`` on key k. No noise
is shared or split across sites, so a dropout never leaves a release under-noised.

Floating-point caveat: the noise is numpy's ``normal`` (PCG64, OS entropy under
``dp.secure-rng``), not Opacus's secure-mode sampler; the low-order-bit attacks on
floating-point Gaussian noise are not mitigated on this path (as for central DP).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from common.errors import PrivfedError

MECHANISM = "gaussian-metrics"
UNIT = "one validation example"
# Under dp.unit = user: one user, with at most dp.max-records-per-user held-out records (the
# task's bounds are per user then; docs/PRIVACY.md, "User-level DP").
USER_UNIT = "one user"


def metrics_unit(dp_unit: str) -> str:
    """The unit of a metrics release's ledger row, for the run's ``dp.unit``."""
    return USER_UNIT if dp_unit == "user" else UNIT


# The ledger's mechanism name for the sample-level DP-SGD rows (every row before this feature).
DP_SGD = "dp-sgd"


@dataclass(frozen=True)
class MetricBounds:
    """A task's public release schema: key -> one record's largest |contribution|; keys one record can touch."""

    bounds: Mapping[str, float]
    touched: int

    def __post_init__(self) -> None:
        if self.bounds and not (1 <= self.touched <= len(self.bounds)):
            raise ValueError(f"touched={self.touched} must be in [1, {len(self.bounds)}]")
        if any(not (math.isfinite(b) and b > 0) for b in self.bounds.values()):
            raise ValueError("every per-record bound must be finite and > 0")

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(self.bounds)

    @property
    def l2_sensitivity(self) -> float:
        """Delta: the L2 sensitivity of the scaled vector (x_k / b_k) for add/remove of one record."""
        return math.sqrt(self.touched)

    def std(self, key: str, z: float) -> float:
        """The noise standard deviation on ``key`` at noise multiplier ``z``."""
        return z * self.l2_sensitivity * self.bounds[key]


@dataclass(frozen=True)
class NoisyMetrics:
    """A release the mechanism produced: the noised values, their noise std, and the ledger inputs.

    The only type a site's evaluate reply and the secure sum stage accept under ``metrics.dp``
    (:func:`require_noisy`): a plain dict of statistics is refused.
    """

    values: dict[str, float]
    std: dict[str, float]
    noise_multiplier: float
    l2_sensitivity: float
    withheld: tuple[str, ...] = field(default=())  # keys the task computed that are not released

    def reply_fields(self) -> dict[str, float]:
        """The scalars a reply carries so the server can ledger this release (and the noise std the report shows)."""
        return {"metrics_noise_multiplier": self.noise_multiplier, "metrics_l2_sensitivity": self.l2_sensitivity}


def release(values: Mapping[str, float], bounds: MetricBounds, z: float, rng: np.random.Generator) -> NoisyMetrics:
    """The Gaussian mechanism on the schema's keys of ``values`` (0 where absent); everything else withheld.

    A value outside its declared per-record bound times any count is not checked here (the
    task clips each record); a non-finite value is refused, never noised into a NaN.
    """
    out: dict[str, float] = {}
    std: dict[str, float] = {}
    for key in bounds.keys:
        x = float(values.get(key, 0.0))
        if not math.isfinite(x):
            raise PrivfedError(f"statistic {key!r} is not finite; not released")
        std[key] = bounds.std(key, z)
        out[key] = x + float(rng.normal(0.0, std[key]))
    withheld = tuple(sorted(k for k in values if k not in bounds.bounds))
    return NoisyMetrics(out, std, float(z), bounds.l2_sensitivity, withheld)


def require_noisy(stats: object) -> NoisyMetrics:
    """Refuse to send statistics that did not come out of :func:`release` (metrics.dp is on)."""
    if not isinstance(stats, NoisyMetrics):
        raise PrivfedError(
            "metrics.dp is on: refusing to send un-noised statistics (they did not go through the mechanism)"
        )
    return stats


def metrics_mechanism(z: float) -> tuple[float, float, int]:
    """The accountant's view of one release: (noise multiplier, q = 1, one step)."""
    return (float(z), 1.0, 1)


def noise_std_of_sum(std: Mapping[str, float], sites: int) -> dict[str, float]:
    """The std of each key of a sum over ``sites`` releases with the same per-site std (independent noise)."""
    return {k: v * math.sqrt(max(sites, 0)) for k, v in std.items()}
