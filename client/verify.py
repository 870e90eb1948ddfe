"""``privfed site verify``: a site checks the coordinator's ledger against its own records.

The site holds three things the coordinator cannot rewrite: its per-run state
(client.state: (round, sigma, q, steps) of every round it trained), its dataset's lifetime
history (the same rounds, keyed by run id) and the newest ledger receipt the coordinator
signed for it (client.app keeps it under ``<state-dir>/receipts/<run-id>/<site-id>.json``).
This compares them with a ledger (the ``ledger.sqlite`` of a run, or the part of it the
coordinator shares, read-only):

* every round the site trained is in the ledger with the same sigma, q and steps; a missing
  or changed round is named by its round number (never a value);
* the ledger charges the site for no training round it has no record of;
* the kept receipt's rows and signed head are in the ledger (``common.deploy.receipt_check``).

One line per finding; no finding: exit 0. What it cannot see: rows the coordinator never
showed this site (written after its last receipt), and other sites' rows.
"""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

from client.state import Lifetime, load_state, state_path
from common.deploy.receipts import Receipt, check_receipt
from common.errors import PrivfedError
from common.identifiers import run_id_problem, site_id_problem
from common.privacy.metrics_dp import DP_SGD

LEDGER_FILE = "ledger.sqlite"
# The ledger columns a training round is compared on, with the name a finding gives them.
_COMPARED = (("noise_multiplier", "σ"), ("sample_rate", "q"), ("steps", "steps"))


def ledger_file(ledger: str | Path) -> Path:
    p = Path(ledger).expanduser()
    if p.is_dir():
        p = p / LEDGER_FILE
    if not p.is_file():
        raise PrivfedError(f"ledger '{p}': not found (give the run's {LEDGER_FILE} or its folder)")
    return p


def read_ledger(path: Path) -> tuple[str, list[dict[str, Any]], list[dict[str, Any]]]:
    """(the ledger's run id, its rows, its signed heads) read-only, as dicts of column -> value."""
    try:
        conn = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise PrivfedError(f"ledger '{path}': cannot be opened ({exc})") from None
    conn.row_factory = sqlite3.Row
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "ledger" not in tables or "meta" not in tables:
            raise PrivfedError(f"ledger '{path}': not a privfed ledger (no ledger or meta table)")
        meta = conn.execute("SELECT value FROM meta WHERE key = 'run_id'").fetchone()
        rows = [dict(r) for r in conn.execute("SELECT * FROM ledger ORDER BY seq")]
        heads = [dict(r) for r in conn.execute("SELECT * FROM heads ORDER BY seq")] if "heads" in tables else []
    except sqlite3.Error as exc:
        raise PrivfedError(f"ledger '{path}': cannot be read ({exc})") from None
    finally:
        conn.close()
    return (str(meta[0]) if meta else ""), rows, heads


def _only(folder: Path, what: str, pattern: str) -> str:
    names = sorted(p.stem if p.is_file() else p.name for p in folder.glob(pattern))
    if len(names) != 1:
        raise PrivfedError(f"{folder}: {len(names)} {what}s found; name the one to check (--{what.replace(' ', '-')})")
    return names[0]


def lifetime_files(state_dir: Path, dataset_id: str = "") -> list[str]:
    """The dataset ids whose lifetime history is compared: the one named, else the only one
    in ``state-dir`` (a deployed site keeps one); none when several are kept side by side
    (a simulation's shared state dir) and none is named."""
    if dataset_id:
        return [dataset_id]
    names = sorted(p.stem for p in (state_dir / "datasets").glob("*.json"))
    return names if len(names) == 1 else []


def site_history(
    state_dir: Path, run_id: str, site_id: str, dataset_id: str = ""
) -> tuple[dict[int, tuple[float, float, int]], list[str]]:
    """round -> (sigma, q, steps) of every round the site trained in ``run_id``: its run state,
    completed by its dataset's lifetime history (:func:`lifetime_files`); findings where the two disagree."""
    state = load_state(state_path(state_dir, run_id, site_id))
    rounds = {r: (s, q, k) for r, s, q, k in (state.history if state else []) if k > 0}
    findings = []
    for name in lifetime_files(state_dir, dataset_id):
        for e in Lifetime(state_dir, name).load():
            if e.run_id != run_id or e.steps <= 0:
                continue
            mine = rounds.setdefault(e.round, (e.sigma, e.q, e.steps))
            if not _same(mine, (e.sigma, e.q, e.steps)):
                findings.append(f"round {e.round}: the site's run state and its lifetime history disagree")
    if state is None and not rounds:
        raise PrivfedError(f"state-dir {state_dir}: no record of run {run_id!r} for site {site_id!r}")
    return rounds, findings


def _same(a: tuple[float, float, int], b: tuple[float, float, int]) -> bool:
    return all(math.isclose(float(x), float(y), rel_tol=1e-12, abs_tol=0.0) for x, y in zip(a, b))


def load_kept_receipt(path: Path, server_key: str = "") -> Receipt:
    """The site's kept receipt; its signature was checked when it arrived, and again here
    when ``server_key`` is given."""
    text = path.read_text(encoding="utf-8")
    raw = json.loads(text)
    if server_key:
        return check_receipt(text, server_key, str(raw.get("site_id")), str(raw.get("run_id")))
    return Receipt(
        str(raw["run_id"]),
        str(raw["site_id"]),
        int(raw["round"]),
        int(raw["seq"]),
        str(raw["head"]),
        tuple(raw["rows"]),
        str(raw["signature"]),
        text,
    )


def _receipt_checker() -> Callable[[list[dict[str, Any]], list[dict[str, Any]], Receipt], str] | None:
    try:
        from common.deploy.receipt_check import compare  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return None
    return compare  # type: ignore[no-any-return,unused-ignore]


def compare_history(
    rounds: dict[int, tuple[float, float, int]], rows: list[dict[str, Any]], site_id: str
) -> tuple[list[str], int]:
    """Findings (one line each, round numbers only) and the number of rounds that match."""
    ledgered = {int(r["round"]): r for r in rows if r["site_id"] == site_id and r["mechanism"] == DP_SGD}
    findings, matched = [], 0
    for rnd in sorted(rounds):
        row = ledgered.get(rnd)
        if row is None:
            findings.append(f"round {rnd}: trained by this site, missing from the ledger")
            continue
        changed = [
            name
            for (col, name), mine in zip(_COMPARED, rounds[rnd])
            if not math.isclose(float(mine), float(row[col]), rel_tol=1e-12)
        ]
        if changed:
            findings.append(f"round {rnd}: the ledger's {', '.join(changed)} differ from the site's record")
        else:
            matched += 1
    for rnd in sorted(set(ledgered) - set(rounds)):
        if int(ledgered[rnd]["steps"]) > 0:
            findings.append(f"round {rnd}: the ledger charges this site for training it has no record of")
    return findings, matched


def verify_site(
    state_dir: str | Path,
    ledger: str | Path,
    run_id: str | None = None,
    site_id: str | None = None,
    server_key: str = "",
    dataset_id: str = "",
) -> tuple[list[str], str]:
    """(findings, summary line). No finding: the ledger agrees with everything the site holds."""
    folder = Path(state_dir).expanduser()
    if not folder.is_dir():
        raise PrivfedError(f"state-dir {folder}: not found")
    ledger_run, rows, heads = read_ledger(ledger_file(ledger))
    run = run_id if run_id is not None else ledger_run
    if run_id_problem(run):
        raise PrivfedError(f"run id: {run_id_problem(run)} (pass --run-id)")
    findings = []
    if ledger_run and ledger_run != run:
        findings.append("the ledger belongs to another run than the one checked")
    site = site_id if site_id is not None else _only(folder / run, "site id", "*.pt")
    if site_id_problem(site):
        raise PrivfedError(f"site id: {site_id_problem(site)}")
    rounds, disagree = site_history(folder, run, site, dataset_id)
    findings += disagree
    history_findings, matched = compare_history(rounds, rows, site)
    findings += history_findings

    receipt_note = "no receipt kept"
    kept = folder / "receipts" / run / f"{site}.json"
    if kept.is_file():
        try:
            receipt = load_kept_receipt(kept, server_key)
        except (PrivfedError, ValueError, KeyError, TypeError):
            findings.append("receipt: the kept receipt cannot be read or does not verify")
        else:
            compare = _receipt_checker()
            if compare is None:
                findings.append("receipt: not checked (this privfed has no common.deploy.receipt_check)")
            else:
                reason = compare(rows, heads, receipt)
                if reason:
                    findings.append(f"receipt: {reason}")
                receipt_note = f"receipt up to round {receipt.round} " + ("contradicted" if reason else "holds")
    if findings:
        return findings, f"FAILED: {len(findings)} finding(s) for site {site} in run {run}"
    return (
        findings,
        f"ok: the ledger holds this site's {matched} trained round(s) of run {run} unchanged; {receipt_note}",
    )
