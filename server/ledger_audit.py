"""`privfed audit RUN_DIR`: the privacy officer's view of a run's ledger.

Prints epsilon per round and per site (for the round and cumulative) with delta, the
unit of privacy, the accountant, the neighbouring relation and the budget left; exports CSV or JSON; and with
``--verify`` checks the hash chain, recomputes every epsilon from the recorded
accountant inputs, and compares the ledger head with the head hashes recorded in
``metrics.jsonl``. Reading is read-only: auditing never modifies the ledger.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sqlite3
from dataclasses import asdict
from pathlib import Path
from typing import Any

from common.errors import PrivfedError
from common.privacy.accounting import NO_DP
from common.privacy.metrics_dp import MECHANISM
from common.privacy.metrics_dp import UNIT as METRICS_UNIT
from common.seeds import RNG_SEEDED
from server.ledger import Ledger, LedgerRow, Verification
from server.recorder import json_safe
from server.report import read_metrics

COLUMNS = [
    "seq",
    "round",
    "site_id",
    "mechanism",
    "unit",
    "dataset_size",
    "sample_rate",
    "noise_multiplier",
    "max_grad_norm",
    "steps",
    "delta",
    "accountant",
    "neighbouring",
    "eps_round",
    "eps_total",
    "eps_budget",
    "budget_left",
    "used",
    "status",
    "rng",
    "recorded_at",
    "prev_hash",
    "row_hash",
]


def open_ledger(run_dir: Path) -> Ledger:
    path = Path(run_dir) / "ledger.sqlite"
    if not Path(run_dir).is_dir():
        raise PrivfedError(f"run dir '{run_dir}': not found")
    if not path.is_file():
        raise PrivfedError(f"run dir '{run_dir}': has no ledger.sqlite")
    try:
        ledger = Ledger(path)
        ledger.count()  # a file without the ledger table fails here, not mid-report
        return ledger
    except (ValueError, sqlite3.DatabaseError) as exc:
        raise PrivfedError(f"ledger '{path}': not a readable privfed ledger ({exc})") from None


def audit_rows(rows: list[LedgerRow]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        d = asdict(r)
        # Non-private rows have no budget to speak of (eps is infinite by construction).
        d["budget_left"] = None if r.accountant == NO_DP else r.eps_budget - r.eps_total
        out.append({k: d[k] for k in COLUMNS})
    return out


def render(rows: list[dict[str, Any]], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(json_safe(rows), indent=2)
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return buf.getvalue()
    raise PrivfedError(f"unknown format {fmt!r} (table, csv or json)")


def table(rows: list[dict[str, Any]], title: str):
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=escape(title))
    for col in (
        "round",
        "site",
        "mechanism",
        "ε round",
        "ε total",
        "budget left",
        "δ",
        "σ",
        "steps",
        "used",
        "status",
        "rng",
    ):
        t.add_column(col, justify="left" if col in ("site", "used", "status") else "right", no_wrap=True)
    for r in rows:
        t.add_row(
            str(r["round"]),
            escape(r["site_id"]),
            escape(r["mechanism"]),
            _fmt(r["eps_round"]),
            _fmt(r["eps_total"]),
            _fmt(r["budget_left"]),
            f"{r['delta']:.3g}",
            f"{r['noise_multiplier']:.3f}",
            str(r["steps"]),
            "yes" if r["used"] else "no",
            r["status"],
            r["rng"],
        )
    return t


def verify_run(run_dir: Path, ledger: Ledger) -> Verification:
    """Chain + recomputed epsilons + the head hash recorded in metrics.jsonl.

    Without a recorded head, rows cut from the end cannot be detected, so that is a
    failed verification too (a run that completed no round has no rows to verify)."""
    metrics = read_metrics(Path(run_dir) / "metrics.jsonl")
    expected = metrics[-1].get("ledger_head") if metrics else None
    result = ledger.verify(expected_head=expected)
    if result.ok and expected is None and result.rows:
        return Verification(
            False, result.rows, None, "no ledger head recorded in metrics.jsonl: a cut tail would go unnoticed"
        )
    return result


def describe_units(rows: list[LedgerRow]) -> str:
    if all(r.accountant == NO_DP for r in rows):
        return "non-private run: no DP guarantee (ε = ∞)"
    units = sorted({r.unit for r in rows if r.mechanism != MECHANISM})
    accountants = sorted({r.accountant for r in rows})
    deltas = sorted({r.delta for r in rows})
    relations = sorted({r.neighbouring for r in rows})
    metrics = any(r.mechanism == MECHANISM for r in rows)
    text = (
        f"unit of privacy: one {' / '.join(units)} (sample-level DP-SGD per site)"
        + (
            f"; noisy metrics: {MECHANISM} rows, unit {METRICS_UNIT}, composed with them per site; "
            if metrics
            else "; "
        )
        + f"accountant: {', '.join(accountants)}; δ: {', '.join(f'{d:.1e}' for d in deltas)}; "
        f"neighbouring: {', '.join(relations)} (site sizes public by declaration)"
    )
    return text + seeded_note(rows)


def seeded_note(rows: list[LedgerRow]) -> str:
    """A warning for rows whose noise was seeded: their ε holds only against whoever does not
    know federation.seed (the seed regenerates the noise and the sample)."""
    seeded = [r for r in rows if r.rng == RNG_SEEDED and r.accountant != NO_DP]
    if not seeded:
        return ""
    sites = sorted({r.site_id for r in seeded})
    return (
        f"; SEEDED noise in {len(seeded)} of {len(rows)} rows ({', '.join(sites)}): "
        "private only against those who do not know federation.seed"
    )


def _fmt(v: float | None) -> str:
    if v is None:
        return "–"
    return ("∞" if v > 0 else "-∞") if math.isinf(v) else f"{v:.3f}"
