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
        """Drop updates whose norm is far beyond the rest of the round (a diverged or hostile site).

        The median is robust to a minority of such updates; with fewer than 3 there is
        no majority to compare with, and only the absolute bound applies. (Under central
        DP the clip-norm check is the bound instead.)
        """
        if self.outlier_factor <= 0 or self.central or len(usable) < 3:
            return
        norms = {site: update_norm(arrays) for site, (arrays, _) in usable.items()}
        median = float(np.median(list(norms.values())))
        for site, norm in sorted(norms.items()):
            if median > 0 and norm > self.outlier_factor * median:
                rejected[site] = (
                    f"update norm {norm:.4g} is {norm / median:.0f}x the round's median {median:.4g} "
                    f"(norm-outlier-factor={self.outlier_factor:g})"
                )
                del usable[site]
