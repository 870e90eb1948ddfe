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
by the chain alone; each round's head hash is therefore also written to
``metrics.jsonl``, a second place to compare against.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path

from common.privacy.accounting import NEIGHBOURING, RoundPlan, epsilon
from common.privacy.metrics_dp import DP_SGD
from common.seeds import RNG_KINDS

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
    prev_hash        TEXT    NOT NULL,
    row_hash         TEXT    NOT NULL,
    UNIQUE (round, site_id, mechanism)
);
CREATE TRIGGER IF NOT EXISTS ledger_no_update BEFORE UPDATE ON ledger
    BEGIN SELECT RAISE(ABORT, 'privacy ledger is append-only'); END;
CREATE TRIGGER IF NOT EXISTS ledger_no_delete BEFORE DELETE ON ledger
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
            self.conn = sqlite3.connect(self.path)
            _durable(self.conn)
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
        self._check_columns()

    def _check_columns(self) -> None:
        """Refuse a ledger from before a column was added (the one migration path): its rows
        cannot say what they now must (e.g. their neighbouring relation)."""
        have = {r[1] for r in self.conn.execute("PRAGMA table_info(ledger)")}
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
        them) go first, each under its own round number.
        """
        entries = sorted(catch_up, key=lambda e: (e[0], e[1].site_id)) + [
            (rnd, s) for s in sorted(spends, key=lambda s: s.site_id)
        ]
        written: list[LedgerRow] = []
        now = datetime.now(UTC).isoformat(timespec="seconds")
        with self.conn:  # COMMIT, or ROLLBACK on any exception
            # Take the write lock before reading the head, so the head, the next seq and
            # every row of the round belong to one transaction (another writer waits).
            self.conn.execute("BEGIN IMMEDIATE")
            prev = self.head()
            seq = (self.conn.execute("SELECT COALESCE(MAX(seq), 0) FROM ledger").fetchone()[0]) + 1
            for entry_round, s in entries:
                if s.rng not in RNG_KINDS:  # the column states a fact; no other value is one
                    raise ValueError(f"rng must be one of {', '.join(RNG_KINDS)}, got {s.rng!r}")
                p = s.plan
                mech = (p.noise_multiplier, p.sample_rate, s.steps_taken)
                history = self.history(s.site_id) + [mech]
                values = dict(
                    seq=seq,
                    round=entry_round,
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
                    eps_round=epsilon([mech], p.delta, p.accountant),
                    eps_total=epsilon(history, p.delta, p.accountant),
                    eps_budget=s.eps_budget,
                    used=bool(s.used),
                    status=s.status,
                    rng=s.rng,
                    recorded_at=now,
                    mechanism=s.mechanism,
                )
                values = {k: _canonical(v) for k, v in values.items()}
                row = LedgerRow(**values, prev_hash=prev, row_hash=row_digest(prev, values))
                self.conn.execute(
                    f"INSERT INTO ledger VALUES ({', '.join('?' * len(fields(LedgerRow)))})",
                    [_sql(v) for v in asdict(row).values()],
                )
                written.append(row)
                prev, seq = row.row_hash, seq + 1
        return written

    # ----------------------------------------------------------------- verify
    def verify(self, recompute: bool = True, expected_head: str | None = None) -> Verification:
        """Check the hash chain, that seq has no gaps, and (optionally) that every epsilon
        recomputes exactly. ``expected_head`` (e.g. the last head hash in metrics.jsonl)
        also catches rows cut from the end, which a chain alone cannot."""
        prev = genesis_hash(self.run_id)
        histories: dict[str, list[tuple[float, float, int]]] = {}
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
            if row.steps > 0:
                hist.append(row.accountant_input())
            if recompute:
                try:
                    checks = {
                        "eps_round": epsilon([row.accountant_input()], row.delta, row.accountant),
                        "eps_total": epsilon(hist, row.delta, row.accountant),
                    }
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
