"""The privacy ledger: an append-only, hash-chained SQLite table, one row per (round, site).

Each row holds every input an accountant needs (q, sigma, steps, delta, accountant),
the mechanism it charges (``dp-sgd`` training rounds, ``gaussian-metrics`` noisy
evaluation statistics with q = 1 and one step; a site's cumulative epsilon composes all
its rows, whatever the mechanism) and the epsilon the ledger computed from them with that accountant
(:func:`common.privacy.accounting.epsilon`), so the numbers can be recomputed independently.
``dataset_size`` is the site's declared public size n-hat (never its real size), and
``neighbouring`` names the relation the epsilon is for (``add-remove``: one example added
or removed, the site's size public by declaration; see docs/PRIVACY.md).

Tamper evidence: ``row_hash = SHA-256(prev_hash || canonical JSON of the row)``.
Any edit, insertion or deletion breaks the chain from that row on. SQLite triggers
refuse UPDATE and DELETE so that honest code cannot rewrite history by accident.
Someone with write access who also recomputes every later hash is *not* detected
by the chain alone (the chain has no key); each round's head hash is also written to
``metrics.jsonl``, but by the same process into the same folder.

What does hold against a rewrite is keys (issue 19): every site row carries the id of the
site's signed claim (table ``claims``: the claim text and the site's Ed25519 signature,
stored once per reply), and the server signs each round's head with its own key (table
``heads``) and sends each site a *receipt* (:meth:`Ledger.receipt`). An auditor checks
rows against the sites' registered keys and heads against the server's
(:func:`server.ledger_audit.verify_against_keys`); sites compare the receipts they kept
(:mod:`common.deploy.receipt_check`). See docs/PRIVACY.md, "What the signed ledger proves".
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common.deploy.fileio import PRIVATE_FILE, create_private_file
from common.deploy.signing import CLAIM_VERSION, Ed25519PrivateKey, sign
from common.identifiers import CENTRAL_SITE_ID
from common.privacy.accounting import NEIGHBOURING, RoundPlan, epsilon
from common.privacy.metrics_dp import DP_SGD
from common.seeds import RNG_KINDS

# A site that refused the run config by its own policy (a signed refusal): a row that
# charges nothing (steps 0, eps_round 0, eps_total the site's running total).
REFUSAL = "refusal"
# What one row may hold, whatever a reply says (issue 19, finding 2): SQLite's INTEGER is
# 64-bit, and every string lands in the ledger, metrics.jsonl and receipts.
MAX_ROUND = 2**31 - 1
MAX_TEXT = 128  # unit, status, mechanism, accountant, neighbouring
MAX_CLAIM_BYTES = 8_000_000  # a claim holds a reply's metrics, its history included
_ROW_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_@.-]{0,127}")  # site ids, and "<site>@node-<id>"
_SIGNATURE_RE = re.compile(r"[0-9a-f]{128}")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS ledger (
    seq              INTEGER PRIMARY KEY,
    round            INTEGER NOT NULL,
    site_id          TEXT    NOT NULL,
    unit             TEXT    NOT NULL,
    dataset_size     INTEGER NOT NULL,
    sample_rate      REAL    NOT NULL,
    noise_multiplier REAL    NOT NULL,
    max_grad_norm    REAL    NOT NULL,
    steps            INTEGER NOT NULL,
    delta            REAL    NOT NULL,
    accountant       TEXT    NOT NULL,
    neighbouring     TEXT    NOT NULL,
    eps_round        REAL    NOT NULL,
    eps_total        REAL    NOT NULL,
    eps_budget       REAL    NOT NULL,
    used             INTEGER NOT NULL,
    status           TEXT    NOT NULL,
    rng              TEXT    NOT NULL,
    recorded_at      TEXT    NOT NULL,
    mechanism        TEXT    NOT NULL,
    claim_id         TEXT    NOT NULL,
    prev_hash        TEXT    NOT NULL,
    row_hash         TEXT    NOT NULL,
    UNIQUE (round, site_id, mechanism)
);
CREATE TRIGGER IF NOT EXISTS ledger_no_update BEFORE UPDATE ON ledger
    BEGIN SELECT RAISE(ABORT, 'privacy ledger is append-only'); END;
CREATE TRIGGER IF NOT EXISTS ledger_no_delete BEFORE DELETE ON ledger
    BEGIN SELECT RAISE(ABORT, 'privacy ledger is append-only'); END;
CREATE TABLE IF NOT EXISTS claims (
    claim_id  TEXT PRIMARY KEY,
    site_id   TEXT NOT NULL,
    claim     TEXT NOT NULL,
    signature TEXT NOT NULL
);
CREATE TRIGGER IF NOT EXISTS claims_no_update BEFORE UPDATE ON claims
    BEGIN SELECT RAISE(ABORT, 'privacy ledger is append-only'); END;
CREATE TRIGGER IF NOT EXISTS claims_no_delete BEFORE DELETE ON claims
    BEGIN SELECT RAISE(ABORT, 'privacy ledger is append-only'); END;
CREATE TABLE IF NOT EXISTS heads (
    round     INTEGER,
    seq       INTEGER,
    head      TEXT,
    signature TEXT,
    PRIMARY KEY (round)
);
CREATE TRIGGER IF NOT EXISTS heads_no_update BEFORE UPDATE ON heads
    BEGIN SELECT RAISE(ABORT, 'privacy ledger is append-only'); END;
CREATE TRIGGER IF NOT EXISTS heads_no_delete BEFORE DELETE ON heads
    BEGIN SELECT RAISE(ABORT, 'privacy ledger is append-only'); END;
"""


@dataclass(frozen=True)
class SiteSpend:
    """What the server learned from one site this round (its reported accountant inputs)."""

    site_id: str
    unit: str
    plan: RoundPlan
    steps_taken: int  # noisy steps actually taken; 0 if the site did not train
    eps_budget: float
    used: bool  # whether the update entered the aggregate
    status: str  # trained | budget_exhausted | ...
    # os | seeded (common.seeds.RNG_KINDS): the randomness the noise and sampling came from,
    # as the site reports it (the server's own for the client-level row).
    rng: str
    # What was released: "dp-sgd" (the site's training round), "gaussian-metrics" (its
    # noisy evaluation statistics, common.privacy.metrics_dp), "dp-fedavg" (client-level).
    mechanism: str = DP_SGD
    # The site's signed claim this row follows from (common.deploy.signing.reply_claim or
    # refusal_claim, as canonical JSON text) and its signature (hex); "" for the server's
    # own rows, which the server's signed heads cover instead.
    claim: str = ""
    signature: str = ""


@dataclass(frozen=True)
class LedgerRow:
    seq: int
    round: int
    site_id: str
    unit: str
    dataset_size: int
    sample_rate: float
    noise_multiplier: float
    max_grad_norm: float
    steps: int
    delta: float
    accountant: str
    neighbouring: str  # the relation eps is for (common.privacy.accounting.NEIGHBOURING)
    eps_round: float
    eps_total: float
    eps_budget: float
    used: bool
    status: str
    rng: str
    recorded_at: str
    mechanism: str
    claim_id: str  # sha256 of the claim text in table ``claims``; "" for the server's own rows
    prev_hash: str
    row_hash: str

    def accountant_input(self) -> tuple[float, float, int]:
        return (self.noise_multiplier, self.sample_rate, self.steps)


HASHED_FIELDS = [f.name for f in fields(LedgerRow) if f.name not in ("prev_hash", "row_hash")]


def row_digest(prev_hash: str, values: dict) -> str:
    """SHA-256 over the previous hash and a canonical JSON encoding of the row."""
    canon = json.dumps({k: values[k] for k in HASHED_FIELDS}, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256((prev_hash + "\n" + canon).encode()).hexdigest()


def genesis_hash(run_id: str) -> str:
    return hashlib.sha256(f"privfed-ledger-v1:{run_id}".encode()).hexdigest()


def head_claim(run_id: str, rnd: int, seq: int, head: str) -> dict[str, Any]:
    """What the server signs for one round's head (:meth:`Ledger.sign_head`)."""
    return {"v": CLAIM_VERSION, "run_id": run_id, "round": int(rnd), "seq": int(seq), "head": head}


def receipt_row(row: LedgerRow) -> dict[str, Any]:
    """One row as receipts carry it: its hashed fields (claim_id included) and its row_hash."""
    return {**{k: getattr(row, k) for k in HASHED_FIELDS}, "row_hash": row.row_hash}


def claim_id(claim: str) -> str:
    """A claim's id in table ``claims``: the SHA-256 of its text."""
    return _claim_id(claim)


def spend_problem(s: SiteSpend) -> str:
    """Why one spend cannot be ledgered, or ''. Names fields, never repeats a value.

    The server calls it on each reply's spends before ledgering them, so that a reply the
    ledger would refuse is refused with its reason, alone (:meth:`Ledger.record_round`
    checks the same)."""
    if not isinstance(s.site_id, str) or not (s.site_id == CENTRAL_SITE_ID or _ROW_ID_RE.fullmatch(s.site_id)):
        return "site_id must be 1-128 letters, digits, '_', '-', '.' or '@'"
    for name in ("unit", "status", "mechanism"):
        v = getattr(s, name)
        if not isinstance(v, str) or not 0 < len(v) <= MAX_TEXT or not v.isprintable():
            return f"{name} must be printable text of 1-{MAX_TEXT} characters"
    if s.rng not in RNG_KINDS:  # the column states a fact; no other value is one
        return f"rng must be one of {', '.join(RNG_KINDS)}"
    p = s.plan
    if not isinstance(p.accountant, str) or not 0 < len(p.accountant) <= MAX_TEXT:
        return f"accountant must be text of 1-{MAX_TEXT} characters"
    if p.neighbouring not in NEIGHBOURING:
        return f"neighbouring must be one of {', '.join(NEIGHBOURING)}"
    if isinstance(p.dataset_size, bool) or not isinstance(p.dataset_size, int) or not 0 <= p.dataset_size < 2**62:
        return "dataset_size must be a non-negative integer in range"
    for name in ("sample_rate", "noise_multiplier", "max_grad_norm", "delta"):
        v = getattr(p, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            return f"{name} must be a finite non-negative number"
    if p.sample_rate > 1 or p.delta >= 1:
        return "sample_rate must be at most 1 and delta below 1"
    steps = s.steps_taken
    if isinstance(steps, bool) or not isinstance(steps, int) or not 0 <= steps <= MAX_ROUND:
        return "steps must be a non-negative integer in range"
    budget = s.eps_budget
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or math.isnan(budget):
        return "eps_budget must be a number"
    if not isinstance(s.used, bool):
        return "used must be a bool"
    if s.mechanism == REFUSAL and (steps != 0 or s.used):
        return "a refusal row takes no steps and is not used"
    if not isinstance(s.claim, str) or not isinstance(s.signature, str):
        return "claim and signature must be text"
    if s.site_id == CENTRAL_SITE_ID and s.claim:
        return "the server's own row carries no site claim (its signed heads cover it)"
    if s.claim and not _SIGNATURE_RE.fullmatch(s.signature):
        return "signature must be 128 hex digits"
    if not s.claim and s.signature:
        return "a signature without its claim"
    return ""


@dataclass(frozen=True)
class Verification:
    ok: bool
    rows: int
    first_bad_seq: int | None = None
    reason: str = ""
    # Rows after the recorded head: the round a server was stopped in before it wrote its
    # metrics line. They can only add spend, never hide any, so they pass, with this count.
    unrecorded: int = 0


class Ledger:
    """Open (or create) the ledger of one run."""

    def __init__(self, path: str | Path, run_id: str | None = None) -> None:
        """With ``run_id``: open or create the run's ledger for writing. Without: open an
        existing ledger read-only (auditing must not modify what it audits)."""
        self.path = Path(path)
        if run_id is None:
            if not self.path.is_file():
                raise FileNotFoundError(f"{self.path}: no such ledger")
            self.conn = _open_read_only(self.path)
        else:
            _private_files(self.path)
            self.conn = sqlite3.connect(self.path)
            _durable(self.conn)
            try:
                self._check_columns()  # an older ledger is refused before anything is added to it
            except ValueError:
                self.conn.close()
                raise
            with self.conn:
                self.conn.executescript(SCHEMA)
        try:
            stored = self._meta("run_id")
        except sqlite3.DatabaseError:
            raise ValueError(f"{self.path} is not a privfed ledger") from None
        if stored is None:
            if run_id is None:
                raise ValueError(f"{self.path} is not a privfed ledger (no run_id)")
            with self.conn:
                self.conn.execute("INSERT INTO meta VALUES ('run_id', ?)", (run_id,))
                self.conn.execute("INSERT INTO meta VALUES ('schema', 'privfed-ledger-v1')")
            stored = run_id
        elif run_id is not None and stored != run_id:
            raise ValueError(f"{self.path} belongs to run {stored!r}, not {run_id!r}")
        self.run_id = stored
        # site -> (round of the last signed head, its receipt): rows and heads up to a signed
        # head never change, so a site's receipt is made once per head, not per instruction.
        self._receipts: dict[str, tuple[int, str]] = {}
        self._check_columns()

    def _check_columns(self) -> None:
        """Refuse a ledger from before a column was added (the one migration path): its rows
        cannot say what they now must (e.g. their neighbouring relation)."""
        try:
            have = {r[1] for r in self.conn.execute("PRAGMA table_info(ledger)")}
        except sqlite3.DatabaseError:
            return  # not a database at all: the run_id read reports it
        missing = [f.name for f in fields(LedgerRow) if f.name not in have]
        if have and missing:
            raise ValueError(
                f"{self.path} was written by an older privfed (no ledger column {missing[0]!r}); "
                "read it with that version, or start a new run"
            )

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _meta(self, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    # ------------------------------------------------------------------ reads
    def rows(self) -> list[LedgerRow]:
        cur = self.conn.execute(f"SELECT {', '.join(f.name for f in fields(LedgerRow))} FROM ledger ORDER BY seq")
        return [_row(r) for r in cur.fetchall()]

    def claims(self) -> dict[str, tuple[str, str, str]]:
        """claim_id -> (site_id, claim text, signature), every claim the ledger holds."""
        cur = self.conn.execute("SELECT claim_id, site_id, claim, signature FROM claims")
        return {r[0]: (r[1], r[2], r[3]) for r in cur}

    def heads(self) -> list[dict[str, Any]]:
        """The server's signed heads, by round: ``{round, seq, head, signature}`` each."""
        cur = self.conn.execute("SELECT round, seq, head, signature FROM heads ORDER BY round")
        return [{"round": int(r[0]), "seq": int(r[1]), "head": r[2], "signature": r[3]} for r in cur]

    def count(self) -> int:
        return int(self.conn.execute("SELECT COUNT(*) FROM ledger").fetchone()[0])

    def head(self) -> str:
        r = self.conn.execute("SELECT row_hash FROM ledger ORDER BY seq DESC LIMIT 1").fetchone()
        return genesis_hash(self.run_id) if r is None else r[0]

    def history(self, site_id: str) -> list[tuple[float, float, int]]:
        cur = self.conn.execute(
            "SELECT noise_multiplier, sample_rate, steps FROM ledger WHERE site_id = ? AND steps > 0 ORDER BY seq",
            (site_id,),
        )
        return [tuple(r) for r in cur.fetchall()]

    def rounds(self, site_id: str) -> set[int]:
        """The rounds that have a DP-SGD row for this site (a metrics row is not a training round)."""
        cur = self.conn.execute("SELECT round FROM ledger WHERE site_id = ? AND mechanism = ?", (site_id, DP_SGD))
        return {int(r[0]) for r in cur}

    def last_row(self, site_id: str) -> LedgerRow | None:
        """The site's latest DP-SGD row, or None if it has none."""
        cols = ", ".join(f.name for f in fields(LedgerRow))
        r = self.conn.execute(
            f"SELECT {cols} FROM ledger WHERE site_id = ? AND mechanism = ? ORDER BY seq DESC LIMIT 1",
            (site_id, DP_SGD),
        ).fetchone()
        return None if r is None else _row(r)

    def last_round(self) -> int:
        """The highest round with a row (0 for an empty ledger)."""
        return int(self.conn.execute("SELECT COALESCE(MAX(round), 0) FROM ledger").fetchone()[0])

    def round_started(self) -> int:
        """The last round the server began (see :meth:`start_round`); 0 if none."""
        return int(self._meta("round_started") or 0)

    def start_round(self, rnd: int) -> None:
        """Mark round ``rnd`` begun, durably, before any site is asked to train in it.

        A resumed run never reuses a begun round's number: a site may have trained in it
        and its row may arrive later (a catch-up row), which must not collide.
        """
        with self.conn:
            self.conn.execute("INSERT OR REPLACE INTO meta VALUES ('round_started', ?)", (str(int(rnd)),))

    def projected_total(
        self, site_id: str, mechanism: tuple[float, float, int], delta: float, accountant: str
    ) -> float:
        """Cumulative epsilon the site would have after one more round with ``mechanism``."""
        return epsilon(self.history(site_id) + [mechanism], delta, accountant)

    def spent(self) -> dict[str, float]:
        """Latest cumulative epsilon per site."""
        out: dict[str, float] = {}
        for row in self.rows():
            out[row.site_id] = row.eps_total
        return out

    # ----------------------------------------------------------------- writes
    def record_round(
        self, rnd: int, spends: Iterable[SiteSpend], catch_up: Iterable[tuple[int, SiteSpend]] = ()
    ) -> list[LedgerRow]:
        """Append one row per site for round ``rnd``, in one transaction (all or nothing).

        ``catch_up`` rows (earlier rounds whose replies never arrived, as the sites report
        them) go first, each under its own round number, which must be before ``rnd``.

        Every entry is checked before anything is written (:func:`spend_problem`, the round
        numbers, one row per (round, site, mechanism), ε computable): a bad one raises
        ``ValueError`` naming its site and field, and nothing of the call is written. The
        server ledgers each reply with its own call, so one bad reply never costs another
        site its rows (issue 19, finding 2).
        """
        rnd = _round_number(rnd, "round")
        late = sorted(catch_up, key=lambda e: (_sort_round(e[0]), str(e[1].site_id)))
        entries = late + [(rnd, s) for s in sorted(spends, key=lambda s: str(s.site_id))]
        parsed: dict[str, str] = {}  # claim text -> claim_id, each parsed once
        for i, (entry_round, s) in enumerate(entries):
            why = spend_problem(s)
            if not why and i < len(late):
                r = entry_round
                if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r < rnd:
                    why = "a catch-up round must be an integer round before the one recorded"
            if not why and s.claim and s.claim not in parsed:
                why = _claim_problem(s.claim)
                parsed[s.claim] = _claim_id(s.claim)
            if why:
                raise ValueError(f"ledger entry of site {_printable(s.site_id)!r}: {why}")
        written: list[LedgerRow] = []
        now = datetime.now(UTC).isoformat(timespec="seconds")
        with self.conn:  # COMMIT, or ROLLBACK on any exception
            # Take the write lock before reading the head, so the head, the next seq and
            # every row of the round belong to one transaction (another writer waits).
            self.conn.execute("BEGIN IMMEDIATE")
            prev = self.head()
            seq = (self.conn.execute("SELECT COALESCE(MAX(seq), 0) FROM ledger").fetchone()[0]) + 1
            histories: dict[str, list[tuple[float, float, int]]] = {}
            totals: dict[str, float] = {}
            taken: set[tuple[int, str, str]] = set()
            for entry_round, s in entries:
                where = f"ledger entry of site {s.site_id!r} (round {entry_round}, {s.mechanism})"
                key = (int(entry_round), s.site_id, s.mechanism)
                if key in taken or self._has_row(*key):  # an IntegrityError would say less
                    raise ValueError(f"{where}: the ledger already has this row; a row is written once")
                taken.add(key)
                why = self._claim_conflict(s, parsed)
                if why:
                    raise ValueError(f"{where}: {why}")
                p = s.plan
                hist = histories.setdefault(s.site_id, self.history(s.site_id))
                if s.site_id not in totals:
                    totals[s.site_id] = self._last_total(s.site_id)
                if s.mechanism == REFUSAL:
                    eps_round, eps_total = 0.0, totals[s.site_id]  # charges nothing
                else:
                    mech = (p.noise_multiplier, p.sample_rate, s.steps_taken)
                    try:
                        eps_round = epsilon([mech], p.delta, p.accountant)
                        eps_total = epsilon(hist + [mech], p.delta, p.accountant)
                    except Exception as exc:  # an input no accountant accepts: this entry, not a crash
                        why = f"ε cannot be computed from its inputs ({type(exc).__name__})"
                        raise ValueError(f"{where}: {why}") from None
                    if s.steps_taken > 0:
                        hist.append(mech)
                totals[s.site_id] = eps_total
                values = dict(
                    seq=seq,
                    round=int(entry_round),
                    site_id=s.site_id,
                    unit=s.unit,
                    dataset_size=p.dataset_size,
                    sample_rate=p.sample_rate,
                    noise_multiplier=p.noise_multiplier,
                    max_grad_norm=p.max_grad_norm,
                    steps=s.steps_taken,
                    delta=p.delta,
                    accountant=p.accountant,
                    neighbouring=p.neighbouring,
                    eps_round=eps_round,
                    eps_total=eps_total,
                    eps_budget=s.eps_budget,
                    used=bool(s.used),
                    status=s.status,
                    rng=s.rng,
                    recorded_at=now,
                    mechanism=s.mechanism,
                    claim_id=parsed[s.claim] if s.claim else "",
                )
                values = {k: _canonical(v) for k, v in values.items()}
                row = LedgerRow(**values, prev_hash=prev, row_hash=row_digest(prev, values))
                # Written as computed, in the one transaction: an entry failing later rolls
                # every row of the call back (the `with`), so the call is still all or nothing.
                if s.claim:
                    self.conn.execute(
                        "INSERT OR IGNORE INTO claims VALUES (?, ?, ?, ?)",
                        (parsed[s.claim], s.site_id, s.claim, s.signature),
                    )
                self.conn.execute(
                    f"INSERT INTO ledger VALUES ({', '.join('?' * len(fields(LedgerRow)))})",
                    [_sql(v) for v in asdict(row).values()],
                )
                written.append(row)
                prev, seq = row.row_hash, seq + 1
        return written

    def _has_row(self, rnd: int, site_id: str, mechanism: str) -> bool:
        cur = self.conn.execute(
            "SELECT 1 FROM ledger WHERE round = ? AND site_id = ? AND mechanism = ?", (rnd, site_id, mechanism)
        )
        return cur.fetchone() is not None

    def _last_total(self, site_id: str) -> float:
        """The site's running ε: its latest row's eps_total, whatever the mechanism (0 if none)."""
        r = self.conn.execute(
            "SELECT eps_total FROM ledger WHERE site_id = ? ORDER BY seq DESC LIMIT 1", (site_id,)
        ).fetchone()
        return 0.0 if r is None else float(r[0])

    def _claim_conflict(self, s: SiteSpend, parsed: dict[str, str]) -> str:
        """Why this claim clashes with a stored one of the same id (another site or signature;
        never expected: Ed25519 signs deterministically and the server ledgers verified claims)."""
        if not s.claim:
            return ""
        r = self.conn.execute("SELECT site_id, signature FROM claims WHERE claim_id = ?", (parsed[s.claim],))
        stored = r.fetchone()
        if stored is None or (stored[0] == s.site_id and stored[1] == s.signature):
            return ""
        return "its claim is ledgered already, under another site or with another signature"

    # ------------------------------------------------------------ signed heads
    def sign_head(self, rnd: int, key: Ed25519PrivateKey) -> dict[str, Any]:
        """Sign the ledger's head now as round ``rnd``'s, with the server's key, and store it.

        What is signed: ``{"v": 1, "run_id", "round", "seq", "head"}`` (:func:`head_claim`),
        seq being the last row's (0 and the genesis hash for an empty ledger). One head per
        round: signing a round again returns the head already stored (a resumed server
        writing the line it was killed before), unchanged.
        """
        rnd = _round_number(rnd, "round")
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            stored = self.conn.execute("SELECT round, seq, head, signature FROM heads WHERE round = ?", (rnd,))
            r = stored.fetchone()
            if r is not None:
                return {"round": int(r[0]), "seq": int(r[1]), "head": r[2], "signature": r[3]}
            seq = int(self.conn.execute("SELECT COALESCE(MAX(seq), 0) FROM ledger").fetchone()[0])
            head = self.head()
            signature = sign(key, head_claim(self.run_id, rnd, seq, head))
            self.conn.execute("INSERT INTO heads VALUES (?, ?, ?, ?)", (rnd, seq, head, signature))
        return {"round": rnd, "seq": seq, "head": head, "signature": signature}

    def receipt(self, site_id: str, key: Ed25519PrivateKey) -> str:
        """The server's receipt for one site (:func:`common.deploy.receipts.make_receipt`): the
        latest signed head and every row of the site up to it; "" before any head is signed."""
        from common.deploy.receipts import make_receipt

        heads = self.heads()
        if not heads:
            return ""
        last = heads[-1]  # by round; a later round's head is never behind an earlier one's
        kept = self._receipts.get(site_id)
        if kept is not None and kept[0] == last["round"]:
            return kept[1]
        cols = ", ".join(f.name for f in fields(LedgerRow))
        cur = self.conn.execute(
            f"SELECT {cols} FROM ledger WHERE site_id = ? AND seq <= ? ORDER BY seq", (site_id, last["seq"])
        )
        rows = [receipt_row(_row(r)) for r in cur.fetchall()]
        chain = [(h["round"], h["seq"], h["head"]) for h in heads]
        text = make_receipt(key, self.run_id, site_id, last["round"], last["seq"], last["head"], rows, chain)
        self._receipts[site_id] = (last["round"], text)
        return text

    # ----------------------------------------------------------------- verify
    def verify(self, recompute: bool = True, expected_head: str | None = None) -> Verification:
        """Check the hash chain, that seq has no gaps, and (optionally) that every epsilon
        recomputes exactly. ``expected_head`` (e.g. the last head hash in metrics.jsonl)
        also catches rows cut from the end, which a chain alone cannot."""
        prev = genesis_hash(self.run_id)
        histories: dict[str, list[tuple[float, float, int]]] = {}
        totals: dict[str, float] = {}  # each site's running ε (a refusal row repeats it)
        rows = self.rows()
        position = {prev: 0}  # head hash -> rows up to it
        for expected_seq, row in enumerate(rows, start=1):
            if row.seq != expected_seq:
                return Verification(
                    False, len(rows), row.seq, f"seq {row.seq} follows {expected_seq - 1}: rows missing"
                )
            values = {k: getattr(row, k) for k in HASHED_FIELDS}
            if row.prev_hash != prev:
                return Verification(False, len(rows), row.seq, "prev_hash does not match the previous row")
            if row_digest(prev, values) != row.row_hash:
                return Verification(False, len(rows), row.seq, "row content does not match its hash")
            if row.neighbouring not in NEIGHBOURING:
                why = f"neighbouring = {row.neighbouring!r}, but the accountants compute ε for {NEIGHBOURING[0]}"
                return Verification(False, len(rows), row.seq, why)
            if row.rng not in RNG_KINDS:  # hashed like the rest, but a value no writer produces
                return Verification(False, len(rows), row.seq, f"rng {row.rng!r} is not one of {', '.join(RNG_KINDS)}")
            hist = histories.setdefault(row.site_id, [])
            running = totals.get(row.site_id, 0.0)
            totals[row.site_id] = row.eps_total
            if row.mechanism == REFUSAL:
                if row.steps != 0 or row.used:
                    return Verification(False, len(rows), row.seq, "a refusal row takes steps or is used")
            elif row.steps > 0:
                hist.append(row.accountant_input())
            if recompute:
                try:
                    checks = (
                        {"eps_round": 0.0, "eps_total": running}  # a refusal charges nothing
                        if row.mechanism == REFUSAL
                        else {
                            "eps_round": epsilon([row.accountant_input()], row.delta, row.accountant),
                            "eps_total": epsilon(hist, row.delta, row.accountant),
                        }
                    )
                except Exception as exc:  # forged inputs no accountant accepts: a failed row, not a crash
                    return Verification(
                        False, len(rows), row.seq, f"ε cannot be recomputed from this row's inputs ({exc})"
                    )
                for name, expected in checks.items():
                    got = getattr(row, name)
                    if not _same(got, expected):
                        return Verification(
                            False, len(rows), row.seq, f"{name} = {got!r} but {row.accountant} gives {expected!r}"
                        )
            prev = row.row_hash
            position[prev] = expected_seq
        if expected_head is not None and prev != expected_head:
            if expected_head not in position:
                return Verification(
                    False,
                    len(rows),
                    None,
                    "the head hash recorded in metrics.jsonl is not in the chain (rows cut or rewritten)",
                )
            return Verification(True, len(rows), unrecorded=len(rows) - position[expected_head])
        return Verification(True, len(rows))


def _durable(conn: sqlite3.Connection) -> None:
    """Crash safety of the writing connection: rollback journal, ``synchronous=FULL``.

    A round's rows are committed in one transaction (:meth:`Ledger.record_round`). With
    a rollback journal, SQLite first saves the pages it will change in
    ``ledger.sqlite-journal``, and the commit is the deletion of that journal; a
    process killed before it leaves a "hot" journal that the next connection to read
    the file rolls back, so the unfinished round vanishes whole and the chain stays
    valid. ``FULL`` fsyncs journal and database at each commit, so a recorded round
    also survives a power loss or OS crash, not only a killed process; one fsync per
    round costs nothing next to a round of training.

    Not WAL: a WAL database cannot be opened read-only by an auditor who may not
    write the run directory (SQLite must create ``-wal``/``-shm`` next to it), and
    even where it can, a read-only audit leaves those files behind. The one thing a
    rollback journal makes harder, reading a crashed writer's file read-only, is
    handled by :func:`_open_read_only`.
    """
    conn.execute("PRAGMA journal_mode=DELETE")
    conn.execute("PRAGMA synchronous=FULL")


# SQLite's side files: the rollback journal this ledger uses, and WAL's two, should a
# ledger ever have been opened in WAL mode by another tool.
SIDE_FILES = ("-journal", "-wal", "-shm")


def _private_files(path: Path) -> None:
    """The ledger file 0600 before SQLite opens it (SQLite would create it 0644 under the
    usual umask), and any side file already there too. SQLite creates a journal with the
    database file's mode, so the journals it makes later are 0600 as well."""
    create_private_file(path)
    for suffix in SIDE_FILES:
        side = path.with_name(path.name + suffix)
        if side.is_file() and not side.is_symlink():
            os.chmod(side, PRIVATE_FILE)


def _open_read_only(path: Path) -> sqlite3.Connection:
    """A read-only connection; for a ledger whose writer was killed mid-round, a
    read-only snapshot of its last committed state.

    A hot journal must be rolled back before the file can be read, which a read-only
    connection may not do (SQLITE_READONLY_ROLLBACK). Then the database and its journal
    are copied to a temporary folder, the copy is rolled back there and loaded into
    memory: the audited files are not touched, and the next writer rolls back the
    original the same way.
    """
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
        return conn
    except sqlite3.DatabaseError as exc:
        if getattr(exc, "sqlite_errorname", "") != "SQLITE_READONLY_ROLLBACK":
            return conn  # not a hot journal: the caller's checks report what is wrong
    conn.close()
    import shutil
    import tempfile

    journal = path.with_name(path.name + "-journal")
    snapshot = sqlite3.connect(":memory:")
    with tempfile.TemporaryDirectory(prefix="privfed-ledger-") as tmp:
        copy = Path(tmp) / path.name
        shutil.copyfile(path, copy)
        if journal.is_file():
            shutil.copyfile(journal, copy.with_name(journal.name))
        disk = sqlite3.connect(copy)
        try:
            disk.backup(snapshot)  # reading the copy rolls its journal back first
        finally:
            disk.close()
    snapshot.execute("PRAGMA query_only=ON")  # as read-only as the file connection
    return snapshot


def _claim_id(claim: str) -> str:
    return hashlib.sha256(claim.encode()).hexdigest()


def _claim_problem(claim: str) -> str:
    if len(claim) > MAX_CLAIM_BYTES:
        return f"its claim is longer than {MAX_CLAIM_BYTES} characters"
    try:
        obj = json.loads(claim)
    except ValueError:
        return "its claim is not JSON"
    if not isinstance(obj, dict):
        return "its claim is not a JSON object"
    return ""


def _round_number(rnd: object, what: str) -> int:
    if isinstance(rnd, bool) or not isinstance(rnd, int) or not 1 <= rnd <= MAX_ROUND:
        raise ValueError(f"{what} must be an integer in [1, {MAX_ROUND}]")
    return rnd


def _sort_round(r: object) -> int:
    """Sort key of a catch-up round that may be anything (it is checked after sorting)."""
    return r if isinstance(r, int) and not isinstance(r, bool) else 0


def _printable(text: object) -> str:
    """A site id for an error message: short and printable (it may be a hostile one)."""
    t = str(text)
    return t[:64] if t.isprintable() else "<unprintable>"


def _canonical(v: object) -> object:
    """-0.0 -> 0.0: SQLite stores REAL -0.0 as 0.0, which would change the hash on read-back."""
    return v + 0.0 if isinstance(v, float) else v


def _sql(v: object) -> object:
    return int(v) if isinstance(v, bool) else v


def _row(r: Sequence) -> LedgerRow:
    d = dict(zip([f.name for f in fields(LedgerRow)], r))
    d["used"] = bool(d["used"])
    return LedgerRow(**d)


def _same(a: float, b: float) -> bool:
    return a == b  # inf == inf, and -inf != inf
