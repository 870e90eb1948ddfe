"""Privacy accounting: thin, exact wrappers around Opacus accountants.

Sample-level DP-SGD at one site is a composition of subsampled Gaussian mechanisms.
Its full description is a history of ``(noise_multiplier, sample_rate, steps)`` triples,
one per round in which the site trained. Opacus accountants take exactly that history
(``IAccountant.history``), so epsilon here is *by construction* what the named Opacus
accountant returns for the inputs the ledger records, and anyone holding a ledger can
recompute it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

# The default delta is written once, in the config's limits; re-exported for the planners.
from common.config.limits import auto_delta as auto_delta

# Accountant name recorded for non-private training (sigma = 0): epsilon is infinite.
NO_DP = "none"
# The accountant of a site's lifetime budget (client.state.Lifetime): RDP composes the rounds
# of any runs (its curve does not depend on delta), converted to epsilon at the round's delta.
# It stays RDP whatever a run's accountant: the coordinator picks each run's (sigma, q, steps)
# after seeing the earlier runs' outputs, and the site stops on the composed value, which is a
# privacy *filter* over adaptively chosen mechanisms. RDP has one (Feldman & Zrnic, 2021);
# PRV / PLD composition is proven for a sequence fixed in advance (within one run, which its
# config plans before it starts), not as such a filter.
LIFETIME_ACCOUNTANT = "rdp"
# Opacus (and torch with it, about 2.5 s) is imported inside the functions that compute: the
# ledger, `privfed audit` and the config read this module's names without computing anything.

# The neighbouring relation of every epsilon computed here, as the ledger names it. Opacus's
# RDP and PRV accountants analyse the Poisson-subsampled Gaussian for adding or removing one
# example (one site, for client-level DP). That is the true relation only because nothing a
# site releases depends on its real size: q, steps, sigma, delta, the normalisation and the
# aggregation weight all derive from a size n-hat the site declared before the run
# (RoundPlan.dataset_size). Were the real n released, datasets differing by one example would
# be told apart by it, and only replace-one neighbours (a larger epsilon) would be honest.
ADD_REMOVE = "add-remove"
NEIGHBOURING = (ADD_REMOVE,)

Mechanism = tuple[float, float, int]  # (noise_multiplier, sample_rate, steps)


def silence_known_warnings() -> None:
    """Opacus warns "Optimal order is the largest alpha" when the best RDP order is the last of
    its fixed grid (RDPAccountant.DEFAULT_ALPHAS, up to 63). The epsilon is still a valid upper
    bound, only possibly a little loose: harmless, and the grid must stay Opacus's own so that
    anyone recomputes the ledger's epsilon exactly. Silenced for that message and module only."""
    warnings.filterwarnings(
        "ignore", message=r"Optimal order is the (largest|smallest) alpha", module=r"opacus\.accountants\.analysis\.rdp"
    )
    # PRV of an unsubsampled Gaussian (q = 1: a metrics.dp release in a site's history) takes
    # log(1 - q) = -inf inside np.where, whose other branch is the one used: the value is right.
    warnings.filterwarnings(
        "ignore", message=r"divide by zero encountered in log", module=r"opacus\.accountants\.analysis\.prv\.prvs"
    )


silence_known_warnings()  # every process that computes an epsilon imports this module


def round_up(x: float, digits: int) -> float:
    """``x`` rounded *up* to ``digits`` significant digits: an ε or δ shown as a bound ("ε ≤")
    or advised as a budget must never be below the value it stands for."""
    if not math.isfinite(x) or x <= 0:
        return x
    scale = 10.0 ** (digits - 1 - math.floor(math.log10(x)))
    return math.ceil(x * scale * (1 - 1e-12)) / scale


def epsilon(history: Iterable[Mechanism], delta: float, accountant: str) -> float:
    """Epsilon at ``delta`` of the composition of ``history`` under an Opacus accountant.

    Rounds with zero steps contribute nothing; any step with sigma = 0 makes it infinite.
    """
    hist = [(float(s), float(q), int(k)) for s, q, k in history if int(k) > 0]
    if accountant == NO_DP or any(s == 0 for s, _, _ in hist):
        return math.inf if hist else 0.0
    if not hist:
        return 0.0
    merged = _merge(hist)
    if accountant == "rdp":
        return _rdp_epsilon(merged, delta)
    if accountant == "gdp" and len(merged) > 1:
        # Opacus's GDP accountant reads only the last history entry.
        raise ValueError("the gdp accountant cannot compose different (sigma, q) pairs; use rdp or prv")
    return _opacus_epsilon(tuple(merged), delta, accountant)


@lru_cache(maxsize=1024)
def _opacus_epsilon(merged: tuple[Mechanism, ...], delta: float, accountant: str) -> float:
    """An Opacus accountant's epsilon for a merged history, once per input per process: PRV
    takes 0.1 - 1 s a call, and the same history comes back (a site's projected spend is its
    next round's spent one; the ledger's totals for every site of one size)."""
    from opacus.accountants import create_accountant

    acc = create_accountant(mechanism=accountant)
    acc.history = list(merged)
    return float(acc.get_epsilon(delta=delta))


def _merge(hist: Sequence[Mechanism]) -> list[Mechanism]:
    """Merge equal (sigma, q) pairs: identical result for RDP/PRV/GDP, fewer terms to sum."""
    merged: dict[tuple[float, float], int] = {}
    for s, q, k in hist:
        merged[(s, q)] = merged.get((s, q), 0) + k
    return [(s, q, k) for (s, q), k in merged.items()]


def _rdp_epsilon(history: list[Mechanism], delta: float) -> float:
    """``RDPAccountant.get_epsilon`` with the per-step RDP curve of each (q, sigma) cached.

    Opacus computes ``compute_rdp(q, sigma, steps, orders) = rdp_one_step * steps`` and sums
    over the history; we do the same operations in the same order on a cached
    ``rdp_one_step``, so the result is bit-identical (tests assert equality) but a ledger
    row costs microseconds instead of ~70 ms.
    """
    rdp = sum([_rdp_one_step(q, s) * k for s, q, k in history])
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as rdp_analysis

    eps, _ = rdp_analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
    return float(eps)


@lru_cache(maxsize=4096)
def _rdp_one_step(q: float, sigma: float) -> np.ndarray:
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as rdp_analysis

    curve = rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS)
    curve.setflags(write=False)  # shared by the cache: never modified in place
    return curve


def _get_noise_multiplier(**kwargs: float | int | str) -> float:
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(**kwargs))


def noise_for_target(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    """Smallest noise multiplier (Opacus's binary search) reaching ``target_epsilon`` after ``steps``."""
    return float(
        _get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=accountant,
        )
    )


# (target, delta, q, steps, accountant) -> sigma: one cache for every noise search (sample-level
# at the sites, client-level at the server). Opacus's search takes about 1 s per input;
# simulated sites run in Ray workers that each start empty, so the launcher hands them the
# preflight's results (:func:`known_noise`, :func:`remember_noise`).
NoiseKey = tuple[float, float, float, int, str]
_NOISE: dict[NoiseKey, float] = {}


def cached_noise_for_target(target: float, delta: float, q: float, steps: int, accountant: str) -> float:
    """:func:`noise_for_target`, searched once per process (and per remembered table) per input."""
    key = (target, delta, q, steps, accountant)
    if key not in _NOISE:
        _NOISE[key] = noise_for_target(target, delta, q, steps, accountant)
    return _NOISE[key]


def known_noise() -> dict[NoiseKey, float]:
    """The noise multipliers searched so far in this process (a copy)."""
    return dict(_NOISE)


def remember_noise(table: dict[NoiseKey, float]) -> None:
    """Take searched noise multipliers from another process (the same inputs give the same
    search result, so this only saves time; a site still checks its own budget)."""
    _NOISE.update(table)


@dataclass(frozen=True)
class RoundPlan:
    """What one site's local DP training does in one round: every accountant input.

    ``dataset_size`` is the site's *declared public* size n-hat, fixed before the run (the
    site's ``declared-size``; in a simulation the launcher declares each site's training
    split size), never the site's real number of records: every other field is derived from
    it, so the plan, and everything sent or ledgered from it, is the same whatever the real
    n. For client-level DP it is the number of sites.
    """

    dataset_size: int
    sample_rate: float
    steps: int
    noise_multiplier: float
    max_grad_norm: float
    delta: float
    accountant: str
    neighbouring: str = ADD_REMOVE

    @property
    def mechanism(self) -> Mechanism:
        return (self.noise_multiplier, self.sample_rate, self.steps)
