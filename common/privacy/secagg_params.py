"""SecAgg+ share policy: how many Shamir shares each site's secrets are split into, and
how many reconstruct them, fitted to each round's sample.

Privacy assumption: fewer than ``threshold`` colluding neighbours learn nothing about a
site's masks, and a malicious server cannot collect both kinds of shares of one site
only while ``2 * threshold > shares`` (Flower 1.41's SecAgg+ has no consistency check),
so the threshold never drops below a majority. Up to ``shares - threshold`` neighbours
may drop out.
"""

from __future__ import annotations

from common.config.schema import SecAggConfig


def shares_and_threshold(secagg: SecAggConfig, sampled: int) -> tuple[int, int]:
    """SecAgg+ (num_shares, threshold) for a round with ``sampled`` sites (>= 3)."""
    shares = sampled if not secagg.num_shares or secagg.num_shares >= sampled else secagg.num_shares
    # Never below a majority: Flower 1.41 has no consistency check, so with 2t <= shares a
    # malicious server could collect both kinds of shares of one site and unmask it.
    threshold = max(secagg.reconstruction_threshold, shares // 2 + 1)
    return shares, min(threshold, shares - 1)
