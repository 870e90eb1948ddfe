"""Every seeded random stream of a run, derived from ``federation.seed`` in one place.

Each stream mixes the run seed with its own tag (and the site / round it belongs to)
through numpy's ``SeedSequence``, so no two streams, sites or rounds share randomness and
a resumed run never repeats an earlier round's draws. The entropy lists below are part of
the reproducibility contract: changing one changes every seeded run's results.

Privacy: these streams are predictable from the seed. Under ``dp.secure-rng`` the DP noise
and the sampling that amplifies it use OS entropy instead (the callers decide; see
:func:`common.runtime.round_seed` and the server's ``_noise_rng`` / ``_sampling_rng``).
Fault injection (simulation only) is always seeded.
"""

from __future__ import annotations

import random

import numpy as np

# What a ledger row says about the randomness behind its noise and sampling (column ``rng``):
# OS entropy, or a stream derived from federation.seed (reproducible, and removable by
# anyone who knows the seed).
RNG_OS = "os"
RNG_SEEDED = "seeded"
RNG_KINDS = (RNG_OS, RNG_SEEDED)

# Tags of the server-side and fault streams (the site-round stream has none: [seed, site, round]).
CENTRAL_NOISE = 0xCD
SITE_SAMPLING = 0x5A
FAULT_DROPOUT = 0xFA
FAULT_EVENT = 0xFB
FAULT_CORRUPTION = 0xFC
METRICS_NOISE = 0x3D
# Phases of a round in which a site may release noisy metrics (metrics.dp).
METRICS_FIT, METRICS_EVALUATE = 0, 1


def site_round_seed(seed: int, site_index: int, server_round: int) -> int:
    """One site's training seed for one round (round 0: model initialisation), a 63-bit int."""
    state = np.random.SeedSequence([seed, site_index, server_round]).generate_state(1, dtype=np.uint64)
    return int(state[0] >> 1)


def central_noise_rng(seed: int, server_round: int) -> np.random.Generator:
    """The server's client-level DP noise of one round."""
    return np.random.default_rng(np.random.SeedSequence([seed, CENTRAL_NOISE, server_round]))


def site_sampling_rng(seed: int, server_round: int) -> random.Random:
    """The server's Poisson site sampling of one round."""
    return random.Random(int(np.random.SeedSequence([seed, SITE_SAMPLING, server_round]).generate_state(1)[0]))


def metrics_noise_rng(seed: int | None, site_index: int, server_round: int, phase: int) -> np.random.Generator:
    """A site's metrics.dp noise for one release; ``seed`` None (dp.secure-rng): OS entropy."""
    if seed is None:
        return np.random.default_rng()
    return np.random.default_rng(np.random.SeedSequence([seed, METRICS_NOISE, site_index, server_round, phase]))


def fault_draw(seed: int, site_index: int, server_round: int, tag: int, *extra: int) -> np.random.Generator:
    """An injected fault's draw for one site and round (tag: FAULT_DROPOUT, _EVENT, _CORRUPTION)."""
    return np.random.default_rng([seed, site_index, server_round, tag, *extra])
