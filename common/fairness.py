"""Site-level fairness of a round: how evenly the sites' utility is spread.

From each site's value of the task's primary metric (a loss: lower is better) on its own
held-out data, per round:

* ``mean``, ``std`` (population), ``worst`` (largest loss), ``best`` (smallest), ``gap``
  (worst - best);
* ``worst10_mean``: the mean loss of the worst ceil(10%) of sites (at least one);
* ``jain``: Jain's fairness index ``(sum x)^2 / (n * sum x^2)`` of the losses, in
  [1/n, 1], with 1 when every site has the same loss (Jain, Chiu & Hawe, 1984).
"""

from __future__ import annotations

import math
from typing import Mapping


def site_fairness(values: Mapping[str, float]) -> dict[str, float]:
    """Fairness statistics of per-site losses; {} when no site reported a finite value."""
    xs = sorted(float(v) for v in values.values() if math.isfinite(float(v)))
    if not xs:
        return {}
    n = len(xs)
    mean = sum(xs) / n
    worst_k = xs[-max(1, math.ceil(0.1 * n)):]
    squares = sum(x * x for x in xs)
    return {
        "sites": float(n),
        "mean": mean,
        "std": math.sqrt(sum((x - mean) ** 2 for x in xs) / n),
        "worst": xs[-1],
        "best": xs[0],
        "gap": xs[-1] - xs[0],
        "worst10_mean": sum(worst_k) / len(worst_k),
        "jain": (sum(xs) ** 2) / (n * squares) if squares > 0 else 1.0,
    }
