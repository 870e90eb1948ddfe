"""Server-side bounds on a plain update's norm: an absolute one, and one relative to the round.

Not a privacy stage: it protects the model from a diverged or hostile site. It is first in
the list so that, run in reverse at the server, its checks come after every other stage's
(a reply failing several checks is rejected with the reason it always had).
"""

from __future__ import annotations

import numpy as np

from common.pipeline.base import ServerContext, Stage
from common.privacy.client_level import update_norm


class NormBound(Stage):
    name = "norm_bound"

    def __init__(self, max_update_norm: float, outlier_factor: float, central: bool) -> None:
        self.max_update_norm = max_update_norm  # absolute L2 bound on an update (0: none)
        self.outlier_factor = outlier_factor  # x the round's median norm (0: off)
        self.central = central  # client-level DP's clip-norm check is the bound instead

    def check(self, arrays: list[np.ndarray], num_examples: int, dataset_size: int, ctx: ServerContext) -> str:
        if self.max_update_norm > 0:
            norm = update_norm(arrays)
            if norm > self.max_update_norm:
                return f"update norm {norm:.4g} exceeds max-update-norm={self.max_update_norm:g}"
        return ""

    def check_round(self, usable: dict[str, tuple[list[np.ndarray], float]], rejected: dict[str, str]) -> None:
        """Drop updates far beyond the rest of the round (a diverged or hostile site): by norm,
        and by weighted contribution.

        1. Norm: ``|d_i| > factor x median_j |d_j|``.
        2. Weighted contribution: what a site adds to the weighted mean is ``w_i d_i / sum w``;
           in units of an average site's weight, ``c_i = (w_i / mean w) |d_i|`` (with equal
           weights, ``c_i = |d_i|``). A site is refused when ``c_i > factor x median_j c_j``
           *and* its own norm is above the round's median: a large registered site sending
           a typical update is not an outlier, but a large weight cannot carry an
           above-typical update past the bound either. (Weights are the registry's declared
           sizes, never a reply's claim; this bounds what even a registered weight can do.)

        The medians are robust to a minority of such updates; with fewer than 3 there is
        no majority to compare with, and only the absolute bound applies. (Under central
        DP every weight is 1 and the clip-norm check is the bound instead.)
        """
        if self.outlier_factor <= 0 or self.central or len(usable) < 3:
            return
        norms = {site: update_norm(arrays) for site, (arrays, _) in usable.items()}
        median = float(np.median(list(norms.values())))
        mean_w = float(np.mean([w for _, w in usable.values()]))
        pull = {site: (w / mean_w if mean_w > 0 else 1.0) * norms[site] for site, (_, w) in usable.items()}
        median_pull = float(np.median(list(pull.values())))
        for site, norm in sorted(norms.items()):
            if median > 0 and norm > self.outlier_factor * median:
                rejected[site] = (
                    f"update norm {norm:.4g} is {norm / median:.0f}x the round's median {median:.4g} "
                    f"(norm-outlier-factor={self.outlier_factor:g})"
                )
                del usable[site]
            elif median_pull > 0 and pull[site] > self.outlier_factor * median_pull and norm > median:
                rejected[site] = (
                    f"weighted contribution is {pull[site] / median_pull:.0f}x the round's median "
                    f"(norm-outlier-factor={self.outlier_factor:g})"
                )
                del usable[site]
