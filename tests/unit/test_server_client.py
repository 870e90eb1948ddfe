"""Strategy and site logic without Ray: aggregation, rejection with a reason, budgets."""

from __future__ import annotations

import zlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

from client.app import SiteClient
from common.privacy.accounting import RoundPlan
from common.protocol import Status as SiteStatus
from common.protocol import fit_metrics
from common.tasks.base import get_state
from tests.conftest import declared, make_cfg, make_strategy, signed

PLAN = RoundPlan(10, 0.5, 4, 1.2, 1.0, 1e-5, "rdp")


def _strategy(tmp_path, init, num_sites=3, min_fit_sites=1, accountant="none"):
    return make_strategy(tmp_path, init, num_sites=num_sites, min_fit_sites=min_fit_sites, accountant=accountant)


def _round(s, rnd, results, failures):
    """What the round loop does: aggregate_fit stages the sum, end_fit applies it (each
    reply signed by the key of the site it names, as sites do)."""
    s.aggregate_fit(rnd, signed(s, rnd, results), failures)
    return s.end_fit(rnd)


def _reply(site, arrays, n=10, status=SiteStatus.TRAINED, node=None, drop=None, **override):
    """A site's fit reply (unsigned: :func:`_round` signs it for the round). ``node``: the
    Flower node id it comes from, by default one per site name (a node answers for one site)."""
    if node is None:
        node = 1000 + zlib.crc32(site.encode()) % 1_000_000
    plan = RoundPlan(n, PLAN.sample_rate, PLAN.steps, PLAN.noise_multiplier, 1.0, 1e-5, "rdp")
    steps = plan.steps if status is SiteStatus.TRAINED else 0
    metrics = fit_metrics(site, "image", plan, steps, 10.0, status, eps_spent=1.0, rng="os", train_loss=0.5)
    if drop:
        metrics.pop(drop)
    metrics.update(override)
    res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), n if status is SiteStatus.TRAINED else 0, metrics)
    return SimpleNamespace(node_id=node), res


def test_fedavg_of_deltas_weighted_by_examples(tmp_path):
    s = _strategy(tmp_path, [np.ones(3, dtype=np.float32)])
    params = _round(
        s, 1, [_reply("a", [np.full(3, 1.0, np.float32)], n=10), _reply("b", [np.full(3, 4.0, np.float32)], n=30)], []
    )
    # global + (10*1 + 30*4) / 40 = 1 + 3.25
    assert np.allclose(params[0], 4.25)
    assert s.records[1].used == ["a", "b"]


@pytest.mark.parametrize(
    "bad, reason",
    [
        ([np.array([np.nan, 0, 0], np.float32)], "NaN or Inf"),
        ([np.array([np.inf, 0, 0], np.float32)], "NaN or Inf"),
        ([np.zeros(4, np.float32)], "shape"),
        ([np.zeros(3, np.float64)], "float64"),
    ],
)
def test_malformed_update_is_rejected_with_a_reason_and_the_round_goes_on(tmp_path, bad, reason):
    s = _strategy(tmp_path, [np.zeros(3, dtype=np.float32)])
    params = _round(s, 1, [_reply("good", [np.full(3, 2.0, np.float32)]), _reply("bad", bad, node=2)], [])
    assert np.allclose(params[0], 2.0)  # only the good update
    assert reason in s.records[1].rejected["bad"]
    rows = {r.site_id: r for r in s.ledger.rows()}
    # The bad site trained: its privacy spend is in the ledger even though its update was not used.
    assert rows["bad"].status == "rejected" and not rows["bad"].used and rows["bad"].steps == PLAN.steps
    assert rows["good"].used


def test_an_update_with_the_wrong_array_count_is_refused_before_decoding(tmp_path):
    """Sizes are checked before anything is decoded, so before the signature (which covers
    the decoded update) can be verified: the reply is unproven, ledgered under no site."""
    s = _strategy(tmp_path, [np.zeros(3, dtype=np.float32)])
    two = [np.zeros(3, np.float32), np.zeros(1, np.float32)]
    params = _round(s, 1, [_reply("good", [np.full(3, 2.0, np.float32)]), _reply("bad", two, node=2)], [])
    assert np.allclose(params[0], 2.0)
    assert "expected 1 arrays" in s.records[1].rejected["node-2"]
    assert [r.site_id for r in s.ledger.rows()] == ["good"]


def test_reply_without_accountant_inputs_is_rejected(tmp_path):
    s = _strategy(tmp_path, [np.zeros(3, dtype=np.float32)])
    _round(
        s,
        1,
        [
            _reply("good", [np.ones(3, np.float32)]),
            _reply("x", [np.ones(3, np.float32)], node=7, drop="noise_multiplier"),
        ],
        [],
    )
    # Signed by x's key: the refusal names the site; without accountant inputs nothing is ledgered.
    assert "missing metric 'noise_multiplier'" in s.records[1].rejected["x"]
    assert [r.site_id for r in s.ledger.rows()] == ["good"]


def test_too_few_usable_updates_leaves_the_model_unchanged(tmp_path):
    s = _strategy(tmp_path, [np.zeros(3, dtype=np.float32)], min_fit_sites=2)
    params = _round(s, 1, [_reply("a", [np.ones(3, np.float32)])], [RuntimeError("site crashed")])
    assert params is None and np.allclose(s.global_arrays[0], 0.0)
    (row,) = s.ledger.rows()
    assert row.status == "not_aggregated" and not row.used and row.steps == PLAN.steps
    assert s.records[1].failures == ["site crashed", "1 usable update(s), below min-fit-sites=2"]


def test_run_stops_once_every_site_is_out_of_budget(tmp_path):
    s = _strategy(tmp_path, [np.zeros(3, dtype=np.float32)], num_sites=2)
    z = [np.zeros(3, np.float32)]
    _round(s, 1, [_reply("a", z, status=SiteStatus.BUDGET_EXHAUSTED), _reply("b", z)], [])
    assert not s.should_stop()
    params = _round(
        s,
        2,
        [_reply("a", z, status=SiteStatus.BUDGET_EXHAUSTED), _reply("b", z, status=SiteStatus.BUDGET_EXHAUSTED)],
        [],
    )
    assert params is None and s.should_stop()
    statuses = [(r.round, r.site_id, r.status, r.steps) for r in s.ledger.rows()]
    assert statuses == [
        (1, "a", "budget_exhausted", 0),
        (1, "b", "trained", 4),
        (2, "a", "budget_exhausted", 0),
        (2, "b", "budget_exhausted", 0),
    ]


def _site(budget, **kw):
    cfg = make_cfg(**{"num-sites": 3, "dp.noise-multiplier": 1.0, "dp.epsilon-budget": budget, **kw})
    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    return SiteClient(cfg, 0, "site-0", ctx, declared=declared(cfg, 0))


def test_site_refuses_a_round_that_would_exceed_its_budget():
    site = _site(budget=1e-3)
    init = get_state(site.task.build_model(), site.task.shared_keys(site.task.build_model()))
    update, n, metrics = site.fit(init, {"server-round": 1})
    assert n == 0 and metrics["status"] == "budget_exhausted" and metrics["steps"] == 0
    assert all(not u.any() for u in update)
    assert "budget" in metrics["note"]


def test_site_trains_until_its_budget_then_stops():
    site = _site(budget=3.0, **{"train.local-epochs": 0.5})
    model = site.task.build_model()
    params = get_state(model, site.task.shared_keys(model))
    statuses, spent = [], []
    for rnd in range(1, 30):
        _, _, m = site.fit(params, {"server-round": rnd})
        statuses.append(m["status"])
        spent.append(m["eps_spent"])
        if m["status"] == "budget_exhausted":
            break
    assert statuses[-1] == "budget_exhausted" and statuses.count("trained") >= 1
    assert max(spent) <= 3.0  # never over budget
    assert spent == sorted(spent)


def test_training_loss_stays_at_the_site_under_dp():
    site = _site(budget=50.0)
    model = site.task.build_model()
    _, _, metrics = site.fit(get_state(model, site.task.shared_keys(model)), {"server-round": 1})
    assert metrics["status"] == "trained" and "train_loss" not in metrics

    nodp = _site(budget=50.0, **{"dp.enabled": False})
    _, _, metrics = nodp.fit(get_state(model, nodp.task.shared_keys(model)), {"server-round": 1})
    assert "train_loss" in metrics and metrics["noise_multiplier"] == 0.0


def test_secure_rng_noise_is_not_reproducible():
    """dp.secure-rng: OS randomness, so two runs of the same round differ; seeded runs repeat."""
    results = {}
    for secure in (False, True):
        updates = []
        for _ in range(2):
            site = _site(budget=50.0, **{"dp.secure-rng": secure})
            torch.manual_seed(0)  # same initial global model for both runs
            model = site.task.build_model()
            update, _, _ = site.fit(get_state(model, site.task.shared_keys(model)), {"server-round": 1})
            updates.append(np.concatenate([u.ravel() for u in update]))
        results[secure] = np.array_equal(updates[0], updates[1])
    assert results == {False: True, True: False}


def test_duplicate_site_id_is_rejected_not_a_crash(tmp_path):
    s = _strategy(tmp_path, [np.zeros(3, dtype=np.float32)])
    params = _round(
        s, 1, [_reply("a", [np.ones(3, np.float32)], node=1), _reply("a", [np.full(3, 9.0, np.float32)], node=2)], []
    )
    assert np.allclose(params[0], 1.0)
    assert "second reply" in s.records[1].rejected["a@node-2"]
    rows = {r.site_id: r for r in s.ledger.rows()}
    # The duplicate trained too: its spend is in the ledger, its update is not used.
    assert set(rows) == {"a", "a@node-2"} and rows["a"].used and not rows["a@node-2"].used
    assert rows["a@node-2"].steps == PLAN.steps and rows["a@node-2"].status == "rejected"


@pytest.mark.parametrize(
    "override, reason",
    [
        ({"noise_multiplier": float("nan")}, "must be finite"),  # used to hang Opacus forever
        ({"delta": 2.0}, "DP inputs out of range"),
        ({"delta": 0.0}, "DP inputs out of range"),
        ({"max_grad_norm": -1.0}, "DP inputs out of range"),
        ({"accountant": "moments"}, "unknown accountant"),
        ({"eps_budget": float("nan")}, "eps_budget"),
        ({"noise_multiplier": 1e-200}, "outside"),  # used to raise ZeroDivisionError in the accountant
        ({"noise_multiplier": 1e300}, "outside"),  # ... and OverflowError
        ({"steps_planned": 10**9, "steps": 10**9}, "above"),
        ({"delta": 1e-300}, "DP inputs out of range"),
    ],
)
def test_bad_accountant_inputs_are_rejected_not_fatal(tmp_path, override, reason):
    s = _strategy(tmp_path, [np.zeros(3, dtype=np.float32)], accountant="rdp")
    params = _round(
        s,
        1,
        [_reply("good", [np.ones(3, np.float32)]), _reply("bad", [np.ones(3, np.float32)], node=9, **override)],
        [],
    )
    assert np.allclose(params[0], 1.0)
    assert reason in s.records[1].rejected["bad"]
    assert s.ledger.verify().ok


def test_dp_run_refuses_non_private_and_over_budget_updates(tmp_path):
    s = _strategy(tmp_path, [np.zeros(3, dtype=np.float32)], accountant="rdp")
    nodp = _reply("nodp", [np.ones(3, np.float32)], node=2, accountant="none", noise_multiplier=0.0)
    greedy = _reply("greedy", [np.ones(3, np.float32)], node=3, eps_budget=0.01)
    params = _round(s, 1, [_reply("good", [np.full(3, 2.0, np.float32)]), nodp, greedy], [])
    assert np.allclose(params[0], 2.0)
    rec = s.records[1]
    assert "accountant 'none'" in rec.rejected["nodp"] and "over its budget" in rec.rejected["greedy"]
    rows = {r.site_id: r for r in s.ledger.rows()}
    assert not rows["nodp"].used and not rows["greedy"].used and rows["good"].used


@pytest.mark.parametrize(
    "node_config, match",
    [({}, "no 'partition-id'"), ({"partition-id": 3}, "in \\[0, num-sites=3\\)"), ({"partition-id": -1}, "num-sites")],
)
def test_site_identity_needs_a_valid_partition(node_config, match):
    from client.app import site_identity
    from common.errors import PrivfedError

    with pytest.raises(PrivfedError, match=match):
        site_identity(make_cfg(**{"num-sites": 3}), node_config)
    assert site_identity(make_cfg(**{"num-sites": 3}), {"partition-id": 2}) == (2, "site-2")
    assert site_identity(make_cfg(**{"num-sites": 3}), {"partition-id": 0, "site-id": "org-7f3a"}) == (0, "org-7f3a")


def test_undecodable_update_is_rejected(tmp_path):
    from flwr.common import Parameters

    s = _strategy(tmp_path, [np.zeros(3, dtype=np.float32)])
    proxy, res = _reply("junk", [np.ones(3, np.float32)], node=5)
    res.parameters = Parameters(tensors=[b"not a numpy array"], tensor_type="numpy.ndarray")
    params = _round(s, 1, [_reply("good", [np.ones(3, np.float32)]), (proxy, res)], [])
    assert np.allclose(params[0], 1.0)
    assert "cannot be decoded" in s.records[1].rejected["node-5"]  # unproven: under its node


def test_overflowing_aggregate_keeps_the_last_good_model(tmp_path):
    s = _strategy(tmp_path, [np.zeros(3, dtype=np.float32)])
    big = [np.full(3, 3e38, np.float32)]
    params = _round(s, 1, [_reply("a", big), _reply("b", big, node=2)], [])
    assert params is None and np.allclose(s.global_arrays[0], 0.0) and not s.records[1].aggregated
