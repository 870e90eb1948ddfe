"""``privfed site verify``: the site's own history and kept receipt against a ledger."""

from __future__ import annotations

import sqlite3

import pytest

import client.verify as verify
from client.app import receipt_path
from client.state import Lifetime, LifetimeEntry, SiteState, save_state, state_path
from common.deploy.receipts import make_receipt
from common.errors import PrivfedError
from server.ledger import SCHEMA
from simulations.cli import main
from tests.site_keys import SERVER_KEY

HISTORY = [(1, 1.1, 0.05, 20), (2, 1.1, 0.05, 20), (3, 1.2, 0.05, 21)]


def _state(tmp_path, history=HISTORY):
    sd = tmp_path / "state"
    save_state(state_path(sd, "run-1", "site-0"), SiteState(list(history), {}, []))
    return sd


def _ledger(tmp_path, rows, run_id="run-1"):
    """A ledger with the real schema, rows (round, site, sigma, q, steps[, mechanism])."""
    db = tmp_path / "run" / "ledger.sqlite"
    db.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(db)
    conn.executescript(SCHEMA)
    conn.execute("INSERT INTO meta VALUES ('run_id', ?)", (run_id,))
    for seq, (rnd, site, sigma, q, steps, *mech) in enumerate(rows, start=1):
        conn.execute(
            "INSERT INTO ledger VALUES (?,?,?,'example',600,?,?,1.0,?,1e-5,'rdp','add-remove',0.1,0.1,8.0,1,"
            "'trained','os','now',?,'','p',?)",
            (seq, rnd, site, q, sigma, steps, mech[0] if mech else "dp-sgd", f"h{seq}"),
        )
    conn.commit()
    conn.close()
    return db


def _rows(history=HISTORY, site="site-0"):
    return [(r, site, s, q, k) for r, s, q, k in history]


def test_a_ledger_that_holds_every_round_unchanged_passes(tmp_path):
    sd = _state(tmp_path)
    rows = _rows() + _rows(site="site-1") + [(2, "site-0", 3.0, 1.0, 1, "gaussian-metrics")]
    findings, summary = verify.verify_site(sd, _ledger(tmp_path, rows).parent)  # the run folder works too
    assert findings == [] and summary.startswith("ok:") and "3 trained round(s)" in summary


def test_a_missing_round_is_named(tmp_path):
    sd = _state(tmp_path)
    findings, summary = verify.verify_site(sd, _ledger(tmp_path, _rows()[:1] + _rows()[2:]))
    assert findings == ["round 2: trained by this site, missing from the ledger"]
    assert summary.startswith("FAILED")


def test_a_changed_sigma_is_named_without_values(tmp_path):
    sd = _state(tmp_path)
    rows = _rows()
    rows[2] = (3, "site-0", 1.2 * 1.6, 0.05, 21)
    findings, _ = verify.verify_site(sd, _ledger(tmp_path, rows))
    assert findings == ["round 3: the ledger's σ differ from the site's record"]
    assert not any(ch.isdigit() for ch in findings[0].replace("round 3", ""))


def test_a_round_charged_without_the_sites_record_and_lifetime_rounds(tmp_path):
    sd = _state(tmp_path, HISTORY[:2])
    # The lifetime file knows round 3 (written before the run state, e.g. a crash in between).
    Lifetime(sd, "data-a").record(LifetimeEntry("run-1", 3, 1.2, 0.05, 21, 1e-5, "rdp"))
    Lifetime(sd, "data-a").record(LifetimeEntry("run-0", 9, 1.2, 0.05, 21, 1e-5, "rdp"))  # another run
    rows = _rows() + [(4, "site-0", 1.0, 0.05, 20)]
    findings, _ = verify.verify_site(sd, _ledger(tmp_path, rows))
    assert findings == ["round 4: the ledger charges this site for training it has no record of"]
    findings, _ = verify.verify_site(sd, _ledger(tmp_path / "x", _rows()[:2]))
    assert findings == ["round 3: trained by this site, missing from the ledger"]


def test_the_kept_receipt_is_checked_against_the_ledger(tmp_path, monkeypatch):
    sd = _state(tmp_path)
    db = _ledger(tmp_path, _rows())
    kept = receipt_path(sd, "run-1", "site-0")
    kept.parent.mkdir(parents=True)
    kept.write_text(make_receipt(SERVER_KEY, "run-1", "site-0", 3, 3, "h3", [{"site_id": "site-0", "row_hash": "h1"}]))
    seen = []

    def compare(rows, heads, receipt):
        seen.append((len(rows), heads, receipt.seq))
        return "" if receipt.head == rows[-1]["row_hash"] else "the signed head is not in the ledger"

    monkeypatch.setattr(verify, "_receipt_checker", lambda: compare)
    findings, summary = verify.verify_site(sd, db)
    assert findings == [] and "receipt up to round 3 holds" in summary and seen == [(3, [], 3)]
    kept.write_text(make_receipt(SERVER_KEY, "run-1", "site-0", 3, 3, "other", []))
    findings, _ = verify.verify_site(sd, db)
    assert findings == ["receipt: the signed head is not in the ledger"]
    # Without the receipt checker the receipt is not silently passed.
    monkeypatch.setattr(verify, "_receipt_checker", lambda: None)
    findings, _ = verify.verify_site(sd, db)
    assert findings and findings[0].startswith("receipt: not checked")


def test_the_cli_exits_non_zero_on_a_finding(tmp_path, capsys):
    sd = _state(tmp_path)
    good = _ledger(tmp_path / "good", _rows())
    assert main(["site", "verify", "--state-dir", str(sd), "--ledger", str(good)]) == 0
    assert "ok:" in capsys.readouterr().out
    bad = _ledger(tmp_path / "bad", _rows()[1:])
    assert main(["site", "verify", "--state-dir", str(sd), "--ledger", str(bad), "--site-id", "site-0"]) == 1
    out = capsys.readouterr()
    assert "round 1: trained by this site, missing from the ledger" in out.err and "FAILED" in out.out
    other = _ledger(tmp_path / "other", _rows(), run_id="run-2")
    assert main(["site", "verify", "--state-dir", str(sd), "--ledger", str(other)]) == 2  # no record of run-2
    assert main(["site", "verify", "--state-dir", str(sd), "--ledger", str(other), "--run-id", "run-1"]) == 1


def test_not_a_ledger_is_one_line(tmp_path):
    p = tmp_path / "x.sqlite"
    sqlite3.connect(p).close()
    with pytest.raises(PrivfedError, match="not a privfed ledger"):
        verify.verify_site(_state(tmp_path), p)
