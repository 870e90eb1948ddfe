"""`privfed audit RUN_DIR`: the privacy officer's view of a run's ledger.

Prints epsilon per round and per site (for the round and cumulative) with delta, the
unit of privacy, the accountant, the neighbouring relation and the budget left; exports CSV or JSON; and with
``--verify`` checks the hash chain, recomputes every epsilon from the recorded
accountant inputs, and compares the ledger head with the head hashes recorded in
``metrics.jsonl``. Reading is read-only: auditing never modifies the ledger.

Those checks only prove that the ledger agrees with itself: whoever can write the run
directory can rewrite a row, recompute ε and the chain, and rewrite metrics.jsonl (issue
19, finding 1). With the federation registry (``--registry``, default RUN/registry.toml)
``--verify`` also checks the ledger against keys (:func:`verify_against_keys`): every
site row follows from a claim signed by that site's registered key, and every signed
head verifies under the server's key and is in the chain. The coordinator holds its own
key, so what it alone can still do is listed in docs/PRIVACY.md ("What the signed ledger
proves"); the receipts sites keep catch what they were shown
(:func:`check_receipts_against_ledger`).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import re
import sqlite3
from dataclasses import asdict
from pathlib import Path
from typing import Any

from common.deploy import signing
from common.deploy.receipt_check import compare
from common.deploy.receipts import MAX_RECEIPT_BYTES, Receipt, ReceiptError, check_receipt
from common.deploy.registry import Registry
from common.errors import PrivfedError
from common.identifiers import CENTRAL_SITE_ID
from common.privacy.accounting import NO_DP
from common.privacy.metrics_dp import DP_SGD, MECHANISM
from common.protocol import MalformedReport, Status, parse_fit_metrics, parse_history, parse_metrics_spend
from common.seeds import RNG_SEEDED
from server.ledger import REFUSAL, Ledger, LedgerRow, Verification, claim_id, genesis_hash, head_claim, receipt_row
from server.run_files import json_safe, read_metrics

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
    from rich.table import Table

    from common.textsafe import console_text

    t = Table(title=console_text(title))
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
            console_text(r["site_id"]),
            console_text(r["mechanism"]),
            _fmt(r["eps_round"]),
            _fmt(r["eps_total"]),
            _fmt(r["budget_left"]),
            f"{r['delta']:.3g}",
            f"{r['noise_multiplier']:.3f}",
            str(r["steps"]),
            "yes" if r["used"] else "no",
            console_text(r["status"]),
            console_text(r["rng"]),
        )
    return t


def site_summary(rows: list[LedgerRow]) -> list[dict[str, Any]]:
    """One entry per ledgered site id (first-seen order): where its privacy spend ended.

    ``eps_total`` and ``delta`` are its last row's (the ledger composes every row of a site,
    whatever the mechanism, into that row's eps_total, at that row's δ); ``rounds`` counts the
    rounds in which it spent ε (a refusal or an out-of-budget round spends none);
    ``eps_budget`` is its last row's (a site's own policy may set a lower budget than the
    run's dp.epsilon-budget); ``budget_left`` is None for a non-private site (ε = ∞ by
    construction). ``unit`` names the training unit(s); a noisy-metrics row's unit is named
    only when the site has no other."""
    by_site: dict[str, list[LedgerRow]] = {}
    for r in rows:
        by_site.setdefault(r.site_id, []).append(r)
    out = []
    for site, mine in by_site.items():
        last = max(mine, key=lambda r: r.seq)
        units = sorted({r.unit for r in mine if r.mechanism != MECHANISM}) or sorted({r.unit for r in mine})
        spent = {r.round for r in mine if r.mechanism != REFUSAL and r.eps_round > 0}
        private = last.accountant != NO_DP
        out.append(
            {
                "site_id": site,
                "eps_total": last.eps_total,
                "delta": last.delta,
                "unit": " / ".join(units),
                "rounds": len(spent),
                "eps_budget": last.eps_budget if private else None,
                "budget_left": last.eps_budget - last.eps_total if private else None,
            }
        )
    return out


def summary_table(sites: list[dict[str, Any]], title: str):
    """The default ``privfed audit`` view: one line per site (``--rows`` shows the ledger)."""
    from rich.table import Table

    from common.textsafe import console_text

    t = Table(title=console_text(title))
    for col in ("site", "final ε", "δ", "unit", "rounds", "budget", "budget left"):
        t.add_column(col, justify="left" if col in ("site", "unit") else "right", no_wrap=True)
    for s in sites:
        t.add_row(
            console_text(s["site_id"]),
            _fmt(s["eps_total"]),
            f"{s['delta']:.3g}",
            console_text(s["unit"]),
            str(s["rounds"]),
            _fmt(s["eps_budget"]),
            _fmt(s["budget_left"]),
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


def verify_against_keys(ledger: Ledger, registry: Registry, rows: list[LedgerRow] | None = None) -> Verification:
    """Check the ledger against keys, not against itself (run :meth:`Ledger.verify` first).

    (a) every signed head verifies under ``registry.server_key``, is in the chain at its
    seq, and no later round's head is behind an earlier one's; (b) every site row follows
    from a claim signed by the key registered for its site: same run, same site, and the
    row's accountant inputs are the claim's (:func:`row_problem`); (c) the server's own rows
    (``all-sites``) come no later than the last signed head; (d) every round a verified
    claim's signed history names has a row (:func:`_unbacked_history`). The first failure
    names its row (seq) and why, with field names only. A ledger with rows but no signed
    head fails.
    """
    rows = ledger.rows() if rows is None else rows
    n = len(rows)
    by_seq = {r.seq: r for r in rows}
    heads = ledger.heads()
    if rows and not heads:
        return Verification(False, n, None, "no ledger head is signed by the server: nothing covers its own rows")
    last_seq = 0
    for h in heads:
        body = head_claim(ledger.run_id, h["round"], h["seq"], h["head"])
        if not signing.verify(registry.server_key, body, h["signature"]):
            why = f"the signed head of round {h['round']} does not verify under the registry's server key"
            return Verification(False, n, h["seq"] or None, why)
        at = genesis_hash(ledger.run_id) if h["seq"] == 0 else getattr(by_seq.get(h["seq"]), "row_hash", None)
        if at != h["head"]:
            why = f"the signed head of round {h['round']} is not the chain's hash at its seq (rows rewritten or cut)"
            return Verification(False, n, h["seq"] or None, why)
        if h["seq"] < last_seq:
            return Verification(False, n, h["seq"] or None, f"the signed head of round {h['round']} goes backwards")
        last_seq = h["seq"]
    claims = ledger.claims()
    good: dict[str, dict[str, Any]] = {}  # claim_id -> the parsed claim, once its signature verified
    previous: dict[str, LedgerRow] = {}  # each site's latest dp-sgd row so far
    for row in rows:
        if row.site_id == CENTRAL_SITE_ID:
            why = ""
            if row.claim_id:
                why = "the server's own row names a site claim"
            elif row.seq > last_seq:
                why = "the server's own row comes after the last signed head (no key covers it)"
        else:
            why = _site_row_problem(ledger.run_id, registry, row, claims, good, previous.get(row.site_id))
        if why:
            return Verification(False, n, row.seq, why)
        if row.mechanism == DP_SGD:
            previous[row.site_id] = row
    why = _unbacked_history(rows, good)
    if why:
        return Verification(False, n, None, why)
    return Verification(True, n)


def _unbacked_history(rows: list[LedgerRow], claims: dict[str, dict[str, Any]]) -> str:
    """(d) Every round a verified claim's signed ``history`` names has a DP-SGD row of that site.

    A site's reply lists every round it trained before; the server ledgers any it has no
    row for. So a round named there but absent from the ledger was dropped after the fact,
    however consistent the rest: the ledger itself holds the site's signature saying so."""
    have = {(r.site_id.split("@node-")[0], r.round) for r in rows if r.mechanism == DP_SGD}
    for claim in claims.values():
        metrics = claim.get("metrics")
        if not isinstance(metrics, dict) or not isinstance(metrics.get("history"), str):
            continue
        site = metrics.get("site_id")
        try:
            entries = json.loads(metrics["history"])
        except ValueError:
            continue  # a history that does not parse was refused with its row (row_problem)
        for entry in entries if isinstance(entries, list) else []:
            rnd = entry[0] if isinstance(entry, list) and entry else None
            if isinstance(rnd, int) and (site, rnd) not in have:
                return f"site {site}'s signed history names round {rnd}, which has no row (dropped from the ledger)"
    return ""


_DUPLICATE = re.compile(r"(.+)@node-[0-9]+")


def _site_row_problem(
    run_id: str,
    registry: Registry,
    row: LedgerRow,
    claims: dict[str, tuple[str, str, str]],
    good: dict[str, dict[str, Any]],
    previous: LedgerRow | None,
) -> str:
    # A second signed reply for one site in one round (its key on two nodes) is ledgered as
    # "<site>@node-<id>" (server.replies): its spend is real, and its claim is the site's.
    stored_as = row.site_id
    dup = _DUPLICATE.fullmatch(row.site_id)
    if dup is not None:
        row = dataclasses.replace(row, site_id=dup.group(1))
    site = registry.site(row.site_id)
    if site is None:
        return "its site_id is not in the registry"
    if not row.claim_id:
        return "it has no site claim (claim_id empty)"
    if row.claim_id not in claims:
        return "its claim_id names no stored claim"
    claim_site, text, signature = claims[row.claim_id]
    if claim_site not in (row.site_id, stored_as):
        return "its claim is stored for another site"
    if row.claim_id not in good:
        if claim_id(text) != row.claim_id:
            return "its stored claim does not hash to its claim_id"
        try:
            claim = json.loads(text)
        except ValueError:
            return "its stored claim is not JSON"
        if not isinstance(claim, dict) or not signing.verify(site.public_key, claim, signature):
            return "its claim's signature does not verify under the site's registered key"
        good[row.claim_id] = claim
    return row_problem(run_id, row, good[row.claim_id], previous)


def row_problem(run_id: str, row: LedgerRow, claim: dict[str, Any], previous: LedgerRow | None = None) -> str:
    """Why ``row`` does not follow from the site's (verified) ``claim``, or ''.

    ``previous``: the site's dp-sgd row before this one, where an evaluate reply's catch-up
    rows took their δ and accountant from."""
    if claim.get("run_id") != run_id:
        return "its claim is for another run (run_id)"
    kind, rnd = claim.get("kind"), claim.get("round")
    if isinstance(rnd, bool) or not isinstance(rnd, int):
        return "its claim has no round"
    if row.mechanism == REFUSAL:
        if kind != REFUSAL or claim.get("site_id") != row.site_id or rnd != row.round:
            return "a refusal row needs the site's refusal claim for that round (kind, site_id, round)"
        return ""
    metrics = claim.get("metrics")
    if kind not in ("fit", "evaluate") or not isinstance(metrics, dict):
        return "its claim is not a fit or evaluate reply (kind, metrics)"
    if metrics.get("site_id") != row.site_id:
        return "its claim is another site's (metrics.site_id)"
    try:
        if row.mechanism == MECHANISM:
            return _metrics_row_problem(row, kind, rnd, metrics)
        if row.mechanism != DP_SGD:
            return f"mechanism {row.mechanism!r} is not one a site claim accounts for"
        if kind == "fit" and rnd == row.round:
            return _fit_row_problem(row, metrics)
        return _catch_up_problem(row, kind, rnd, metrics, previous)
    except MalformedReport as exc:
        return f"its claim's metrics do not parse ({str(exc).split(' got ')[0][:120]})"


def _differs(row: LedgerRow, expected: dict[str, Any]) -> str:
    bad = [k for k, v in expected.items() if getattr(row, k) != v]
    return f"{', '.join(bad)} differ{'s' if len(bad) == 1 else ''} from the site's signed claim" if bad else ""


def _fit_row_problem(row: LedgerRow, metrics: dict[str, Any]) -> str:
    report = parse_fit_metrics(metrics)
    p = report.plan
    expected: dict[str, Any] = {
        "dataset_size": p.dataset_size,
        "sample_rate": p.sample_rate,
        "noise_multiplier": p.noise_multiplier,
        "max_grad_norm": p.max_grad_norm,
        "delta": p.delta,
        "accountant": p.accountant,
        "eps_budget": report.eps_budget,
        "unit": report.unit,
        "rng": report.rng,
    }
    # A site out of budget did not train: its row takes no steps, whatever the count says.
    if not (report.status is Status.BUDGET_EXHAUSTED and row.steps == 0):
        expected["steps"] = report.steps_taken
    return _differs(row, expected)


def _catch_up_problem(row: LedgerRow, kind: str, rnd: int, metrics: dict[str, Any], previous: LedgerRow | None) -> str:
    """A round the site reported late (its reply lost): an entry of the claim's history."""
    if row.round > rnd or (kind == "fit" and row.round == rnd):
        return "a catch-up row must be for a round before its claim's"
    if kind == "fit":
        plan = parse_fit_metrics(metrics).plan
        source: dict[str, Any] = {"delta": plan.delta, "accountant": plan.accountant}
    elif previous is not None:
        source = {"delta": previous.delta, "accountant": previous.accountant}
    else:
        return "a catch-up row from an evaluate reply needs an earlier dp-sgd row of the site"
    entry = (row.round, row.noise_multiplier, row.sample_rate, row.steps)
    if entry not in parse_history(metrics.get("history", "[]"), row.accountant):
        return "(round, noise_multiplier, sample_rate, steps) is not an entry of the claim's history"
    return _differs(row, source)


def _metrics_row_problem(row: LedgerRow, kind: str, rnd: int, metrics: dict[str, Any]) -> str:
    if rnd != row.round:
        return "a metrics release row must be for its claim's round"
    release = parse_metrics_spend(metrics)
    if release is None:
        return "its claim declares no metrics release"
    expected: dict[str, Any] = {
        "noise_multiplier": release.noise_multiplier,
        "max_grad_norm": release.l2_sensitivity,
        "delta": release.delta,
        "rng": release.rng,
        "sample_rate": 1.0,
        "steps": 1,
    }
    if kind == "fit":
        expected["accountant"] = parse_fit_metrics(metrics).plan.accountant
    return _differs(row, expected)


def check_receipts_against_ledger(ledger: Ledger, receipts: list[Receipt]) -> str:
    """Why the ledger contradicts one of the sites' kept receipts (the first), or ''.

    Each receipt should already have been checked with ``check_receipt`` (the server's
    signature). A rewrite, a cut, a dropped or inserted row of the site before the signed
    seq, or a re-signed (forked) ledger shows here, even when the ledger's own chain and
    heads are consistent."""
    rows = [{**receipt_row(r), "prev_hash": r.prev_hash} for r in ledger.rows()]
    heads = ledger.heads()
    for rec in receipts:
        if rec.run_id != ledger.run_id:
            return f"a receipt of site {rec.site_id!r} is for another run"
        why = compare(rows, heads, rec)
        if why:
            return f"site {rec.site_id!r}, receipt of round {rec.round}: {why}"
    return ""


def load_receipts(folder: str | Path, registry: Registry, run_id: str) -> list[Receipt]:
    """Every receipt (``*.json``) under ``folder``, each checked against the server's key in
    ``registry`` and meant for a registered site of this run; PrivfedError naming the file."""
    root = Path(folder)
    if not root.is_dir():
        raise PrivfedError(f"receipts '{root}': not a folder")
    out = []
    for path in sorted(root.rglob("*.json")):
        try:
            text = path.read_text(encoding="utf-8")
            site = json.loads(text).get("site_id") if len(text) <= MAX_RECEIPT_BYTES else None
        except (OSError, UnicodeDecodeError, ValueError, AttributeError):
            site = None
        if not isinstance(site, str) or registry.site(site) is None:
            raise PrivfedError(f"receipt '{path}': unreadable, or not for a registered site")
        try:
            out.append(check_receipt(text, registry.server_key, site, run_id))
        except ReceiptError as exc:
            raise PrivfedError(f"receipt '{path}': {exc}") from None
    return out


def load_registry(run_dir: Path, path: str | Path | None) -> Registry | None:
    """``path``, or RUN/registry.toml when it exists; None when there is no registry."""
    if path is not None:
        return Registry.load(path)
    default = Path(run_dir) / "registry.toml"
    return Registry.load(default) if default.is_file() else None


def describe_units(rows: list[LedgerRow]) -> str:
    if all(r.accountant == NO_DP for r in rows):
        return "non-private run: no DP guarantee (ε = ∞)"
    units = sorted({r.unit for r in rows if r.mechanism != MECHANISM})
    accountants = sorted({r.accountant for r in rows})
    deltas = sorted({r.delta for r in rows})
    relations = sorted({r.neighbouring for r in rows})
    metrics = any(r.mechanism == MECHANISM for r in rows)
    release_units = " / ".join(sorted({r.unit for r in rows if r.mechanism == MECHANISM}))
    level = "user" if units == ["user"] else "sample"
    text = (
        f"unit of privacy: one {' / '.join(units)} ({level}-level DP-SGD per site)"
        + (
            f"; noisy metrics: {MECHANISM} rows, unit {release_units}, composed with them per site; "
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
