"""The ledger against keys (issue 19, finding 1): signed claims, signed heads, receipts.

The attack of finding 1 rewrites site-3's σ ×1.6 in every row, recomputes ε and the whole
chain and re-signs every head with the server's key (the coordinator holds it). The
ledger then agrees with itself, but no longer with the site's signed claims; rows the
coordinator drops are caught by the receipts the sites kept.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3

import numpy as np
import pytest

from common.deploy.receipt_check import compare
from common.deploy.receipts import check_receipt, extends
from common.deploy.registry import RegisteredSite, Registry
from common.deploy.signing import (
    canonical,
    new_signing_key,
    public_hex,
    refusal_claim,
    reply_claim,
    sign,
    update_digest,
)
from common.errors import PrivfedError
from common.identifiers import CENTRAL_SITE_ID
from common.privacy.accounting import RoundPlan, epsilon
from common.protocol import Status, fit_metrics
from server.ledger import (
    HASHED_FIELDS,
    REFUSAL,
    Ledger,
    SiteSpend,
    genesis_hash,
    head_claim,
    receipt_row,
    row_digest,
)
from server.ledger_audit import check_receipts_against_ledger, verify_against_keys
from server.resume import check_ledger
from simulations.cli import main as cli

RUN = "run-keys"
SITES = ("site-1", "site-2", "site-3", "site-4")
SIGMA = {"site-1": 1.1, "site-2": 1.2, "site-3": 1.0, "site-4": 1.3}
ROUNDS = 4


@dataclasses.dataclass
class Federation:
    server: object
    sites: dict
    registry: Registry


@pytest.fixture(scope="module")
def fed() -> Federation:
    server = new_signing_key()
    sites = {s: new_signing_key() for s in SITES}
    registry = Registry.build(public_hex(server), [RegisteredSite(s, public_hex(k), 400) for s, k in sites.items()])
    return Federation(server, sites, registry)


def _plan(sigma: float) -> RoundPlan:
    return RoundPlan(400, 0.05, 20, sigma, 1.0, 1e-5, "rdp")


def _claimed(key, site: str, rnd: int, metrics: dict, kind: str = "fit") -> tuple[str, str]:
    update = update_digest([np.full(3, rnd, dtype=np.float32)]) if kind == "fit" else ""
    claim = reply_claim(RUN, rnd, kind, update, metrics)
    return canonical(claim).decode(), sign(key, claim)


def _fit(fed: Federation, site: str, rnd: int, history: list | None = None, release: bool = False) -> list[SiteSpend]:
    """The spends the server ledgers from one signed fit reply (its dp-sgd row, maybe a metrics row)."""
    plan = _plan(SIGMA[site])
    m = fit_metrics(
        site,
        "image",
        plan,
        20,
        10.0,
        Status.TRAINED,
        eps_spent=1.0,
        rng="os",
        history=json.dumps(history or []),
    )
    if release:
        m |= {
            "metrics_noise_multiplier": 2.0,
            "metrics_l2_sensitivity": 1.5,
            "metrics_delta": 1e-6,
            "metrics_rng": "os",
        }
    claim, signature = _claimed(fed.sites[site], site, rnd, m)
    out = [SiteSpend(site, "image", plan, 20, 10.0, True, "trained", "os", claim=claim, signature=signature)]
    if release:
        mplan = RoundPlan(0, 1.0, 1, 2.0, 1.5, 1e-6, "rdp")
        spend = SiteSpend(site, "metric", mplan, 1, 10.0, True, "released", "os", "gaussian-metrics", claim, signature)
        out.append(spend)
    return out


def _central() -> SiteSpend:
    """The server's own client-level DP row (no site claim: its signed heads cover it)."""
    return SiteSpend(
        CENTRAL_SITE_ID,
        "site",
        RoundPlan(4, 1.0, 1, 5.0, 1.0, 1e-5, "rdp"),
        1,
        50.0,
        True,
        "released",
        "os",
        "dp-fedavg",
    )


def _build(path, fed: Federation, receipts: dict | None = None) -> None:
    """Four rounds, four signed sites, a client-level row per round, a head signed per round;
    each site keeps the newest receipt it was sent (checked, and extending the one before)."""
    led = Ledger(path, run_id=RUN)
    central = _central()
    for rnd in range(1, ROUNDS + 1):
        if receipts is not None:  # the instruction of this round carries the receipt of the last
            for site in SITES:
                text = led.receipt(site, fed.server)
                if not text:
                    continue
                new = check_receipt(text, fed.registry.server_key, site, RUN)
                if site in receipts:
                    assert extends(receipts[site], new) == ""
                receipts[site] = new
        for site in SITES:
            if site == "site-4" and rnd == 3:
                continue  # its reply was lost: it reports the round in round 4's history
            if site == "site-4" and rnd == 4:
                (s,) = _fit(fed, site, rnd, history=[[1, 1.3, 0.05, 20], [2, 1.3, 0.05, 20], [3, 1.3, 0.05, 20]])
                lost = dataclasses.replace(s, used=False, status="lost")
                led.record_round(rnd, [s], catch_up=[(3, lost)])
                continue
            led.record_round(rnd, _fit(fed, site, rnd, release=(site == "site-2" and rnd == 2)))
        led.record_round(rnd, [central])
        led.sign_head(rnd, fed.server)
    led.close()


@pytest.fixture
def ledger_path(tmp_path, fed):
    path = tmp_path / "ledger.sqlite"
    _build(path, fed)
    return path


def _rewrite(path, fed: Federation, edit=lambda v: v, keep=lambda v: True, resign=True) -> None:
    """What a coordinator with write access and its own key can do: drop the guards, edit or
    drop rows, recompute every ε and the whole chain, and re-sign every head."""
    conn = sqlite3.connect(path)
    for table in ("ledger", "heads", "claims"):
        conn.execute(f"DROP TRIGGER IF EXISTS {table}_no_update")
        conn.execute(f"DROP TRIGGER IF EXISTS {table}_no_delete")
    cols = [r[1] for r in conn.execute("PRAGMA table_info(ledger)")]
    rows = [dict(zip(cols, r)) for r in conn.execute("SELECT * FROM ledger ORDER BY seq")]
    heads = conn.execute("SELECT round, seq FROM heads ORDER BY round").fetchall()
    conn.execute("DELETE FROM ledger")
    conn.execute("DELETE FROM heads")
    prev, hist, totals, new_seq, kept = genesis_hash(RUN), {}, {}, {0: 0}, 0
    for old in rows:
        if keep(old):
            v = edit(dict(old))
            kept += 1
            v["seq"] = kept
            v["used"] = bool(v["used"])
            h = hist.setdefault(v["site_id"], [])
            mech = (v["noise_multiplier"], v["sample_rate"], v["steps"])
            if v["mechanism"] == REFUSAL:
                v["eps_round"], v["eps_total"] = 0.0, totals.get(v["site_id"], 0.0)
            else:
                if v["steps"] > 0:
                    h.append(mech)
                v["eps_round"] = epsilon([mech], v["delta"], v["accountant"])
                v["eps_total"] = epsilon(h, v["delta"], v["accountant"])
            totals[v["site_id"]] = v["eps_total"]
            v["prev_hash"] = prev
            v["row_hash"] = prev = row_digest(prev, {k: v[k] for k in HASHED_FIELDS})
            v["used"] = int(v["used"])
            conn.execute(f"INSERT INTO ledger VALUES ({', '.join('?' * len(cols))})", [v[c] for c in cols])
        new_seq[old["seq"]] = kept
    hashes = dict(conn.execute("SELECT seq, row_hash FROM ledger").fetchall()) | {0: genesis_hash(RUN)}
    for rnd, seq in heads:
        s = new_seq[seq]
        sig = sign(fed.server, head_claim(RUN, rnd, s, hashes[s])) if resign else "0" * 128
        conn.execute("INSERT INTO heads VALUES (?, ?, ?, ?)", (rnd, s, hashes[s], sig))
    conn.commit()
    conn.close()


def _verify(path, fed):
    with Ledger(path) as led:
        return led.verify(), verify_against_keys(led, fed.registry)


def test_an_honest_signed_ledger_verifies_against_keys(ledger_path, fed):
    own, keyed = _verify(ledger_path, fed)
    assert own.ok and keyed.ok, keyed.reason
    with Ledger(ledger_path) as led:
        rows = led.rows()
        assert [h["round"] for h in led.heads()] == [1, 2, 3, 4]
        assert all(r.claim_id for r in rows if r.site_id != CENTRAL_SITE_ID)
        assert all(not r.claim_id for r in rows if r.site_id == CENTRAL_SITE_ID)
        # A claim is stored once, however many rows follow from it (a dp-sgd and a metrics row).
        assert len(led.claims()) == len({r.claim_id for r in rows if r.claim_id})
        assert {r.mechanism for r in rows} == {"dp-sgd", "gaussian-metrics", "dp-fedavg"}
        assert [(r.round, r.status) for r in rows if r.site_id == "site-4"][-2:] == [(3, "lost"), (4, "trained")]


def test_finding_1_a_consistently_rewritten_ledger_fails_against_keys(ledger_path, fed):
    with Ledger(ledger_path) as led:
        before = led.spent()["site-3"]
        first_site3 = min(r.seq for r in led.rows() if r.site_id == "site-3")

    def raise_sigma(v):
        if v["site_id"] == "site-3":
            v["noise_multiplier"] = v["noise_multiplier"] * 1.6
        return v

    _rewrite(ledger_path, fed, edit=raise_sigma)
    own, keyed = _verify(ledger_path, fed)
    with Ledger(ledger_path) as led:
        assert led.spent()["site-3"] < before / 1.5  # the forged ε reads much lower
    assert own.ok, "the rewrite is consistent: the chain and every ε agree with themselves"
    assert not keyed.ok
    assert keyed.first_bad_seq == first_site3
    assert "noise_multiplier" in keyed.reason and "signed claim" in keyed.reason


def test_the_cli_fails_the_forged_ledger_against_the_registry_and_says_so_without_one(tmp_path, fed, capsys):
    run = tmp_path / RUN
    run.mkdir()
    _build(run / "ledger.sqlite", fed)

    def line():
        with Ledger(run / "ledger.sqlite") as led:
            return json.dumps({"round": ROUNDS, "ledger_head": led.head()}) + "\n"

    (run / "metrics.jsonl").write_text(line())
    assert cli(["audit", str(run), "--verify", "--format", "csv"]) == 0
    assert "not verified against keys: no registry" in capsys.readouterr().err
    fed.registry.write(run / "registry.toml")
    assert cli(["audit", str(run), "--verify", "--format", "csv"]) == 0
    assert "verified against keys" in capsys.readouterr().err

    def raise_sigma(v):
        if v["site_id"] == "site-3":
            v["noise_multiplier"] *= 1.6
        return v

    _rewrite(run / "ledger.sqlite", fed, edit=raise_sigma)
    (run / "metrics.jsonl").write_text(line())  # and the "second record" rewritten too
    elsewhere = tmp_path / "registry.toml"
    (run / "registry.toml").rename(elsewhere)
    assert cli(["audit", str(run), "--verify", "--format", "csv"]) == 0  # self-consistent ...
    assert "not verified against keys" in capsys.readouterr().err
    assert cli(["audit", str(run), "--verify", "--format", "csv", "--registry", str(elsewhere)]) == 1  # ... not signed
    err = capsys.readouterr().err
    assert "against keys FAILED at row seq 3" in err and "noise_multiplier" in err


def test_a_row_with_another_sites_claim_fails(ledger_path, fed):
    with Ledger(ledger_path) as led:
        rows = led.rows()
    donor = next(r for r in rows if r.site_id == "site-1" and r.round == 2)
    victim = next(r for r in rows if r.site_id == "site-2" and r.round == 2 and r.mechanism == "dp-sgd")
    _rewrite(ledger_path, fed, edit=lambda v: v | ({"claim_id": donor.claim_id} if v["seq"] == victim.seq else {}))
    own, keyed = _verify(ledger_path, fed)
    assert own.ok and not keyed.ok
    assert keyed.first_bad_seq == victim.seq and "another site" in keyed.reason
    # Relabelling the stored claim as site-2's: now the donor row fails first, and site-2's
    # key did not sign the claim its row points to.
    conn = sqlite3.connect(ledger_path)
    conn.execute("UPDATE claims SET site_id = 'site-2' WHERE claim_id = ?", (donor.claim_id,))
    conn.commit()
    conn.close()
    own, keyed = _verify(ledger_path, fed)
    assert not keyed.ok and keyed.first_bad_seq == donor.seq and "another site" in keyed.reason
    with Ledger(ledger_path) as led:
        from server.ledger_audit import _site_row_problem

        row = next(r for r in led.rows() if r.seq == victim.seq)
        why = _site_row_problem(RUN, fed.registry, row, led.claims(), {}, None)
        assert "signature does not verify under the site's registered key" in why


def test_a_row_without_claim_a_forged_signature_or_an_unsigned_central_row_fails(tmp_path, fed):
    path = tmp_path / "l.sqlite"
    led = Ledger(path, run_id=RUN)
    led.record_round(1, _fit(fed, "site-1", 1))
    led.record_round(1, [dataclasses.replace(_fit(fed, "site-2", 1)[0], claim="", signature="")])
    led.sign_head(1, fed.server)
    keyed = verify_against_keys(led, fed.registry)
    assert not keyed.ok and keyed.first_bad_seq == 2 and "no site claim" in keyed.reason
    led.close()
    path2 = tmp_path / "l2.sqlite"
    led = Ledger(path2, run_id=RUN)
    (s,) = _fit(fed, "site-1", 1)
    led.record_round(1, [dataclasses.replace(s, signature=sign(fed.sites["site-2"], json.loads(s.claim)))])
    led.sign_head(1, fed.server)
    keyed = verify_against_keys(led, fed.registry)
    assert not keyed.ok and keyed.first_bad_seq == 1 and "registered key" in keyed.reason
    # A server row written after the last signed head has no key behind it.
    central = _central()
    led.close()
    path3 = tmp_path / "l3.sqlite"
    led = Ledger(path3, run_id=RUN)
    led.record_round(1, _fit(fed, "site-1", 1))
    led.sign_head(1, fed.server)
    led.record_round(2, [central])
    keyed = verify_against_keys(led, fed.registry)
    assert not keyed.ok and keyed.first_bad_seq == 2 and "after the last signed head" in keyed.reason
    led.close()


def test_heads_signed_by_another_key_or_off_the_chain_fail(ledger_path, fed):
    _rewrite(ledger_path, fed, resign=False)
    _, keyed = _verify(ledger_path, fed)
    assert not keyed.ok and "server key" in keyed.reason


def test_a_dropped_row_is_caught_by_the_sites_kept_receipts(tmp_path, fed):
    path = tmp_path / "ledger.sqlite"
    receipts: dict = {}
    _build(path, fed, receipts)
    assert set(receipts) == set(SITES) and all(r.round == ROUNDS - 1 for r in receipts.values())
    with Ledger(path) as led:
        assert check_receipts_against_ledger(led, list(receipts.values())) == ""
        dropped = next(r for r in led.rows() if r.site_id == "site-3" and r.round == 2)
    # The coordinator drops site-3's round-2 row, re-chains and re-signs: consistent, and
    # every remaining row still follows from a signed claim ...
    _rewrite(path, fed, keep=lambda v: v["seq"] != dropped.seq)
    own, keyed = _verify(path, fed)
    assert own.ok and keyed.ok
    # ... but site-3's receipt holds the row, and every site's receipt holds the old head.
    with Ledger(path) as led:
        why = check_receipts_against_ledger(led, [receipts["site-3"]])
        assert why.startswith("site 'site-3', receipt of round 3: row seq 9 of this site differs")
        rows = [receipt_row(r) for r in led.rows()]
        heads = led.heads()
        assert "row seq" in compare(rows, heads, receipts["site-1"])  # its later rows moved
        # Only this site's rows and no heads shared: the row the receipt lists is missing.
        mine = [r for r in rows if r["site_id"] == "site-3"]
        assert f"row seq {dropped.seq} of this site" in compare(mine, [], receipts["site-3"])
        # Nothing shared at all: a cut cannot be ruled out, which is a failure too.
        assert "shares neither" in compare([], [], dataclasses.replace(receipts["site-3"], rows=()))


def test_receipt_compare_catches_a_changed_an_inserted_and_a_cut_row(tmp_path, fed):
    path = tmp_path / "ledger.sqlite"
    receipts: dict = {}
    _build(path, fed, receipts)
    rec = receipts["site-2"]
    with Ledger(path) as led:
        rows = [receipt_row(r) for r in led.rows()]
        heads = led.heads()
    assert compare(rows, heads, rec) == ""
    mine = {r["seq"] for r in rec.rows}
    changed = [r | ({"eps_total": 0.1} if r["seq"] == min(mine) else {}) for r in rows]
    assert "eps_total" in compare(changed, heads, rec)
    cut = [r for r in rows if r["seq"] < rec.seq]
    assert "no row at seq" in compare(cut, [], rec) or "ends before" in compare(cut, [], rec)
    other = next(r for r in rows if r["seq"] < rec.seq and r["site_id"] != "site-2")
    inserted = [r | ({"site_id": "site-2"} if r["seq"] == other["seq"] else {}) for r in rows]
    assert "not in its receipt" in compare(inserted, heads, rec)
    forked = [h | ({"head": "0" * 64} if h["round"] == rec.round else {}) for h in heads]
    assert "forked" in compare(rows, forked, rec)


def test_a_signed_refusal_is_a_row_that_charges_nothing(tmp_path, fed):
    led = Ledger(tmp_path / "l.sqlite", run_id=RUN)
    (first,) = led.record_round(1, _fit(fed, "site-1", 1))
    claim = refusal_claim(RUN, 2, "site-1", "dp.noise-multiplier")
    refusal = SiteSpend(
        "site-1", "image", _plan(0.5), 0, 10.0, False, "refused", "os", REFUSAL,
        canonical(claim).decode(), sign(fed.sites["site-1"], claim),
    )  # fmt: skip
    (row,) = led.record_round(2, [refusal])
    assert (row.steps, row.eps_round, row.eps_total) == (0, 0.0, first.eps_total)
    (later,) = led.record_round(3, _fit(fed, "site-1", 3))
    assert later.eps_total == epsilon([(1.1, 0.05, 20)] * 2, 1e-5, "rdp")  # the refusal added nothing
    led.sign_head(3, fed.server)
    assert led.verify().ok and verify_against_keys(led, fed.registry).ok
    with pytest.raises(ValueError, match="site 'site-2'.*refusal"):
        led.record_round(4, [dataclasses.replace(refusal, site_id="site-2", steps_taken=5)])
    # A refusal the site did not sign (another site's key) fails against keys.
    forged = refusal_claim(RUN, 4, "site-2", "dp.delta")
    spend = dataclasses.replace(
        refusal, site_id="site-2", claim=canonical(forged).decode(), signature=sign(fed.sites["site-1"], forged)
    )
    led.record_round(4, [spend])
    led.sign_head(4, fed.server)
    keyed = verify_against_keys(led, fed.registry)
    assert not keyed.ok and keyed.first_bad_seq == 4
    led.close()


def test_a_catch_up_row_must_be_in_the_signed_history(ledger_path, fed):
    with Ledger(ledger_path) as led:
        lost = next(r for r in led.rows() if r.status == "lost")
    _rewrite(ledger_path, fed, edit=lambda v: v | ({"steps": 5} if v["seq"] == lost.seq else {}))
    own, keyed = _verify(ledger_path, fed)
    assert own.ok and not keyed.ok and keyed.first_bad_seq == lost.seq and "history" in keyed.reason


def test_a_bad_entry_is_refused_alone_naming_its_site(tmp_path, fed):
    led = Ledger(tmp_path / "l.sqlite", run_id=RUN)
    led.record_round(1, _fit(fed, "site-1", 1))
    (s,) = _fit(fed, "site-2", 2)
    for catch_up_round in (2, 3, 2**70, 0):  # this round, a future one, one SQLite cannot hold, none
        with pytest.raises(ValueError, match="site 'site-2'.*catch-up round"):
            led.record_round(2, [s], catch_up=[(catch_up_round, s)])
    with pytest.raises(ValueError, match="round must be an integer"):
        led.record_round(2**70, [s])
    with pytest.raises(ValueError, match="site 'site-1'.*already"):
        led.record_round(1, _fit(fed, "site-1", 1))
    with pytest.raises(ValueError, match="site_id"):
        led.record_round(2, [dataclasses.replace(s, site_id="x" * 500)])
    with pytest.raises(ValueError, match="status"):
        led.record_round(2, [dataclasses.replace(s, status="s" * 500)])
    with pytest.raises(ValueError, match="signature"):
        led.record_round(2, [dataclasses.replace(s, signature="not hex")])
    assert led.count() == 1 and led.verify().ok
    assert len(led.record_round(2, [s])) == 1  # the ledger goes on
    led.close()


def test_heads_are_signed_once_per_round_and_receipts_start_with_the_first(tmp_path, fed):
    led = Ledger(tmp_path / "l.sqlite", run_id=RUN)
    assert led.receipt("site-1", fed.server) == ""
    led.record_round(1, _fit(fed, "site-1", 1))
    h = led.sign_head(1, fed.server)
    led.record_round(2, _fit(fed, "site-1", 2))
    assert led.sign_head(1, fed.server) == h  # a resumed server re-signing a round: unchanged
    rec = check_receipt(led.receipt("site-1", fed.server), fed.registry.server_key, "site-1", RUN)
    assert (rec.round, rec.seq, len(rec.rows)) == (1, 1, 1)
    assert led.receipt("site-2", fed.server) and not json.loads(led.receipt("site-2", fed.server))["rows"]
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        led.conn.execute("UPDATE heads SET seq = 2")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        led.conn.execute("DELETE FROM claims")
    led.close()


def test_resume_refuses_a_ledger_cut_or_rewritten_since_the_checkpoint(ledger_path, fed):
    with Ledger(ledger_path) as led:
        n, head = led.count(), led.head()
        check_ledger(led, (n, head), fed.server)
        check_ledger(led, (n, head), public_hex(fed.server))
        with pytest.raises(PrivfedError, match="checkpoint"):
            check_ledger(led, (n - 1, head), None)
        with pytest.raises(PrivfedError, match="signed ledger head"):
            check_ledger(led, (n, head), new_signing_key())

    def raise_sigma(v):
        return v | ({"noise_multiplier": v["noise_multiplier"] * 1.6} if v["site_id"] == "site-3" else {})

    _rewrite(ledger_path, fed, edit=raise_sigma)
    with Ledger(ledger_path) as led, pytest.raises(PrivfedError, match="checkpoint"):
        check_ledger(led, (n, head), fed.server)


def test_a_ledger_from_before_the_claim_column_is_refused(tmp_path):
    from server.ledger import SCHEMA

    path = tmp_path / "old.sqlite"
    conn = sqlite3.connect(path)
    conn.executescript(SCHEMA.replace("    claim_id         TEXT    NOT NULL,\n", ""))
    conn.execute("INSERT INTO meta VALUES ('run_id', 'r')")
    conn.commit()
    conn.close()
    for run_id in ("r", None):
        with pytest.raises(ValueError, match="older privfed.*'claim_id'"):
            Ledger(path, run_id=run_id)


def test_the_recorder_signs_each_rounds_head_before_its_line(tmp_path, fed):
    from server.recorder import RunRecorder
    from server.resume import resume_point
    from server.strategy import RoundRecord
    from tests.unit.test_gan import gan_task

    task = gan_task()
    run = tmp_path / RUN
    recorder = RunRecorder(task.cfg, task, run, server_key=fed.server)
    led = recorder.ledger
    led.record_round(1, _fit(fed, "site-1", 1))
    recorder.write_round(1, RoundRecord(1), 0.1, {}, ok=False)
    recorder.record_gap({2: True}, 0)
    assert [(h["round"], h["seq"]) for h in led.heads()] == [(1, 1), (2, 1)]
    recorder.write_round(1, RoundRecord(1), 0.1, {}, ok=False)  # written again (a resumed server): still one head
    assert len(led.heads()) == 2
    assert verify_against_keys(led, fed.registry).ok
    assert check_receipt(led.receipt("site-1", fed.server), fed.registry.server_key, "site-1", RUN).seq == 1
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["ledger_head"] for x in lines][:2] == [h["head"] for h in led.heads()]
    recorder.save_checkpoint(1)
    assert resume_point(run, led, task.cfg.task, public_hex(fed.server)).next_round == 3
    led.close()


def test_rows_from_an_evaluate_reply_verify_and_a_forged_release_fails(tmp_path, fed):
    led = Ledger(tmp_path / "l.sqlite", run_id=RUN)
    led.record_round(1, _fit(fed, "site-1", 1))
    # Round 2: the fit reply is lost; the evaluate reply's signed history reports it, and a
    # noisy-metrics release, which the server ledgers from the same claim.
    m = {
        "site_id": "site-1",
        "history": json.dumps([[1, 1.1, 0.05, 20], [2, 1.1, 0.05, 20]]),
        "metrics_noise_multiplier": 3.0,
        "metrics_l2_sensitivity": 1.0,
        "metrics_delta": 1e-6,
        "metrics_rng": "os",
    }
    claim, signature = _claimed(fed.sites["site-1"], "site-1", 2, m, kind="evaluate")
    lost = SiteSpend("site-1", "image", _plan(1.1), 20, 10.0, False, "lost", "os", "dp-sgd", claim, signature)
    led.record_round(3, [], catch_up=[(2, lost)])
    release = RoundPlan(0, 1.0, 1, 3.0, 1.0, 1e-6, "rdp")
    led.record_round(
        2,
        [SiteSpend("site-1", "metric", release, 1, 10.0, True, "released", "os", "gaussian-metrics", claim, signature)],
    )
    led.sign_head(3, fed.server)
    assert led.verify().ok and verify_against_keys(led, fed.registry).ok, verify_against_keys(led, fed.registry)
    assert len(led.claims()) == 2
    led.close()
    _rewrite(tmp_path / "l.sqlite", fed, edit=lambda v: v | ({"noise_multiplier": 6.0} if v["seq"] == 3 else {}))
    own, keyed = _verify(tmp_path / "l.sqlite", fed)
    assert own.ok and not keyed.ok and keyed.first_bad_seq == 3 and keyed.reason.startswith("noise_multiplier")
    _rewrite(
        tmp_path / "l.sqlite",
        fed,
        edit=lambda v: v | ({"delta": 1e-4} if v["seq"] == 2 else {"noise_multiplier": 3.0} if v["seq"] == 3 else {}),
    )
    own, keyed = _verify(tmp_path / "l.sqlite", fed)
    assert own.ok and not keyed.ok and keyed.first_bad_seq == 2 and "delta" in keyed.reason


def test_the_audit_checks_the_receipts_sites_hand_in(tmp_path, fed, capsys):
    run = tmp_path / RUN
    run.mkdir()
    receipts: dict = {}
    _build(run / "ledger.sqlite", fed, receipts)
    fed.registry.write(run / "registry.toml")
    kept = tmp_path / "receipts"
    for site, rec in receipts.items():
        (kept / site).mkdir(parents=True)
        (kept / site / f"{RUN}.json").write_text(rec.text)

    def audit() -> int:
        with Ledger(run / "ledger.sqlite") as led:
            (run / "metrics.jsonl").write_text(json.dumps({"round": ROUNDS, "ledger_head": led.head()}) + "\n")
        return cli(["audit", str(run), "--verify", "--format", "csv", "--receipts", str(kept)])

    assert audit() == 0
    assert "verified against the sites' receipts" in capsys.readouterr().err
    with Ledger(run / "ledger.sqlite") as led:
        dropped = next(r for r in led.rows() if r.site_id == "site-2" and r.round == 3)
    _rewrite(run / "ledger.sqlite", fed, keep=lambda v: v["seq"] != dropped.seq)
    assert audit() == 1
    err = capsys.readouterr().err
    assert "receipts FAILED" in err and "site-1" in err  # the first receipt, in file order, that it contradicts
    (kept / "site-1" / f"{RUN}.json").write_text(receipts["site-1"].text.replace('"round":3', '"round":2'))
    assert audit() == 2
    assert "does not verify" in capsys.readouterr().err
