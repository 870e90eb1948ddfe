"""Evaluation statistics inside the SecAgg+ vector: exact fixed-point sums.

Under secure aggregation a site appends its evaluation sums (a task's
:meth:`~common.tasks.base.Task.sum_keys`, a fixed public schema) to its model update as
one extra float array, so they are masked with it and the server learns only their sum
over the sites that uploaded (docs/FAIRNESS.md, docs/PRIVACY.md).

SecAgg+ clips every coordinate to ``[-c, c]`` (``secagg.clipping-range``) and rounds it
stochastically onto ``Q`` levels (``secagg.quantization-range``), a grid of step
``2c/Q``. A statistic (an error sum of 10^4, a coverage of 0.05) does not fit one
such coordinate with useful precision, and a public scale that suits one statistic
overflows or drowns another. So each statistic is written in fixed point, as the
integer ``X = round(x * 2^FRACTION_BITS)``, split into base-``B`` digits (``B <= Q/4``,
signed like ``X``), and each digit ``d`` is sent as the coordinate ``d * step``:

* that coordinate lies *on* the grid, so Flower's stochastic rounding leaves it
  unchanged (exact whenever the step is a power of two, which the codec requires);
* ``|d| < B`` keeps it within ``c/2``: never clipped;
* SecAgg+ adds the integers modulo 2^32 without error, so the server recovers
  ``sum_sites d`` exactly per digit, carries included, and from them ``sum_sites X``.

The sum is exact up to each site's rounding to ``2^-FRACTION_BITS`` (2.3e-10) per
statistic. A value of ``2^(VALUE_BITS - FRACTION_BITS)`` (2.8e14) or more, or a NaN, is
refused at the site with a one-line error naming the statistic, never clipped.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from common.config import SecAggConfig
from common.errors import ConfigError, PrivfedError

FRACTION_BITS = 32  # a site's statistic is rounded to 2^-32
VALUE_BITS = 80  # |X| < 2^80, i.e. |statistic| < 2^48
MIN_DIGIT_BITS = 4  # below this SecAgg+'s grid is too coarse to carry digits


class SecureStats:
    """Packs one site's sums into a float array, and unpacks the unmasked sum of them."""

    def __init__(self, keys: Sequence[str], sa: SecAggConfig) -> None:
        self.keys = tuple(keys)
        if len(set(self.keys)) != len(self.keys):
            raise ValueError("secure statistics: the schema names a key twice")
        self.step = 2 * sa.clipping_range / sa.quantization_range
        if math.frexp(self.step)[0] != 0.5:
            # Off a power of two, float rounding in Flower's quantizer can move a digit by one level.
            raise ConfigError(
                "secagg.clipping-range",
                f"2 * clipping-range / quantization-range must be a power of two for the secure evaluation "
                f"statistics, got {self.step:.6g} (e.g. clipping-range = 8 with quantization-range = 2^22)",
            )
        # Digits below Q/4 in size keep every coordinate within c/2 of zero.
        self.digit_bits = int(math.log2(sa.quantization_range)) - 2
        if self.digit_bits < MIN_DIGIT_BITS:
            raise ConfigError(
                "secagg.quantization-range", f"must be >= 2^{MIN_DIGIT_BITS + 2} to carry secure statistics"
            )
        self.digits = -(-VALUE_BITS // self.digit_bits)
        self.width = len(self.keys) * self.digits

    def pack(self, metrics: Mapping[str, float], is_sum: Callable[[str], bool] | None = None) -> np.ndarray:
        """This site's values of the schema's keys (0 where absent) as one float64 array.

        ``is_sum`` (the task's :meth:`is_sum_key`) names every sum the site computed; one
        outside the schema would otherwise be silently left out of the federation metrics.
        """
        schema = set(self.keys)
        stray = sorted(k for k in metrics if k not in schema and is_sum is not None and is_sum(k))
        if stray:
            raise PrivfedError(f"secure statistic {stray[0]!r} is not in the task's sum_keys schema; it cannot be sent")
        base, limit = 1 << self.digit_bits, 1 << VALUE_BITS
        out = np.zeros((len(self.keys), self.digits), dtype=np.int64)
        for i, key in enumerate(self.keys):
            x = float(metrics.get(key, 0.0))
            if not math.isfinite(x) or abs(x) * 2.0**FRACTION_BITS >= limit:
                raise PrivfedError(
                    f"secure statistic {key!r} = {x:.6g} does not fit the secure sum (|value| < "
                    f"2^{VALUE_BITS - FRACTION_BITS}); not sent rather than clipped"
                )
            fixed = round(x * 2.0**FRACTION_BITS)  # exact: scaling by a power of two
            sign, mag = (-1 if fixed < 0 else 1), abs(fixed)
            for j in range(self.digits):
                out[i, j] = sign * ((mag >> (j * self.digit_bits)) & (base - 1))
        # d * step is exact in float64 (|d| < Q/4, times a power of two).
        return out.reshape(-1).astype(np.float64) * self.step

    def unpack(self, total: np.ndarray) -> dict[str, float]:
        """The per-key sums over sites from the sum of their packed arrays (as unmasked)."""
        total = np.asarray(total, dtype=np.float64).reshape(-1)
        if total.shape != (self.width,):
            raise PrivfedError(f"secure statistics have {total.size} entries, expected {self.width}")
        units = total / self.step
        digits = np.rint(units)
        # Digits were sent on the grid; anything off it was not packed by this codec.
        if not np.all(np.isfinite(units)) or np.max(np.abs(units - digits), initial=0.0) > 0.01:
            raise PrivfedError(
                "secure statistics are off SecAgg+'s grid: a site packed them with other secagg settings"
            )
        rows = digits.reshape(len(self.keys), self.digits)
        out: dict[str, float] = {}
        for key, row in zip(self.keys, rows):
            fixed = sum(int(d) << (j * self.digit_bits) for j, d in enumerate(row))
            out[key] = fixed / 2**FRACTION_BITS  # int / int: correctly rounded
        return out


def secure_statistics(task_sum_keys: Sequence[str], sa: SecAggConfig) -> SecureStats | None:
    """The codec a run uses: only under SecAgg+, and only for a task that has sum statistics."""
    if not sa.enabled or not task_sum_keys:
        return None
    return SecureStats(task_sum_keys, sa)
