"""Injected faults at upload time (``[faults]``): a lost reply, a corrupted update, a late reply.

Fault injection, not a transform of honest runs: in the list only when ``[faults]`` asks for
one. Its position (after the SecAgg+ guard, before the evaluation sums) is where the
injected corruption always happened, so seeded fault runs repeat exactly; config
validation refuses corruption under SecAgg+ (a corrupted masked update cannot be found).
The events are seeded per (seed, site, round), so running them here changes nothing.
"""

from __future__ import annotations

import time

import numpy as np

from common.config import FaultsConfig
from common.errors import PrivfedError
from common.faults import corruption, drops, event
from common.pipeline.base import SiteContext, SiteUpdate, Stage


class InjectedDropout(PrivfedError):
    """A dropout the run's ``[faults]`` section asked for (tests and fault scenarios)."""

    public_reason = "injected by [faults]"  # sent to the server (client.mods.failure_text)


def corrupt(update: list[np.ndarray], kind: str) -> list[np.ndarray]:
    """A malformed update of the given kind (fault injection): what the server must reject."""
    out = [a.copy() for a in update]
    if kind == "nan":
        out[0].flat[0] = np.nan
    elif kind == "shape":
        out[-1] = out[-1].reshape(-1)[:-1]
    else:  # "norm": a thousand times the honest update, as from a diverged or hostile site
        out = [a * np.asarray(1000.0, dtype=a.dtype) for a in out]
    return out


def faults_at_upload(faults: FaultsConfig) -> bool:
    """Whether ``[faults]`` asks for anything this stage injects."""
    f = faults
    return bool(f.corrupt_rate > 0 or f.delay_rate > 0 or f.dropout_rate > 0 or f.dropout_sites.strip())


class FaultInjection(Stage):
    name = "faults"

    def __init__(self, faults: FaultsConfig, seed: int) -> None:
        self.faults = faults
        self.seed = seed

    def site(self, update: SiteUpdate, ctx: SiteContext) -> SiteUpdate:
        if not ctx.trained:
            return update
        f, seed, i, rnd = self.faults, self.seed, ctx.site_index, ctx.server_round
        if drops(f, seed, i, rnd, "upload"):
            # After the site's own accounting: it spent privacy, the server never hears of it.
            raise InjectedDropout(f"injected dropout: site {i} trained in round {rnd}, its reply is lost")
        if event(f, seed, i, rnd, "corrupt", f.corrupt_rate):
            update.arrays = corrupt(update.arrays, corruption(f, seed, i, rnd))
        if event(f, seed, i, rnd, "delay", f.delay_rate):
            time.sleep(f.delay_seconds)
        return update
