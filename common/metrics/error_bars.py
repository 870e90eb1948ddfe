"""Error bars of metrics derived from noisy sums (metrics.dp): the delta method.

A federation metric f (RMSE, a group gap, the VAE's neg ELBO) is a function of the summed
statistics S, each released with independent Gaussian noise of std s_k. To first order
(the delta method) ``std f ~= sqrt(sum_k (df/dS_k)^2 s_k^2)``; the partial derivatives are
taken numerically, by a central difference of the task's own combine function, so every
derived metric gets its error bar without a formula per metric. It is a local, first-order
figure: near a kink (a max, a suppression threshold) or when the noise is not small
against the sum (a tiny group), the true spread can be larger; the report says so.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

# The difference step, as a fraction of the key's noise std (small: local slope).
STEP = 1e-3


def propagate(
    combine: Callable[[dict[str, float]], dict[str, float]],
    sums: Mapping[str, float],
    std: Mapping[str, float],
) -> dict[str, float]:
    """The delta-method std of each metric ``combine(sums)`` returns, given each sum's noise std."""
    base = combine(dict(sums))
    # The std accumulated with hypot, not as a sum of squares: a hostile site's huge finite sum
    # then gives an infinite error bar, not an OverflowError in the server's round.
    std_of = {k: 0.0 for k, v in base.items() if isinstance(v, (int, float)) and math.isfinite(v)}
    for key, s in std.items():
        if key not in sums or not s > 0:
            continue
        h = STEP * s
        up = combine({**sums, key: sums[key] + h})
        down = combine({**sums, key: sums[key] - h})
        for name in std_of:
            if name in up and name in down:
                slope = (float(up[name]) - float(down[name])) / (2 * h)
                if math.isfinite(slope):
                    std_of[name] = math.hypot(std_of[name], slope * s)
    return {k: v for k, v in std_of.items() if v > 0}
