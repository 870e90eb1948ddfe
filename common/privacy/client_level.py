"""Client-level (central) DP: DP-FedAvg with a fixed denominator (McMahan et al., ICLR 2018).

Per round, with sites sampled independently with probability q (Poisson), each sampled
site k sends its update clipped to L2 norm C, and the server releases

    global + (sum_k clip(d_k) + N(0, (z C)^2 I)) / (q N)

Adding or removing one site changes the sum by at most C, so each round is a Gaussian
mechanism with noise multiplier z on a Poisson-subsampled set: exactly the subsampled
Gaussian that Opacus's RDP accountant composes, with one "step" per round and sample
rate q. The unit of privacy is a whole site (every record it holds). Dividing by the
*expected* count qN, not the realised one, keeps the sensitivity C/(qN); the realised
count depends on who took part and is not released.

The noise is added by the server after SecAgg+ unmasking (docs/PRIVACY.md says why).
"""

from __future__ import annotations

import math

import numpy as np

from common.config.limits import MIN_SECURE_SITES
from common.config.run import RunSections
from common.config.schema import SecAggConfig
from common.privacy.accounting import RoundPlan, cached_noise_for_target

# One ledger row per round carries the central mechanism under this pseudo-site id.
CENTRAL_SITE_ID = "all-sites"
CENTRAL_UNIT = "site"
CENTRAL_ACCOUNTANT = "rdp"


def clip_update(update: list[np.ndarray], clip_norm: float) -> list[np.ndarray]:
    """Scale the update so its global L2 norm (over every array) is at most ``clip_norm``."""
    norm = update_norm(update)
    if norm <= clip_norm or norm == 0:
        return update
    scale = clip_norm / norm
    return [(a * scale).astype(a.dtype, copy=False) for a in update]


def secure_clip_norm(clip_norm: float, secagg: SecAggConfig, update: list[np.ndarray]) -> float:
    """The clip bound that keeps a site's contribution within ``clip_norm`` after SecAgg+.

    Stochastic rounding moves each coordinate by less than one quantization step, so the
    quantized update's norm can exceed the clipped one by up to step * sqrt(d). Clipping
    to ``clip_norm - step * sqrt(d)`` keeps the sensitivity the accountant assumes.
    """
    if not secagg.enabled:
        return clip_norm
    d = sum(a.size for a in update)
    bound = clip_norm - secagg.step * math.sqrt(d)
    if bound <= 0:
        raise ValueError(
            f"central-dp.clip-norm={clip_norm:g} is below SecAgg+'s rounding error over {d} values; raise it"
        )
    return bound


def update_norm(update: list[np.ndarray]) -> float:
    return math.sqrt(sum(float(np.square(a, dtype=np.float64).sum()) for a in update))


def add_noise(total: list[np.ndarray], std: float, rng: np.random.Generator) -> list[np.ndarray]:
    """``total + N(0, std^2)`` per coordinate, in each array's dtype."""
    return [(t + rng.normal(0.0, std, size=t.shape)).astype(t.dtype, copy=False) for t in total]


def central_noise_multiplier(cfg: RunSections) -> float:
    """z from the config, or the smallest z that spends ``target-epsilon`` over the planned rounds."""
    c = cfg.central_dp
    if not c.target_epsilon:
        return c.noise_multiplier
    fed = cfg.federation
    return cached_noise_for_target(
        c.target_epsilon, c.site_delta(fed.num_sites), fed.fraction_fit, fed.rounds, CENTRAL_ACCOUNTANT
    )


def central_plan(cfg: RunSections) -> RoundPlan:
    """The per-round mechanism as a ledger plan: N sites, rate q, one step, z, C, delta."""
    fed = cfg.federation
    return RoundPlan(
        dataset_size=fed.num_sites,
        sample_rate=fed.fraction_fit,
        steps=1,
        noise_multiplier=central_noise_multiplier(cfg),
        max_grad_norm=cfg.central_dp.clip_norm,
        delta=cfg.central_dp.site_delta(fed.num_sites),
        accountant=CENTRAL_ACCOUNTANT,
    )


def min_round_sites(cfg: RunSections) -> int:
    """Fewest sites whose updates a round will aggregate (fewer: the round releases no sum)."""
    return max(cfg.federation.min_fit_sites, MIN_SECURE_SITES if cfg.secagg.enabled else 1)


def all_or_nothing_probability(cfg: RunSections) -> float:
    """Probability, over the run, that one site's presence decides whether a round's sum is released.

    Under Poisson sampling with a minimum of m sites per round, adding a site to a sample
    of exactly m - 1 others turns "no sum" into a sum of m updates: sensitivity m C, not
    C. That happens with probability P(Bin(N - 1, q) = m - 1) per round; outside it each
    round is the accounted Gaussian mechanism, so the run is (eps, delta + this)-DP.
    With m = 1 there is no such event: an empty round still releases the noise.
    """
    m = min_round_sites(cfg)
    n, q = cfg.federation.num_sites - 1, cfg.federation.fraction_fit
    if m <= 1 or m - 1 > n:
        return 0.0
    p = math.comb(n, m - 1) * q ** (m - 1) * (1 - q) ** (n - m + 1)
    return min(1.0, cfg.federation.rounds * p)
