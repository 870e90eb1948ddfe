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

Written by hand because the state is the shared arrays the strategy holds (numpy), not a
module: ``torch.optim.swa_utils.AveragedModel`` averages an ``nn.Module``'s
parameters, and the server's arrays also hold the tasks' integer buffers, which are taken
as they are, not averaged.
"""

from __future__ import annotations

import numpy as np


class ServedModel:
    """The served arrays; with ``decay`` 0 they are the global arrays themselves."""

    def __init__(self, decay: float, arrays: list[np.ndarray] | None = None) -> None:
        self.decay = decay
        # None until the first round that changed the model (or a resumed average).
        self._arrays = [a.copy() for a in arrays] if arrays is not None else None

    @property
    def averaging(self) -> bool:
        return self.decay > 0

    def update(self, global_arrays: list[np.ndarray]) -> None:
        """Fold in the global model of a round that changed it."""
        if not self.averaging:
            return  # arrays() serves the global arrays themselves: keep no copy
        if self._arrays is None:
            self._arrays = [_wide(g) for g in global_arrays]
            return
        d = self.decay
        self._arrays = [
            d * s + (1.0 - d) * _wide(g) if np.issubdtype(g.dtype, np.floating) else g.copy()
            for s, g in zip(self._arrays, global_arrays)
        ]

    def arrays(self, global_arrays: list[np.ndarray]) -> list[np.ndarray]:
        """What the server serves now: the average, or ``global_arrays`` before any round
        changed the model (and always without averaging)."""
        if not self.averaging or self._arrays is None:
            return global_arrays
        return [s.astype(g.dtype, copy=False) for s, g in zip(self._arrays, global_arrays)]

    def started(self) -> list[np.ndarray] | None:
        """The average, or None before any round changed the model (and without averaging)."""
        return self._arrays if self.averaging else None


def _wide(a: np.ndarray) -> np.ndarray:
    """A copy of ``a``; floating arrays narrower than float32 widened to it, so that the
    average's small steps are not rounded away (float16's ulp at 100 is 0.0625)."""
    if np.issubdtype(a.dtype, np.floating):
        return a.astype(np.promote_types(a.dtype, np.float32))  # astype copies
    return a.copy()
