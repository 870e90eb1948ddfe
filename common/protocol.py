"""The site -> server message contract, in one place for both sides.

A fit reply carries the update arrays plus these scalar metrics. The server accepts
only what it can validate; anything else is rejected with a reason (never a crash).
What the server sees from a site per round: the update (a delta of the shared
weights), its weight, the accountant inputs, the site's own epsilon and (without DP) a
training loss. Nothing per-example, and nothing that depends on the site's real number of
records: ``dataset_size`` and the weight are the site's declared public size n-hat, and
no timing is sent (it would reveal n and the sampled batch sizes). The neighbouring
relation is not sent: it is a property of the accountants (RoundPlan.neighbouring).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from common.config import MAX_STEPS, MIN_DELTA, SIGMA_RANGE
from common.privacy.accounting import NO_DP, RoundPlan
from common.seeds import RNG_KINDS

KNOWN_ACCOUNTANTS = ("rdp", "prv", NO_DP)


class Status(str, Enum):
    TRAINED = "trained"
    BUDGET_EXHAUSTED = "budget_exhausted"


# Metric key -> (type, field of RoundPlan or None).
_PLAN_KEYS: dict[str, type] = {
    "dataset_size": int,
    "sample_rate": float,
    "steps_planned": int,
    "noise_multiplier": float,
    "max_grad_norm": float,
    "delta": float,
    "accountant": str,
}


def fit_metrics(
    site_id: str,
    unit: str,
    plan: RoundPlan,
    steps_taken: int,
    eps_budget: float,
    status: Status,
    *,
    eps_spent: float,
    rng: str,
    note: str = "",
    history: str = "[]",
    **extra: float,
) -> dict[str, Any]:
    """Build the scalar metrics a site attaches to its fit reply.

    ``history`` is the JSON list ``[[round, sigma, q, steps], ...]`` of the rounds the site
    trained before this one: the server ledgers any of them it has no row for (a reply
    that never arrived), so the ledger misses no spend the site knows of. ``rng`` is the
    kind of randomness the site's noise and Poisson sampling actually came from
    (``common.seeds.RNG_KINDS``), for the ledger's ``rng`` column.
    """
    return {
        "site_id": site_id,
        "unit": unit,
        "status": status.value,
        "dataset_size": plan.dataset_size,
        "sample_rate": plan.sample_rate,
        "steps_planned": plan.steps,
        "steps": steps_taken,
        "noise_multiplier": plan.noise_multiplier,
        "max_grad_norm": plan.max_grad_norm,
        "delta": plan.delta,
        "accountant": plan.accountant,
        "eps_budget": eps_budget,
        "eps_spent": eps_spent,
        "rng": rng,
        "note": note,
        "history": history,
        **{k: float(v) for k, v in extra.items()},
    }


@dataclass(frozen=True)
class SiteReport:
    site_id: str
    unit: str
    status: Status
    plan: RoundPlan
    steps_taken: int
    eps_budget: float
    eps_spent: float
    note: str
    extra: dict[str, float]
    rng: str  # os | seeded: what the site's noise and sampling were drawn from
    # (round, sigma, q, steps) of the rounds the site trained before this reply.
    history: tuple[tuple[int, float, float, int], ...] = ()
    metrics: MetricsSpend | None = None  # a noisy metrics release in this reply (metrics.dp)


class MalformedReport(ValueError):
    """A fit reply the server cannot use; the message is the reason it is rejected."""


def parse_fit_metrics(m: Mapping[str, Any]) -> SiteReport:
    def get(key: str, typ: type) -> Any:
        if key not in m:
            raise MalformedReport(f"missing metric {key!r}")
        v = m[key]
        if typ is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if not isinstance(v, typ) or isinstance(v, bool):
            raise MalformedReport(f"metric {key!r} must be {typ.__name__}, got {type(v).__name__}")
        return v

    site_id = get("site_id", str)
    try:
        status = Status(get("status", str))
    except ValueError:
        raise MalformedReport(f"unknown status {m.get('status')!r}") from None
    vals = {k: get(k, t) for k, t in _PLAN_KEYS.items()}
    steps = get("steps", int)
    for key in ("sample_rate", "noise_multiplier", "max_grad_norm", "delta"):
        if not math.isfinite(vals[key]):
            raise MalformedReport(f"metric {key!r} must be finite, got {vals[key]}")
    n, q, sigma = vals["dataset_size"], vals["sample_rate"], vals["noise_multiplier"]
    if n < 1 or not (0 < q <= 1) or sigma < 0 or vals["steps_planned"] < 1:
        raise MalformedReport(f"accountant inputs out of range (n={n}, q={q}, sigma={sigma})")
    if not (0 <= steps <= vals["steps_planned"]):
        raise MalformedReport(f"steps={steps} outside [0, {vals['steps_planned']}]")
    if vals["accountant"] not in KNOWN_ACCOUNTANTS:
        raise MalformedReport(f"unknown accountant {vals['accountant']!r}")
    if vals["steps_planned"] > MAX_STEPS:
        raise MalformedReport(f"steps_planned={vals['steps_planned']} above {MAX_STEPS}")
    if vals["accountant"] != NO_DP:
        lo, hi = SIGMA_RANGE
        if not lo <= sigma <= hi:
            raise MalformedReport(f"noise_multiplier={sigma:g} outside [{lo:g}, {hi:g}]")
        if not (vals["max_grad_norm"] > 0 and MIN_DELTA <= vals["delta"] < 1.0 / n):
            raise MalformedReport(
                f"DP inputs out of range (sigma={sigma}, C={vals['max_grad_norm']}, delta={vals['delta']}, n={n})"
            )
    plan = RoundPlan(
        dataset_size=vals["dataset_size"],
        sample_rate=vals["sample_rate"],
        steps=vals["steps_planned"],
        noise_multiplier=vals["noise_multiplier"],
        max_grad_norm=vals["max_grad_norm"],
        delta=vals["delta"],
        accountant=vals["accountant"],
    )
    rng = get("rng", str)
    if rng not in RNG_KINDS:
        raise MalformedReport(f"metric 'rng' must be one of {', '.join(RNG_KINDS)}")
    known = set(_PLAN_KEYS) | {
        "site_id",
        "unit",
        "status",
        "steps",
        "eps_budget",
        "eps_spent",
        "rng",
        "note",
        "history",
    }
    known |= {*METRICS_FIELDS, "metrics_rng"}
    extra = {
        k: float(v) for k, v in m.items() if k not in known and isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    eps_spent = get("eps_spent", float)
    eps_budget = get("eps_budget", float)
    if math.isnan(eps_budget) or eps_budget <= 0:
        raise MalformedReport(f"metric 'eps_budget' must be > 0, got {eps_budget}")
    return SiteReport(
        site_id=site_id,
        unit=get("unit", str),
        status=status,
        plan=plan,
        steps_taken=steps,
        eps_budget=eps_budget,
        eps_spent=eps_spent if not math.isnan(eps_spent) else math.inf,
        note=str(m.get("note", "")),
        extra=extra,
        rng=rng,
        history=parse_history(m.get("history", "[]"), vals["accountant"]),
        metrics=parse_metrics_spend(m),
    )


# A noisy metrics release (metrics.dp) a reply declares, so the server can ledger it.
METRICS_FIELDS = ("metrics_noise_multiplier", "metrics_l2_sensitivity", "metrics_delta")


@dataclass(frozen=True)
class MetricsSpend:
    """One Gaussian release of a site's statistics: (z, q = 1, 1 step) at delta (common.privacy.metrics_dp)."""

    noise_multiplier: float
    l2_sensitivity: float
    delta: float
    rng: str  # os | seeded: where the release's noise came from (common.seeds.RNG_KINDS)


def parse_metrics_spend(m: Mapping[str, Any]) -> MetricsSpend | None:
    """The release a reply declares, or None when it carries no noisy statistics."""
    if not any(k in m for k in METRICS_FIELDS):
        return None
    vals: dict[str, float] = {}
    for key in METRICS_FIELDS:
        v = m.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise MalformedReport(f"metric {key!r} must be a finite number")
        vals[key] = float(v)
    lo, hi = SIGMA_RANGE
    z, sens, delta = vals["metrics_noise_multiplier"], vals["metrics_l2_sensitivity"], vals["metrics_delta"]
    if not (lo <= z <= hi and sens > 0 and MIN_DELTA <= delta < 1):
        raise MalformedReport(f"metrics release inputs out of range (z={z:g}, sensitivity={sens:g}, delta={delta:g})")
    rng = m.get("metrics_rng")
    if rng not in RNG_KINDS:
        raise MalformedReport(f"metric 'metrics_rng' must be one of {', '.join(RNG_KINDS)}")
    return MetricsSpend(z, sens, delta, str(rng))


MAX_HISTORY = 100_000  # rounds; far above any run, bounds what a reply can make the server parse


def parse_history(raw: Any, accountant: str) -> tuple[tuple[int, float, float, int], ...]:
    """A site's earlier rounds (the ``history`` metric), validated like a round's inputs."""
    if not isinstance(raw, str) or len(raw) > 64 * MAX_HISTORY:
        raise MalformedReport("metric 'history' must be a JSON string of [round, sigma, q, steps] entries")
    try:
        items = json.loads(raw)
    except ValueError:
        raise MalformedReport("metric 'history' is not valid JSON") from None
    if not isinstance(items, list):
        raise MalformedReport("metric 'history' must be a JSON list")
    out = []
    lo, hi = SIGMA_RANGE
    for item in items:
        ok = isinstance(item, list) and len(item) == 4
        if ok:
            rnd, sigma, q, steps = item
            ok = (
                all(isinstance(v, int) and not isinstance(v, bool) for v in (rnd, steps))
                and all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (sigma, q)
                )
                and rnd >= 1
                and 0 < steps <= MAX_STEPS
                and 0 < q <= 1
                and (accountant == NO_DP or lo <= sigma <= hi)
            )
        if not ok:
            raise MalformedReport(f"metric 'history' has an invalid entry {str(item)[:80]!r}")
        out.append((int(rnd), float(sigma), float(q), int(steps)))
    return tuple(out)
