"""Issue 19: a malicious site (or a network outsider) against the server, one test per attack.

Each attack must be refused with its reason, and the honest sites' rows and updates must
be intact: the round goes on, nothing of theirs is lost. Real FitRes/EvaluateRes objects,
a real ledger, replies signed exactly as sites sign them (tests.conftest.sign_reply).
"""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import numpy as np
from flwr.common import Code, EvaluateRes, FitRes, Status, ndarrays_to_parameters

from common.deploy.signing import new_signing_key, refusal_claim, refusal_token
from common.privacy.accounting import RoundPlan
from common.protocol import Status as SiteStatus
from common.protocol import fit_metrics
from server.replies import MAX_CATCH_UP, describe_failure
from tests.conftest import make_registry, make_strategy, sign_reply, site_key

HONEST = {"a": 1, "b": 2, "c": 3}  # site -> its node id
N = 100  # every site's registered declared size
ONE = [np.ones(3, np.float32)]


def _strategy(tmp_path, rounds=10, **kw):
    reg = make_registry({**{s: N for s in HONEST}, "m": N})  # m: a registered, malicious site
    return make_strategy(tmp_path, [np.zeros(3, np.float32)], accountant="rdp", registry=reg, last_round=rounds, **kw)


def _fit(s, site, rnd, arrays=ONE, node=None, key=None, n=N, site_status=SiteStatus.TRAINED, **override):
    """A fit reply of ``site`` signed with ``key`` (default: the site's own) for round ``rnd``."""
    plan = RoundPlan(n, 0.5, 4, 1.2, 1.0, 1e-5, "rdp")
    steps = plan.steps if site_status is SiteStatus.TRAINED else 0
    metrics = fit_metrics(site, "image", plan, steps, 1e3, site_status, eps_spent=1.0, rng="os")
    metrics.update(override)
    sign_reply(metrics, key or site_key(site), s.run_id, rnd, "fit", arrays)
    res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), n, metrics)
    return SimpleNamespace(node_id=HONEST.get(site, 9) if node is None else node), res


def _honest(s, rnd, **history):
    return [_fit(s, site, rnd, history=history.get(site, "[]")) for site in HONEST]


def _round(s, rnd, results, failures=()):
    s.ledger.start_round(rnd)  # what the round loop does before any site is asked
    s.note_sampled(rnd, [p.node_id for p, _ in results])
    s.aggregate_fit(rnd, results, list(failures))
    return s.end_fit(rnd)


def _rows(s, rnd=None):
    return {(r.round, r.site_id, r.mechanism): r for r in s.ledger.rows() if rnd is None or r.round == rnd}


def _honest_intact(s, rnd):
    rows = _rows(s, rnd)
    for site in HONEST:
        row = rows[(rnd, site, "dp-sgd")]
        assert row.used and row.status == "trained" and row.steps == 4, site
    assert s.records[rnd].used[:3] == sorted(HONEST) or set(HONEST) <= set(s.records[rnd].used)
    assert s.ledger.verify().ok


def _hist(*rounds):
    return json.dumps([[r, 1.2, 0.5, 4] for r in rounds])


# ------------------------------------------------------------------ identity
def test_impersonation_is_refused_and_the_real_sites_update_is_used(tmp_path):
    s = _strategy(tmp_path)
    # Node 9 answers first, in b's name, but cannot sign with b's key.
    fake = _fit(s, "b", 1, arrays=[np.full(3, -50.0, np.float32)], node=9, key=new_signing_key())
    params = _round(s, 1, [fake, *_honest(s, 1)])
    rec = s.records[1]
    assert "signature does not verify" in rec.rejected["node-9"]
    assert np.allclose(params[0], 1.0) and rec.used == ["a", "b", "c"]
    _honest_intact(s, 1)
    assert [k for k in _rows(s) if k[1] == "b"] == [(1, "b", "dp-sgd")]  # one row, the real b's

    # A node bound to a that signs for b with b's own key is still refused: one node, one site.
    bound = _fit(s, "b", 2, node=HONEST["a"])
    _round(s, 2, [bound, _fit(s, "c", 2)])
    assert "another site" in s.records[2].rejected["node-1"] and "b" not in s.records[2].trained

    # Replaying a's round-1 reply in round 3 (or another run's): the claim names round 1.
    replay = _fit(s, "a", 1)
    _round(s, 3, [replay, _fit(s, "b", 3), _fit(s, "c", 3)])
    assert "signature does not verify" in s.records[3].rejected["node-1"]


def test_a_site_that_moves_to_a_new_node_is_rebound(tmp_path, caplog):
    s = _strategy(tmp_path)
    _round(s, 1, _honest(s, 1))
    _round(s, 2, [_fit(s, "a", 2, node=42), _fit(s, "b", 2), _fit(s, "c", 2)])  # a's SuperNode restarted
    assert s.records[2].used == ["a", "b", "c"] and s.site_of(42) == "a" and s.site_of(1) is None
    assert "now answers from node 42" in caplog.text


def test_the_reserved_id_and_made_up_ids_are_refused(tmp_path):
    s = _strategy(tmp_path)
    replies = [
        _fit(s, "all-sites", 1, node=7, key=new_signing_key()),
        _fit(s, "node-3", 1, node=8, key=new_signing_key()),
        _fit(s, "nobody", 1, node=10, key=new_signing_key()),
        *_honest(s, 1),
    ]
    _round(s, 1, replies)
    rec = s.records[1]
    assert "reserved" in rec.rejected["node-7"] and "reserved" in rec.rejected["node-8"]
    assert "not in the federation registry" in rec.rejected["node-10"]
    assert {k[1] for k in _rows(s)} == set(HONEST)
    _honest_intact(s, 1)


def test_fake_exhaustion_under_made_up_ids_does_not_stop_the_run(tmp_path):
    s = _strategy(tmp_path)
    fakes = [
        _fit(s, f"ghost-{i}", 1, node=20 + i, key=new_signing_key(), site_status=SiteStatus.BUDGET_EXHAUSTED)
        for i in range(3)
    ]
    # m (registered) claims the honest sites are exhausted, signing with its own key.
    mkey = site_key("m")
    fakes += [
        _fit(s, site, 1, node=30 + i, key=mkey, site_status=SiteStatus.BUDGET_EXHAUSTED)
        for i, site in enumerate(HONEST)
    ]
    _round(s, 1, [*fakes, *_honest(s, 1)])
    rec = s.records[1]
    assert all("not in the federation registry" in rec.rejected[f"node-{20 + i}"] for i in range(3))
    assert all("signature does not verify" in rec.rejected[f"node-{30 + i}"] for i in range(3))
    assert not s.should_stop() and s.exhausted_sites == set() and rec.exhausted == []
    _honest_intact(s, 1)


def test_evaluate_replies_for_other_sites_set_no_site_val(tmp_path):
    s = _strategy(tmp_path)
    _round(s, 1, _honest(s, 1))

    def evaluate(site, node, key=None, loss=1.0):
        metrics = sign_reply({"site_id": site, "loss": loss}, key or site_key(site), s.run_id, 1, "evaluate")
        return SimpleNamespace(node_id=node), EvaluateRes(Status(Code.OK, ""), loss, 5, metrics)

    forged = [
        evaluate("b", 9, key=site_key("m"), loss=99.0),  # another site's id, m's key
        evaluate("c", HONEST["a"], loss=99.0),  # a's node answering for c, with c's key
        evaluate("nobody", 10, key=new_signing_key()),
    ]
    unsigned = (SimpleNamespace(node_id=11), EvaluateRes(Status(Code.OK, ""), 99.0, 5, {"site_id": "b", "loss": 99.0}))
    s.aggregate_evaluate(1, [*forged, unsigned, evaluate("a", HONEST["a"], loss=2.0)], [])
    rec = s.records[1]
    assert rec.site_val == {"a": {"loss": 2.0}}
    text = "\n".join(rec.failures)
    assert "node-9: evaluate reply refused: signature does not verify" in text
    assert "another site" in text and "not in the federation registry" in text and "not signed" in text


# ------------------------------------------------------------------ histories
def test_a_future_round_history_is_refused_and_the_next_round_runs(tmp_path):
    s = _strategy(tmp_path)
    _round(s, 1, _honest(s, 1))
    bad = [_fit(s, "m", 2, node=9, history=_hist(3)), *_honest(s, 2, a=_hist(1), b=_hist(1), c=_hist(1))]
    _round(s, 2, bad)
    assert "outside the rounds begun" in s.records[2].rejected["m"]
    _honest_intact(s, 2)
    current = _fit(s, "m", 3, node=9, history=_hist(3))  # "lost" in the round it is sent in
    _round(s, 3, [current, *_honest(s, 3, a=_hist(1, 2), b=_hist(1, 2), c=_hist(1, 2))])
    assert "current or a later round" in s.records[3].rejected["m"]
    _honest_intact(s, 3)
    assert not [k for k in _rows(s) if k[1] == "m"]  # nothing under m: no row to collide with later
    _round(s, 4, [_fit(s, "m", 4, node=9), *_honest(s, 4)])  # round 4 runs: no IntegrityError
    _honest_intact(s, 4)


def test_huge_round_histories_are_refused(tmp_path):
    s = _strategy(tmp_path)
    _round(s, 1, _honest(s, 1))
    for rnd, huge in ((2, 2**62), (3, 2**70)):
        _round(s, rnd, [_fit(s, "m", rnd, node=9, history=_hist(huge)), *_honest(s, rnd)])
        assert "outside the rounds begun" in s.records[rnd].rejected["m"]
        assert str(huge) not in s.records[rnd].rejected["m"]  # the value is never repeated
        _honest_intact(s, rnd)
    assert s.ledger.last_round() == 3  # a resume reads no round beyond the ones begun


def test_a_history_naming_a_round_the_site_was_not_sampled_in_is_refused(tmp_path):
    s = _strategy(tmp_path)
    _round(s, 1, _honest(s, 1))  # m was not sampled in round 1
    _round(s, 2, [_fit(s, "m", 2, node=9, history=_hist(1)), *_honest(s, 2)])
    assert "did not sample this site" in s.records[2].rejected["m"]
    _honest_intact(s, 2)


def test_a_lost_round_in_which_the_site_was_sampled_is_caught_up_once(tmp_path):
    s = _strategy(tmp_path)
    s.ledger.start_round(1)
    s.note_sampled(1, [1, 2, 3, 9])  # m sampled; its reply never arrives
    s.aggregate_fit(1, _honest(s, 1), [])
    s.end_fit(1)
    _round(s, 2, [_fit(s, "m", 2, node=9, history=_hist(1)), *_honest(s, 2)])
    assert s.records[2].caught_up == ["m@1"] and s.records[2].used == ["a", "b", "c", "m"]
    dup = _fit(s, "m", 3, node=9, history=json.dumps([[1, 1.2, 0.5, 4], [1, 1.3, 0.5, 4]]))
    _round(s, 3, [dup, *_honest(s, 3)])
    assert "one round twice" in s.records[3].rejected["m"]


def test_a_flooded_history_is_refused_before_it_is_parsed(tmp_path):
    s = _strategy(tmp_path)
    _round(s, 1, _honest(s, 1))
    flood = json.dumps([[r, 1.2, 0.5, 4] for r in range(1, 100_001)])
    s.ledger.start_round(2)
    hostile = [_fit(s, "m", 2, node=9, history=flood), *_honest(s, 2)]
    t0 = time.perf_counter()
    s.aggregate_fit(2, hostile, [])
    hostile_ms = (time.perf_counter() - t0) * 1e3
    s.end_fit(2)
    assert "longer than" in s.records[2].rejected["node-9"]  # refused before its signature is even checked
    _honest_intact(s, 2)
    s.ledger.start_round(3)
    t0 = time.perf_counter()
    s.aggregate_fit(3, _honest(s, 3), [])
    honest_ms = (time.perf_counter() - t0) * 1e3
    s.end_fit(3)
    print(f"aggregate_fit: honest round {honest_ms:.2f} ms, with a 100,000-entry history {hostile_ms:.2f} ms")


def test_800_distinct_histories_are_refused_or_bounded(tmp_path):
    s = _strategy(tmp_path, rounds=1000)
    _round(s, 1, _honest(s, 1))
    many = json.dumps([[r, 1.0 + r / 1000, 0.5, 4] for r in range(3, 803)])  # 800 distinct (sigma, q)
    _round(s, 2, [_fit(s, "m", 2, node=9, history=many), *_honest(s, 2)])
    assert "longer than" in s.records[2].rejected["node-9"]  # round 2: 800 rounds cannot have been begun
    # A resumed run at round 900 whose earlier rounds this process did not see: bounded per reply.
    s.ledger.start_round(900)
    t0 = time.perf_counter()
    _round(s, 900, [_fit(s, "m", 900, node=9, history=many)])
    seconds = time.perf_counter() - t0
    assert len(s.records[900].caught_up) == MAX_CATCH_UP
    assert f"more than {MAX_CATCH_UP}" in s.records[900].rejected["m"]  # its update waits for the rest
    assert (900, "m", "dp-sgd") in _rows(s) and not _rows(s)[(900, "m", "dp-sgd")].used  # spend still ledgered
    print(f"800-entry history after a resume: {seconds * 1e3:.0f} ms ({MAX_CATCH_UP} rows per reply)")


# ------------------------------------------------------------------ weights
def test_weight_inflation_is_refused_and_the_model_not_flipped(tmp_path):
    s = _strategy(tmp_path)
    flip = [np.full(3, -1.0, np.float32)]
    # n = 1e11 with delta = 1e-12 and q = 1e-6: accepted by the old server, outweighing everyone.
    inflated = _fit(s, "m", 1, arrays=flip, node=9, n=10**11, delta=1e-12, sample_rate=1e-6)
    params = _round(s, 1, [inflated, *_honest(s, 1)])
    assert s.records[1].rejected["m"] == "dataset_size differs from the registered declared size"
    assert np.allclose(params[0], 1.0)  # three honest sites pushed to +1: still +1
    assert not _rows(s)[(1, "m", "dp-sgd")].used  # its spend (signed) is ledgered, its update not used
    _honest_intact(s, 1)


def test_a_large_weight_cannot_carry_an_above_typical_update(tmp_path):
    reg = make_registry({"a": 100, "b": 100, "c": 100, "big": 1000})
    s = make_strategy(tmp_path, [np.zeros(3, np.float32)], registry=reg, norm_outlier_factor=10.0)
    honest = [_fit(s, site, 1, n=100, arrays=[np.full(3, v, np.float32)]) for site, v in zip("abc", (1.0, 1.1, 0.9))]
    pushy = _fit(s, "big", 1, node=9, n=1000, arrays=[np.full(3, 3.0, np.float32)])  # 3x norm, 10x weight
    params = _round(s, 1, [*honest, pushy])
    assert "weighted contribution" in s.records[1].rejected["big"]
    assert np.allclose(params[0], 1.0)
    # The same large site with a typical update is not an outlier.
    typical = _fit(s, "big", 2, node=9, n=1000, arrays=[np.full(3, 1.0, np.float32)])
    _round(s, 2, [*[_fit(s, site, 2, n=100) for site in "abc"], typical])
    assert "big" in s.records[2].used


# ------------------------------------------------------------------ strings and isolation
def test_unbounded_strings_are_refused_and_never_repeated(tmp_path):
    s = _strategy(tmp_path)
    long_id = "x" * 100
    replies = [
        _fit(s, long_id, 1, node=20, key=new_signing_key()),
        _fit(s, "m", 1, node=9, note="n" * 1_000_000),
        *_honest(s, 1),
    ]
    _round(s, 1, replies)
    rec = s.records[1]
    assert "site id must be" in rec.rejected["node-20"] and long_id not in rec.rejected["node-20"]
    assert "'note' is longer than" in rec.rejected["node-9"]
    _honest_intact(s, 1)
    for i, (field, value) in enumerate((("unit", "u" * 33), ("unit", "image\nFAKE LOG LINE"), ("status", "x" * 50))):
        _round(s, 2 + i, [_fit(s, "m", 2 + i, node=9, **{field: value}), *_honest(s, 2 + i)])
        reason = s.records[2 + i].rejected["m"]
        assert field in reason and value not in reason
        _honest_intact(s, 2 + i)
    # A long but bounded note is dropped, not stored; an odd metric name refuses the reply.
    _round(s, 5, [_fit(s, "m", 5, node=9, note="\x1b[31m" * 10), *_honest(s, 5)])
    assert "m" in s.records[5].used
    _round(s, 6, [_fit(s, "m", 6, node=9, **{"k" * 100: 1.0}), *_honest(s, 6)])
    assert "metric name" in s.records[6].rejected["node-9"]
    # A failure's text is one bounded, printable line.
    line = describe_failure(RuntimeError("\x1b[2J" + "y" * 1_000_000))
    assert len(line) <= 200 and "\x1b" not in line


def test_a_reply_that_breaks_processing_is_refused_alone(tmp_path):
    class Hostile(dict):
        def items(self):
            raise RuntimeError("boom")

    s = _strategy(tmp_path)
    proxy, res = _fit(s, "m", 1, node=9)
    res.metrics = Hostile(res.metrics)
    _round(s, 1, [(proxy, res), *_honest(s, 1)])
    assert s.records[1].rejected["node-9"] == "reply could not be processed (RuntimeError)"
    _honest_intact(s, 1)


def test_an_oversized_array_is_refused_before_decoding(tmp_path):
    s = _strategy(tmp_path)
    proxy, res = _fit(s, "m", 1, node=9)
    res.parameters = ndarrays_to_parameters([np.zeros(10_000, np.float32)])
    _round(s, 1, [(proxy, res), *_honest(s, 1)])
    assert "larger than the model's" in s.records[1].rejected["node-9"]
    _honest_intact(s, 1)


# ------------------------------------------------------------------ refusals
def test_a_signed_refusal_is_ledgered_and_a_forged_one_is_not(tmp_path):
    s = _strategy(tmp_path)
    _round(s, 1, _honest(s, 1))
    token = refusal_token(site_key("m"), refusal_claim(s.run_id, 2, "m", "dp.noise-multiplier"))
    forged = refusal_token(new_signing_key(), refusal_claim(s.run_id, 2, "c", "dp.noise-multiplier"))
    stale = refusal_token(site_key("m"), refusal_claim(s.run_id, 1, "m", "dp.noise-multiplier"))
    failures = [RuntimeError(f"site failed: PolicyRefusal {token}"), RuntimeError(f"x {forged}"), RuntimeError(stale)]
    _round(s, 2, _honest(s, 2), failures)
    row = _rows(s)[(2, "m", "refusal")]
    assert row.status == "refused" and row.steps == 0 and not row.used
    rec = s.records[2]
    assert "m: refused the run config by its own policy (config key 'dp.noise-multiplier')" in rec.failures
    assert sum("does not verify" in f for f in rec.failures) == 2
    assert not any("signed-refusal:" in f for f in rec.failures)  # the token is shortened in the text
    assert (2, "c", "refusal") not in _rows(s)
    _honest_intact(s, 2)


def test_a_site_claiming_another_unit_of_privacy_is_rejected_and_nothing_is_lost(tmp_path):
    """Issue 21: the ledger states the run's unit. A site may not ledger a person's protection
    ("user") in a record-level run; the honest sites' round goes on."""
    s = _strategy(tmp_path)
    _round(s, 1, [_fit(s, "m", 1, node=4, unit="user"), *_honest(s, 1)])
    row = _rows(s, 1)[(1, "m", "dp-sgd")]
    assert not row.used and row.status == "rejected"
    assert "unit 'user'" in s.records[1].rejected["m"]
    _honest_intact(s, 1)
