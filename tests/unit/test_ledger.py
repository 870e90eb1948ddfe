"""The ledger: exact epsilons, a hash chain that detects edits, atomic appends."""

from __future__ import annotations

import dataclasses
import math
import sqlite3

import numpy as np
import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from common.privacy.accounting import RoundPlan, epsilon
from server.ledger import Ledger, SiteSpend
from tests.conftest import tamper


def _spend(site, sigma=1.1, q=0.05, steps=20, n=400, used=True, status="trained", accountant="rdp"):
    plan = RoundPlan(n, q, steps, sigma, 1.0, 1e-5, accountant)
    return SiteSpend(site, "image", plan, steps if status == "trained" else 0, 10.0, used, status, "os")


def _written(path, rounds, sites=("a",)):
    """A ledger file with ``rounds`` rounds for ``sites``, closed, and its rows."""
    led = Ledger(path, run_id="r")
    for r in range(1, rounds + 1):
        led.record_round(r, [_spend(s) for s in sites])
    rows = led.rows()
    led.close()
    return rows


def test_epsilon_matches_an_opacus_accountant_stepped_by_hand(tmp_path):
    """Known inputs: 3 rounds x 20 steps at (sigma=1.1, q=0.05), delta=1e-5."""
    led = Ledger(tmp_path / "l.sqlite", run_id="r")
    rows = [led.record_round(r, [_spend("a")])[0] for r in (1, 2, 3)]
    acc = RDPAccountant()
    for _rnd, row in enumerate(rows, start=1):
        for _ in range(20):
            acc.step(noise_multiplier=1.1, sample_rate=0.05)
        assert row.eps_total == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-12)
        single = RDPAccountant()
        single.history = [(1.1, 0.05, 20)]
        assert row.eps_round == single.get_epsilon(delta=1e-5)
    assert rows[0].eps_total == rows[0].eps_round
    assert rows[0].eps_total < rows[1].eps_total < rows[2].eps_total
    # Regression anchor (Opacus 1.6 RDP): 60 steps at sigma 1.1, q 0.05, delta 1e-5.
    assert rows[2].eps_total == pytest.approx(2.7425, abs=1e-3)


def test_prv_accountant_is_recorded_and_recomputed(tmp_path):
    led = Ledger(tmp_path / "l.sqlite", run_id="r")
    row = led.record_round(1, [_spend("a", accountant="prv")])[0]
    acc = PRVAccountant()
    acc.history = [(1.1, 0.05, 20)]
    assert row.accountant == "prv"
    assert row.eps_total == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-9)
    assert led.verify().ok


def test_rows_hold_every_accountant_input(tmp_path):
    led = Ledger(tmp_path / "l.sqlite", run_id="r")
    row = led.record_round(1, [_spend("a", sigma=0.9, q=0.1, steps=7, n=70)])[0]
    assert (row.noise_multiplier, row.sample_rate, row.steps, row.delta, row.accountant) == (0.9, 0.1, 7, 1e-5, "rdp")
    assert (row.site_id, row.round, row.unit, row.dataset_size, row.used) == ("a", 1, "image", 70, True)
    assert row.eps_total == epsilon([(0.9, 0.1, 7)], 1e-5, "rdp")


def test_skipped_round_spends_nothing(tmp_path):
    led = Ledger(tmp_path / "l.sqlite", run_id="r")
    first = led.record_round(1, [_spend("a")])[0]
    skipped = led.record_round(2, [_spend("a", used=False, status="budget_exhausted")])[0]
    assert skipped.steps == 0 and skipped.eps_round == 0.0
    assert skipped.eps_total == first.eps_total and not skipped.used


def test_chain_verifies_and_detects_an_edit(tmp_path):
    path = tmp_path / "l.sqlite"
    led = Ledger(path, run_id="r")
    for r in (1, 2, 3):
        led.record_round(r, [_spend("a"), _spend("b", sigma=2.0)])
    assert led.verify().ok and led.verify().rows == 6
    led.close()

    conn = sqlite3.connect(path)
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("UPDATE ledger SET eps_total = 0.1 WHERE seq = 3")
    conn.close()
    # A determined editor drops the guard; the chain still catches the change.
    tamper(path, "UPDATE ledger SET eps_total = 0.1 WHERE seq = 3")
    result = Ledger(path).verify()
    assert not result.ok and result.first_bad_seq == 3 and "hash" in result.reason


def test_recomputation_catches_a_consistent_forgery(tmp_path):
    """Rewrite a row *and* its hash (and all later hashes): the epsilon check still fails."""
    from server.ledger import HASHED_FIELDS, row_digest

    path = tmp_path / "l.sqlite"
    rows = _written(path, 2)
    conn = sqlite3.connect(path)
    conn.execute("DROP TRIGGER ledger_no_update")
    prev = rows[0].prev_hash
    for row in rows:
        values = {k: getattr(row, k) for k in HASHED_FIELDS}
        if row.seq == 1:
            values["eps_total"] = values["eps_round"] = 0.01
        new_hash = row_digest(prev, values)
        conn.execute(
            "UPDATE ledger SET eps_total=?, eps_round=?, prev_hash=?, row_hash=? WHERE seq=?",
            (values["eps_total"], values["eps_round"], prev, new_hash, row.seq),
        )
        prev = new_hash
    conn.commit()
    conn.close()
    result = Ledger(path).verify()
    assert not result.ok and result.first_bad_seq == 1 and "eps_round" in result.reason


def test_deleted_row_breaks_the_chain(tmp_path):
    path = tmp_path / "l.sqlite"
    _written(path, 3)
    tamper(path, "DELETE FROM ledger WHERE seq = 2")
    result = Ledger(path).verify()
    assert not result.ok and result.first_bad_seq == 3


def test_round_is_written_atomically(tmp_path):
    led = Ledger(tmp_path / "l.sqlite", run_id="r")
    led.record_round(1, [_spend("a")])
    bad = SiteSpend(
        "b", "image", RoundPlan(400, 0.05, 20, 1.1, 1.0, 1e-5, "no-such-accountant"), 20, 10.0, True, "trained", "os"
    )
    with pytest.raises(ValueError):
        led.record_round(2, [_spend("a"), bad])  # site "a" sorts first and is written, then "b" fails
    assert [r.round for r in led.rows()] == [1]
    assert led.verify().ok


def test_non_private_rows_record_infinite_epsilon(tmp_path):
    led = Ledger(tmp_path / "l.sqlite", run_id="r")
    plan = RoundPlan(100, 0.32, 4, 0.0, 0.0, 0.0, "none")
    row = led.record_round(1, [SiteSpend("a", "image", plan, 4, math.inf, True, "trained", "os")])[0]
    assert math.isinf(row.eps_total) and led.verify().ok


def test_ledger_refuses_another_runs_file(tmp_path):
    Ledger(tmp_path / "l.sqlite", run_id="one").close()
    with pytest.raises(ValueError, match="belongs to run 'one'"):
        Ledger(tmp_path / "l.sqlite", run_id="two")


@pytest.mark.parametrize(
    "history",
    [
        [(1.1, 0.05, 20)],
        [(1.1, 0.05, 20), (1.1, 0.05, 20), (1.1, 0.05, 7)],
        [(0.8, 0.3, 3), (2.5, 0.01, 400), (0.8, 0.3, 5)],
        [(3.05, 0.5926, 2)] * 30,
    ],
)
def test_cached_rdp_is_bit_identical_to_opacus(history):
    from common.privacy.accounting import _merge

    acc = RDPAccountant()
    acc.history = _merge(history)
    for delta in (1e-5, 1e-3):
        assert epsilon(history, delta, "rdp") == acc.get_epsilon(delta=delta)


def test_negative_zero_does_not_break_the_chain(tmp_path):
    """SQLite reads REAL -0.0 back as 0.0; hashing must not depend on the sign of zero."""
    led = Ledger(tmp_path / "l.sqlite", run_id="r")
    plan = RoundPlan(100, 0.32, 4, -0.0, -0.0, -0.0, "none")
    led.record_round(1, [SiteSpend("a", "image", plan, 4, math.inf, True, "trained", "os")])
    led.close()
    assert Ledger(tmp_path / "l.sqlite").verify().ok


def test_cutting_the_tail_is_caught_against_the_recorded_head(tmp_path):
    path = tmp_path / "l.sqlite"
    led = Ledger(path, run_id="r")
    for r in (1, 2, 3):
        led.record_round(r, [_spend("a")])
    head = led.head()
    led.close()
    tamper(path, "DELETE FROM ledger WHERE seq = 3")
    assert Ledger(path).verify().ok  # the chain alone cannot see a cut tail
    result = Ledger(path).verify(expected_head=head)
    assert not result.ok and "head" in result.reason


def test_opening_for_audit_is_read_only(tmp_path):
    with pytest.raises(FileNotFoundError):
        Ledger(tmp_path / "missing.sqlite")
    assert not (tmp_path / "missing.sqlite").exists()
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not a database" * 100)
    with pytest.raises(ValueError, match="not a privfed ledger"):
        Ledger(junk)
    _written(tmp_path / "l.sqlite", 1)
    led = Ledger(tmp_path / "l.sqlite")
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        led.record_round(2, [_spend("a")])


def test_every_row_names_the_neighbouring_relation_of_its_plan(tmp_path):
    led = Ledger(tmp_path / "l.sqlite", run_id="r")
    led.record_round(1, [_spend("a"), _spend("b", status="budget_exhausted", used=False)])
    assert [r.neighbouring for r in led.rows()] == ["add-remove", "add-remove"]
    assert led.verify().ok
    # A plan claiming a relation the accountants do not compute is refused before anything is written ...
    odd = dataclasses.replace(_spend("c"), plan=dataclasses.replace(_spend("c").plan, neighbouring="replace-one"))
    with pytest.raises(ValueError, match="site 'c'.*neighbouring"):
        led.record_round(2, [odd])
    assert led.count() == 2
    # ... and a row rewritten to claim one (its hash recomputed) fails verification.
    from server.ledger import HASHED_FIELDS, row_digest

    row = led.rows()[1]
    values = {k: getattr(row, k) for k in HASHED_FIELDS} | {"neighbouring": "replace-one"}
    digest = row_digest(row.prev_hash, values)
    led.close()
    tamper(
        tmp_path / "l.sqlite", f"UPDATE ledger SET neighbouring = 'replace-one', row_hash = '{digest}' WHERE seq = 2"
    )
    result = Ledger(tmp_path / "l.sqlite").verify()
    assert not result.ok and result.first_bad_seq == 2 and "neighbouring" in result.reason


def test_a_ledger_from_before_the_neighbouring_column_is_refused_in_one_line(tmp_path):
    from server.ledger import SCHEMA

    path = tmp_path / "old.sqlite"
    conn = sqlite3.connect(path)
    conn.executescript(SCHEMA.replace("    neighbouring     TEXT    NOT NULL,\n", ""))
    conn.execute("INSERT INTO meta VALUES ('run_id', 'r')")
    conn.commit()
    conn.close()
    for run_id in ("r", None):  # resuming it, and auditing it
        with pytest.raises(ValueError, match="older privfed.*'neighbouring'"):
            Ledger(path, run_id=run_id)


def test_the_rng_column_records_what_each_site_used(tmp_path):
    """Issue 18, finding 5: the ledger says which kind of randomness each row's noise came from."""
    from common.protocol import MalformedReport, parse_fit_metrics
    from tests.unit.test_server_client import _reply, _round, _strategy

    s = _strategy(tmp_path, [np.zeros(3, np.float32)], accountant="rdp")
    update = [np.full(3, 0.1, np.float32)]
    _round(s, 1, [_reply("a", update, rng="os"), _reply("b", update, node=2, rng="seeded")], [])
    assert {r.site_id: r.rng for r in s.ledger.rows()} == {"a": "os", "b": "seeded"}
    assert s.ledger.verify().ok
    for bad in ("urandom", 1):  # a value that is not a fact about the noise is not accepted
        with pytest.raises(MalformedReport, match="rng"):
            parse_fit_metrics(_reply("a", update, rng=bad)[1].metrics)
    with pytest.raises(MalformedReport, match="missing metric 'rng'"):
        parse_fit_metrics(_reply("a", update, drop="rng")[1].metrics)
    with pytest.raises(ValueError, match="rng"):
        s.ledger.record_round(
            2, [SiteSpend("c", "image", RoundPlan(400, 0.05, 4, 1.1, 1.0, 1e-5, "rdp"), 4, 10.0, True, "trained", "")]
        )


def test_verify_fails_on_an_rng_no_writer_produces(tmp_path):
    led = Ledger(tmp_path / "l.sqlite", run_id="r")
    led.record_round(1, [_spend("a")])
    led.close()
    # A determined editor rewrites the value and re-hashes the chain: ε still recomputes, but
    # the rng column must hold a fact.
    from server.ledger import row_digest

    conn = sqlite3.connect(tmp_path / "l.sqlite")
    conn.execute("DROP TRIGGER ledger_no_update")
    led = Ledger(tmp_path / "l.sqlite")
    row = led.rows()[0]
    led.close()
    values = {**row.__dict__, "rng": "maybe"}
    conn.execute("UPDATE ledger SET rng = 'maybe', row_hash = ? WHERE seq = 1", (row_digest(row.prev_hash, values),))
    conn.commit()
    conn.close()
    result = Ledger(tmp_path / "l.sqlite").verify()
    assert not result.ok and "rng" in result.reason
