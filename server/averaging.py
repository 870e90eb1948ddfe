"""The model the server serves: the global model, or an exponential moving average of it.

``federation.ema-decay = d`` (0 < d < 1) makes the server keep

    served_1 = global_1,    served_r = d * served_(r-1) + (1 - d) * global_r

over the rounds whose aggregate changed the global model. The served model is the one
the server evaluates (centrally, or by sending it to the sites' evaluation), draws
sample grids from, attacks in the membership-inference check and reports as final; the
sites keep training from the global model, which the average never feeds back into.

Privacy: every ``global_r`` is already a DP release (sample-level DP-SGD at the sites,
or client-level DP at the server), and the average is a fixed function of those
releases. It is post-processing: no accountant, ledger row or ε changes.

Why: under DP noise the last global model is one noisy point of a trajectory;
averaging the last few (here with weight ``(1 - d) d^k`` on the model k rounds back)
averages independent round noise away, as Polyak-Ruppert averaging does for SGD and
as DP-SGD's large-scale image results use. Measured in docs/BENCHMARKS.md.

The arithmetic is :class:`common.averaging.MovingAverage`, shared with the sites, which
average their site-local tables (the recommender's user tables) with the same decay, so
that a site evaluates the served model with local tables averaged over the same rounds.
"""

from __future__ import annotations

from common.averaging import MovingAverage


class ServedModel(MovingAverage):
    """The served arrays; with ``decay`` 0 they are the global arrays themselves."""
