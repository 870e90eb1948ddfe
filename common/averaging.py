"""An exponential moving average of a model's arrays: the server's served model and each
site's average of its site-local tables (``federation.ema-decay``).

    average_1 = x_1,    average_r = d * average_(r-1) + (1 - d) * x_r

over the rounds that changed ``x``. Floating arrays are averaged (in at least float32, so
that small steps are not rounded away); integer state (counters) is taken as it is.

Written by hand because the state is plain arrays (numpy), not a module:
``torch.optim.swa_utils.AveragedModel`` averages an ``nn.Module``'s parameters, and the
server's arrays also hold the tasks' integer buffers, which are taken as they are.
"""

from __future__ import annotations

import numpy as np


class MovingAverage:
    """The averaged arrays; with ``decay`` 0 no copy is kept and the arrays are served as they are."""

    def __init__(self, decay: float, arrays: list[np.ndarray] | None = None) -> None:
        self.decay = decay
        # None until the first round that changed the model (or a resumed average).
        self._arrays = [a.copy() for a in arrays] if arrays is not None else None

    @property
    def averaging(self) -> bool:
        return self.decay > 0

    def update(self, latest: list[np.ndarray]) -> None:
        """Fold in the arrays of a round that changed them."""
        if not self.averaging:
            return  # arrays() serves the latest arrays themselves: keep no copy
        if self._arrays is None:
            self._arrays = [_wide(g) for g in latest]
            return
        d = self.decay
        self._arrays = [
            d * s + (1.0 - d) * _wide(g) if np.issubdtype(g.dtype, np.floating) else g.copy()
            for s, g in zip(self._arrays, latest)
        ]

    def arrays(self, latest: list[np.ndarray]) -> list[np.ndarray]:
        """The average, or ``latest`` before any round changed them (and always
        without averaging)."""
        if not self.averaging or self._arrays is None:
            return latest
        return [s.astype(g.dtype, copy=False) for s, g in zip(self._arrays, latest)]

    def started(self) -> list[np.ndarray] | None:
        """The average, or None before any round changed the model (and without averaging)."""
        return self._arrays if self.averaging else None


def _wide(a: np.ndarray) -> np.ndarray:
    """A copy of ``a``; floating arrays narrower than float32 widened to it, so that the
    average's small steps are not rounded away (float16's ulp at 100 is 0.0625)."""
    if np.issubdtype(a.dtype, np.floating):
        return a.astype(np.promote_types(a.dtype, np.float32))  # astype copies
    return a.copy()
