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
from typing import TYPE_CHECKING

import numpy as np

from common.config.limits import MIN_SECURE_SITES
from common.config.run import RunSections
from common.config.schema import SecAggConfig

if TYPE_CHECKING:
    from common.privacy.accounting import RoundPlan

# The accountant (Opacus, torch: seconds to import) loads only in the functions that need
# it: the config's all-or-nothing rules (common.config.rules) use this module without it.

# One ledger row per round carries the central mechanism under this pseudo-site id.
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
    from common.privacy.accounting import cached_noise_for_target

    c = cfg.central_dp
    if not c.target_epsilon:
        return c.noise_multiplier
    fed = cfg.federation
    return cached_noise_for_target(
        c.target_epsilon, c.site_delta(fed.num_sites), fed.fraction_fit, fed.rounds, CENTRAL_ACCOUNTANT
    )


def central_plan(cfg: RunSections) -> RoundPlan:
    """The per-round mechanism as a ledger plan: N sites, rate q, one step, z, C, delta."""
    from common.privacy.accounting import RoundPlan

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


def allowed_failures(cfg: RunSections) -> tuple[int | None, str]:
    """How many sampled sites the config lets fail to contribute in a faulted round, and the key.

    (0, "") when no fault can take a site out of a round's sum; (None, key) when any number
    can (a per-site rate: every sampled site may be hit at once). ``faults.dropout-sites``
    names the sites exactly (it wins over ``dropout-rate``, as in common.faults.drops). A
    delayed reply is a failure only when something stops waiting for it.
    """
    f, fed = cfg.faults, cfg.federation
    if f.dropout_sites.strip():
        listed = {int(p) for p in f.dropout_sites.split(",") if p.strip()}
        count = len({i for i in listed if 0 <= i < fed.num_sites})
        if count:
            return count, "faults.dropout-sites"
    elif f.dropout_rate > 0:
        return None, "faults.dropout-rate"
    if f.crash_rate > 0:
        return None, "faults.crash-rate"
    if f.corrupt_rate > 0:  # the server rejects a corrupted update: out of the sum
        return None, "faults.corrupt-rate"
    if f.delay_rate > 0 and f.delay_seconds > 0 and (fed.round_timeout > 0 or cfg.secagg.timeout > 0):
        return None, "faults.delay-rate"
    return 0, ""


def _faulted_rounds(cfg: RunSections) -> int:
    rounds = cfg.federation.rounds
    listed = {int(p) for p in cfg.faults.rounds.split(",") if p.strip()}
    return len({r for r in listed if 1 <= r <= rounds}) if listed else rounds


def _binomial_mass(n: int, q: float, lo: int, hi: int) -> float:
    """P(lo <= Bin(n, q) <= hi)."""
    return sum(math.comb(n, k) * q**k * (1 - q) ** (n - k) for k in range(max(lo, 0), min(hi, n) + 1))


def all_or_nothing_probability(cfg: RunSections) -> float:
    """Probability, over the run, that one site's presence decides whether a round's sum is released.

    Under Poisson sampling with a minimum of m sites per round, adding a site to a set of
    exactly m - 1 other contributing sites turns "no sum" into a sum of m updates:
    sensitivity m C, not C. Without failures the others number Bin(N - 1, q), so that
    happens with probability P(Bin(N - 1, q) = m - 1) per round. If the config lets up to
    D sampled sites fail in a round (dropouts, failed uploads: :func:`allowed_failures`),
    the worst case over which of them fail can bring any sample of m - 1 .. m - 1 + D
    others down to exactly m - 1, so a faulted round counts P(m - 1 <= Bin(N - 1, q) <=
    m - 1 + D) (under SecAgg+ also the samples whose reconstruction threshold the failures
    can undercut). Outside that event each round is the accounted Gaussian mechanism, so
    the run is (eps, delta + this)-DP. With m = 1 there is no such event: an empty round
    still releases the noise. Failures the config does not bound (a rate) give 1.
    """
    m = min_round_sites(cfg)
    fed = cfg.federation
    n, q = fed.num_sites - 1, fed.fraction_fit
    if m <= 1 or m - 1 > n:
        return 0.0
    failures, _ = allowed_failures(cfg)
    if failures is None:
        return 1.0
    clean = _binomial_mass(n, q, m - 1, m - 1)
    if not failures:
        return min(1.0, fed.rounds * clean)
    hi = m - 1 + failures
    if cfg.secagg.enabled:
        # A round also halts below the reconstruction threshold t: with s sampled and up to
        # D failures, one site decides when s - D can fall below t, i.e. for s < t + D
        # (auto threshold s // 2 + 1: s <= 2 D + 1).
        t = cfg.secagg.reconstruction_threshold
        hi = max(hi, t - 1 + failures if t else 2 * failures + 1)
    faulted = _faulted_rounds(cfg)
    return min(1.0, (fed.rounds - faulted) * clean + faulted * _binomial_mass(n, q, m - 1, hi))
