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
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from common.config import MAX_STEPS, MIN_DELTA, SIGMA_RANGE
from common.identifiers import site_id_problem
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
    """A fit reply the server cannot use; the message is the reason it is rejected.

    The message names keys and fields only, never a value the reply carried (a hostile
    site would otherwise write into the server's logs and metrics.jsonl)."""


# Every string a reply carries is bounded before the server looks at it. A privacy unit is
# a task's name for one record ("image", "rating"); a note is a short human-readable line.
UNIT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9 _.-]{0,31}")
MAX_NOTE = 200
MAX_METRIC_KEYS = 512  # the protocol's ~20 fields plus a task's metrics (the recommender's per-group ones: ~60)
METRIC_KEY_RE = re.compile(r"[A-Za-z0-9_.:<>+-]{1,64}")  # group names: "age.<18", "age.56+"
# Any string value but the history (bounded by the rounds begun, see history_limit): far
# above any honest one (a note, a unit, an rng kind), bounds what a reply can make the server hash.
MAX_STRING = 4096
HISTORY_ENTRY_CHARS = 80  # "[123456, 1.2345678901234567, 0.12345678901234567, 1000000], " with room


def note_of(raw: object) -> str:
    """A reply's note, if it is at most MAX_NOTE printable ASCII characters; dropped ('') otherwise."""
    if isinstance(raw, str) and len(raw) <= MAX_NOTE and all(" " <= c <= "~" for c in raw):
        return raw
    return ""


def metrics_shape_problem(m: Mapping[str, Any], max_history_chars: int) -> str:
    """Why a reply's metrics are too large or oddly named to look at further, or ''. Checked
    before anything is parsed, hashed or verified, so its cost is bounded by these limits."""
    if len(m) > MAX_METRIC_KEYS:
        return f"more than {MAX_METRIC_KEYS} metrics"
    for k, v in m.items():
        if not isinstance(k, str) or not METRIC_KEY_RE.fullmatch(k):
            return "a metric name is not 1-64 letters, digits or _.:<>+-"
        if isinstance(v, (str, bytes)):
            limit = max_history_chars if k == "history" else MAX_STRING
            if len(v) > limit:
                return f"metric {k!r} is longer than {limit} characters"
        elif isinstance(v, list):  # Flower metrics may hold lists of scalars
            return f"metric {k!r} is a list; the protocol sends scalars and strings only"
    return ""


def parse_fit_metrics(m: Mapping[str, Any], *, max_round: int = 0) -> SiteReport:
    """A fit reply's scalar metrics, validated; MalformedReport (naming the field) otherwise.

    ``max_round``: the history may name rounds up to it, one entry each, at most that many
    (the server passes the last round it began); 0: :data:`MAX_HISTORY`.
    """

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
    if site_id_problem(site_id):
        raise MalformedReport(f"metric 'site_id': {site_id_problem(site_id)}")
    try:
        status = Status(get("status", str))
    except ValueError:
        raise MalformedReport(f"metric 'status' must be one of {', '.join(s.value for s in Status)}") from None
    unit = get("unit", str)
    if not UNIT_RE.fullmatch(unit):
        raise MalformedReport("metric 'unit' must be 1-32 letters, digits, spaces or _.-")
    vals = {k: get(k, t) for k, t in _PLAN_KEYS.items()}
    steps = get("steps", int)
    for key in ("sample_rate", "noise_multiplier", "max_grad_norm", "delta"):
        if not math.isfinite(vals[key]):
            raise MalformedReport(f"metric {key!r} must be finite")
    n, q, sigma = vals["dataset_size"], vals["sample_rate"], vals["noise_multiplier"]
    if n < 1 or not (0 < q <= 1) or sigma < 0 or vals["steps_planned"] < 1:
        raise MalformedReport("accountant inputs out of range (dataset_size, sample_rate or noise_multiplier)")
    if not (0 <= steps <= vals["steps_planned"]):
        raise MalformedReport("metric 'steps' outside [0, steps_planned]")
    if vals["accountant"] not in KNOWN_ACCOUNTANTS:
        raise MalformedReport(f"unknown accountant (metric 'accountant' must be one of {', '.join(KNOWN_ACCOUNTANTS)})")
    if vals["steps_planned"] > MAX_STEPS:
        raise MalformedReport(f"metric 'steps_planned' above {MAX_STEPS}")
    if vals["accountant"] != NO_DP:
        lo, hi = SIGMA_RANGE
        if not lo <= sigma <= hi:
            raise MalformedReport(f"metric 'noise_multiplier' outside [{lo:g}, {hi:g}]")
        if not (vals["max_grad_norm"] > 0 and MIN_DELTA <= vals["delta"] < 1.0 / n):
            raise MalformedReport(
                "DP inputs out of range (max_grad_norm must be > 0, delta in [MIN_DELTA, 1/dataset_size))"
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
        raise MalformedReport("metric 'eps_budget' must be > 0")
    return SiteReport(
        site_id=site_id,
        unit=unit,
        status=status,
        plan=plan,
        steps_taken=steps,
        eps_budget=eps_budget,
        eps_spent=eps_spent if not math.isnan(eps_spent) else math.inf,
        note=note_of(m.get("note", "")),
        extra=extra,
        rng=rng,
        history=parse_history(m.get("history", "[]"), vals["accountant"], max_round),
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
        raise MalformedReport("metrics release inputs out of range (metrics_noise_multiplier, _l2_sensitivity, _delta)")
    rng = m.get("metrics_rng")
    if rng not in RNG_KINDS:
        raise MalformedReport(f"metric 'metrics_rng' must be one of {', '.join(RNG_KINDS)}")
    return MetricsSpend(z, sens, delta, str(rng))


# Rounds a history may hold when the caller states no limit (the server states its own:
# the last round it began); a run has far fewer.
MAX_HISTORY = 10_000


def history_limit(max_round: int) -> int:
    """Characters a history of rounds 1..max_round may take: checked before it is parsed."""
    return 2 + HISTORY_ENTRY_CHARS * max(max_round, 0)


def parse_history(raw: Any, accountant: str, max_round: int = 0) -> tuple[tuple[int, float, float, int], ...]:
    """A site's earlier rounds (the ``history`` metric), validated like a round's inputs.

    Rounds are in [1, max_round] (``max_round`` 0: :data:`MAX_HISTORY`), each at most once;
    the raw text is bounded by :func:`history_limit` before it is parsed, so a flooded
    history costs a length check, not a parse.
    """
    limit = max_round if max_round > 0 else MAX_HISTORY
    if not isinstance(raw, str):
        raise MalformedReport("metric 'history' must be a JSON string of [round, sigma, q, steps] entries")
    if len(raw) > history_limit(limit):
        raise MalformedReport("metric 'history' is longer than the rounds begun allow")
    try:
        items = json.loads(raw)
    except (ValueError, RecursionError):
        raise MalformedReport("metric 'history' is not valid JSON") from None
    if not isinstance(items, list):
        raise MalformedReport("metric 'history' must be a JSON list")
    if len(items) > limit:
        raise MalformedReport("metric 'history' has more entries than the rounds begun")
    out = []
    seen: set[int] = set()
    lo, hi = SIGMA_RANGE
    for i, item in enumerate(items):
        ok = isinstance(item, list) and len(item) == 4
        if ok:
            rnd, sigma, q, steps = item
            ok = (
                all(isinstance(v, int) and not isinstance(v, bool) for v in (rnd, steps))
                and all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (sigma, q)
                )
                and 0 < steps <= MAX_STEPS
                and 0 < q <= 1
                and (accountant == NO_DP or lo <= sigma <= hi)
            )
        if not ok:
            raise MalformedReport(f"metric 'history' has an invalid entry (entry {i + 1})")
        if not 1 <= rnd <= limit:
            raise MalformedReport(f"metric 'history' names a round outside the rounds begun (entry {i + 1})")
        if rnd in seen:
            raise MalformedReport(f"metric 'history' names one round twice (entry {i + 1})")
        seen.add(rnd)
        out.append((int(rnd), float(sigma), float(q), int(steps)))
    return tuple(out)
