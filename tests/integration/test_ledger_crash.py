"""Crash safety of the ledger: a round is written whole or not at all, whatever kills the writer.

The kill tests use a real writer process: ``sys.executable -c WRITER`` imports the ledger
once, then forks one writer per command on its stdin; the test SIGKILLs that writer at
a random-ish moment, inspects the file, and starts the next writer, which reopens the
ledger and continues from its last committed round (forking keeps the slow torch/opacus
import to one per test module).
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest

from common.privacy.accounting import RoundPlan
from server import ledger as ledger_mod
from server.ledger import Ledger, SiteSpend

ROOT = Path(__file__).resolve().parents[2]
SITES = 12
RUN_ID = "crash"

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the writer process forks")

# Commands, one JSON line each on stdin: {"run": PATH, "sites": N} starts a writer that
# appends rounds of N rows until it is killed; {"spill": PATH, "sites": N} starts one that
# writes a single round of N rows with a one-page cache (so pages reach the database file
# before the commit, leaving a hot journal) and SIGKILLs itself halfway through it. The
# parent reports each writer's pid and, once the writer is dead, how it died.
WRITER = r"""
import json, os, signal, sys
import server.ledger as L
from common.privacy.accounting import RoundPlan

plan = RoundPlan(400, 0.05, 20, 1.1, 1.0, 1e-5, "rdp")
# The accountant (Opacus, torch) loads on the first epsilon(): load it here, once, before the
# forks, or each writer spends its first seconds importing and the kills land before any commit.
L.epsilon([(1.1, 0.05, 20)], 1e-5, "rdp")

def spends(n):
    return [L.SiteSpend(f"site-{i:03d}", "image", plan, 20, 10.0, True, "trained", "os") for i in range(n)]

def writer(command):
    n = command["sites"]
    led = L.Ledger(command.get("run") or command["spill"], run_id="crash")
    rnd = max((r.round for r in led.rows()), default=0)
    if "spill" in command:
        led.conn.execute("PRAGMA cache_size=1")
        calls, real = [0], L.epsilon
        def dying_epsilon(*args):
            calls[0] += 1
            if calls[0] > n:  # two calls per row: about half the round's rows are inserted
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args)
        L.epsilon = dying_epsilon
        led.record_round(rnd + 1, spends(n))
        raise SystemExit("not killed")
    while True:
        rnd += 1
        led.record_round(rnd, spends(n))

for line in sys.stdin:
    pid = os.fork()
    if pid == 0:
        try:
            writer(json.loads(line))
        finally:
            os._exit(1)
    print(json.dumps({"pid": pid}), flush=True)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"reaped": pid, "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None}), flush=True)
"""


class WriterProcess:
    """The process that forks the writers (one per module: it imports torch/opacus once)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WRITER],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"writer process ended unexpectedly (rc={self.proc.wait()})")
        return json.loads(line)

    def start(self, path: Path, sites: int = SITES, mode: str = "run") -> int:
        """Fork a writer on ``path``; returns its pid."""
        self.proc.stdin.write(json.dumps({mode: str(path), "sites": sites}) + "\n")
        self.proc.stdin.flush()
        return self._read()["pid"]

    def reaped(self) -> dict:
        return self._read()

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def writers():
    proc = WriterProcess()
    yield proc
    proc.close()


def rounds_by_site(path: Path) -> dict[int, set[str]]:
    led = Ledger(path)
    try:
        out: dict[int, set[str]] = defaultdict(set)
        for row in led.rows():
            out[row.round].add(row.site_id)
        return dict(out)
    finally:
        led.close()


def assert_whole_rounds(path: Path, sites: int = SITES) -> int:
    """verify() passes on a read-only open, and every round holds all its sites' rows."""
    led = Ledger(path)
    try:
        result = led.verify()
    finally:
        led.close()
    assert result.ok, result
    rounds = rounds_by_site(path)
    assert sorted(rounds) == list(range(1, len(rounds) + 1))
    expected = {f"site-{i:03d}" for i in range(sites)}
    partial = {r: len(s) for r, s in rounds.items() if s != expected}
    assert not partial, f"partly written rounds (round: rows): {partial}"
    assert result.rows == len(rounds) * sites
    return len(rounds)


def _is_ledger(path: Path) -> bool:
    """The file exists and its creation committed (schema and run id): a writer killed between
    creating the file and that first commit leaves a file that is not a ledger yet."""
    try:
        Ledger(path).close()
    except (FileNotFoundError, ValueError, sqlite3.Error):
        return False
    return True


def _committed_rounds(path: Path) -> int:
    """Rounds committed so far (0 before the ledger exists), read while a writer may run."""
    if not _is_ledger(path):
        return 0
    try:
        return len(rounds_by_site(path))
    except sqlite3.Error:  # busy: the writer holds the lock this instant
        return 0


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.parent.glob(path.name + "*"))}


def test_sigkilled_writer_leaves_whole_rounds_and_a_valid_chain(tmp_path, writers):
    path = tmp_path / "ledger.sqlite"
    proc = writers
    rng = random.Random(20240607)
    committed = [0]
    for _ in range(8):
        pid = proc.start(path)
        time.sleep(rng.uniform(0.05, 0.4))  # the writer spends nearly all its time inside record_round
        os.kill(pid, signal.SIGKILL)
        assert proc.reaped() == {"reaped": pid, "signal": signal.SIGKILL}
        if not _is_ledger(path):  # killed before its creation committed
            assert committed[-1] == 0, "a ledger with committed rounds stopped being one"
            continue
        rounds = assert_whole_rounds(path)
        assert rounds >= committed[-1], "a committed round was lost"
        committed.append(rounds)
    assert committed[-1] > 0, "no writer got to commit a round: the kills came too early to test anything"
    # A writer that reopens the ledger continues the chain where it stands.
    led = Ledger(path, run_id=RUN_ID)
    plan = RoundPlan(400, 0.05, 20, 1.1, 1.0, 1e-5, "rdp")
    last = led.record_round(
        committed[-1] + 1,
        [SiteSpend(f"site-{i:03d}", "image", plan, 20, 10.0, True, "trained", "os") for i in range(SITES)],
    )
    assert last[0].seq == committed[-1] * SITES + 1
    led.close()
    assert assert_whole_rounds(path) == committed[-1] + 1


def test_kill_after_pages_reached_the_database_file(tmp_path, writers):
    """The hard case: killed mid-round after uncommitted pages were written to the database
    file. The hot journal undoes them; a read-only audit reads the last committed state
    without touching the files, and the next writer rolls the journal back."""
    path = tmp_path / "ledger.sqlite"
    proc = writers
    pid = proc.start(path, sites=3)
    # Killed once a round is committed (a fixed sleep raced a slow disk's fsyncs), then a
    # little later, in whatever the writer is doing next.
    deadline = time.monotonic() + 30
    while _committed_rounds(path) < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    proc.reaped()
    before = assert_whole_rounds(path, sites=3)
    assert before > 0
    pid = proc.start(path, sites=300, mode="spill")
    assert proc.reaped() == {"reaped": pid, "signal": signal.SIGKILL}
    journal = path.with_name(path.name + "-journal")
    assert journal.is_file() and journal.stat().st_size > 0, "expected a hot journal"
    files = _files(path)
    assert assert_whole_rounds(path, sites=3) == before  # read-only, with the hot journal in place
    assert _files(path) == files, "a read-only audit changed the ledger's files"
    led = Ledger(path, run_id=RUN_ID)  # a writer rolls the unfinished round back
    assert led.count() == before * 3 and led.verify().ok
    led.close()
    assert not journal.exists()
    assert assert_whole_rounds(path, sites=3) == before


def _spend(site: str, status: object = "trained") -> SiteSpend:
    plan = RoundPlan(400, 0.05, 20, 1.1, 1.0, 1e-5, "rdp")
    return SiteSpend(site, "image", plan, 20, 10.0, True, status, "os")  # type: ignore[arg-type]


def _fail_on_third_row(monkeypatch, exc: BaseException) -> None:
    real, calls = ledger_mod.row_digest, [0]

    def digest(prev, values):
        calls[0] += 1
        if calls[0] == 3:
            raise exc
        return real(prev, values)

    monkeypatch.setattr(ledger_mod, "row_digest", digest)


@pytest.mark.parametrize(
    "case",
    ["unserialisable status", "hash raises", "interrupted", "duplicate site", "unbindable value"],
)
def test_exception_mid_round_leaves_no_partial_round(tmp_path, monkeypatch, case):
    path = tmp_path / "ledger.sqlite"
    led = Ledger(path, run_id=RUN_ID)
    led.record_round(1, [_spend(s) for s in "abcd"])
    head = led.head()
    spends = [_spend(s) for s in "abcd"]  # rows are written in site order: a, b, then c fails
    expected: type[BaseException] = Exception
    if case == "unserialisable status":
        spends[2] = _spend("c", status=object())  # refused before the transaction, naming the site
        expected = ValueError
    elif case == "hash raises":
        _fail_on_third_row(monkeypatch, OSError("disk on fire"))
        expected = OSError
    elif case == "interrupted":
        _fail_on_third_row(monkeypatch, KeyboardInterrupt())
        expected = KeyboardInterrupt
    elif case == "duplicate site":
        spends[3] = _spend("c")  # one row per (round, site, mechanism): the second "c" is refused
        expected = ValueError
    elif case == "unbindable value":
        real_sql, calls = ledger_mod._sql, [0]

        def sql(v):
            calls[0] += 1
            return object() if calls[0] == 2 * 19 + 5 else real_sql(v)  # a field of the third row

        monkeypatch.setattr(ledger_mod, "_sql", sql)
        expected = ledger_mod.sqlite3.Error
    with pytest.raises(expected):
        led.record_round(2, spends)
    monkeypatch.undo()
    assert not led.conn.in_transaction
    assert [r.round for r in led.rows()] == [1] * 4 and led.head() == head
    other = Ledger(path)  # what any other reader of the file sees
    assert other.count() == 4 and other.verify().ok
    other.close()
    # The ledger is still usable: the next round follows the last committed one.
    rows = led.record_round(2, [_spend(s) for s in "abcd"])
    assert [r.seq for r in rows] == [5, 6, 7, 8] and rows[0].prev_hash == head
    assert led.verify().ok
    led.close()


def test_writer_uses_a_durable_rollback_journal(tmp_path):
    led = Ledger(tmp_path / "ledger.sqlite", run_id=RUN_ID)
    assert led.conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    assert led.conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    led.close()
