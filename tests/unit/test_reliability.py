"""Site failures, malformed and outlying updates, robust aggregation, lost replies (no Ray)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from flwr.app import Context, RecordDict
from flwr.server.strategy.aggregate import aggregate_krum, aggregate_trimmed_avg

from client.app import SiteClient
from common.errors import ConfigError
from common.pipeline.stages.faults import corrupt
from common.privacy.accounting import epsilon
from common.protocol import MalformedReport, parse_fit_metrics
from common.tasks.base import get_state
from server.ledger import Ledger
from tests.conftest import declared, make_cfg, make_strategy, signed
from tests.unit.test_server_client import PLAN, _reply, _round


def _strategy(tmp_path, init, **kw):
    return make_strategy(tmp_path, init, num_sites=8, **kw)


def _vec(v):
    return [np.full(3, v, np.float32)]


# ------------------------------------------------------------ outlying update norms
def test_update_far_beyond_the_rest_is_rejected_and_the_round_goes_on(tmp_path):
    s = _strategy(tmp_path, [np.zeros(3, np.float32)], norm_outlier_factor=10.0)
    honest = [_reply(f"s{i}", _vec(1.0 + 0.1 * i), node=i) for i in range(4)]
    params = _round(s, 1, honest + [_reply("huge", _vec(1000.0), node=9)], [])
    assert "x the round's median" in s.records[1].rejected["huge"]
    assert np.allclose(params[0], np.mean([1.0, 1.1, 1.2, 1.3]))
    rows = {r.site_id: r for r in s.ledger.rows()}
    assert rows["huge"].status == "rejected" and rows["huge"].steps == PLAN.steps  # its spend is still charged


def test_outlier_check_needs_a_majority_to_compare_with(tmp_path):
    # Two updates: no median to trust, so neither is called an outlier (only an absolute bound could).
    s = _strategy(tmp_path, [np.zeros(3, np.float32)], norm_outlier_factor=10.0)
    _round(s, 1, [_reply("a", _vec(1.0)), _reply("b", _vec(1000.0), node=2)], [])
    assert s.records[1].rejected == {}
    (tmp_path / "abs").mkdir()
    s = _strategy(tmp_path / "abs", [np.zeros(3, np.float32)], max_update_norm=100.0)
    _round(s, 1, [_reply("a", _vec(1.0)), _reply("b", _vec(1000.0), node=2)], [])
    assert "exceeds max-update-norm=100" in s.records[1].rejected["b"]


@pytest.mark.parametrize("kind, reason", [("nan", "NaN or Inf"), ("shape", "dtype/shape"), ("norm", "median")])
def test_each_injected_corruption_is_caught(tmp_path, kind, reason):
    s = _strategy(tmp_path, [np.zeros(3, np.float32), np.zeros((2, 2), np.float32)], norm_outlier_factor=10.0)
    good = [[np.full(3, 0.5 + 0.1 * i, np.float32), np.full((2, 2), 0.2, np.float32)] for i in range(3)]
    bad = corrupt(good[0], kind)
    _round(s, 1, [_reply(f"s{i}", g, node=i) for i, g in enumerate(good)] + [_reply("bad", bad, node=7)], [])
    assert reason in s.records[1].rejected["bad"] and s.records[1].aggregated


# ------------------------------------------------------------- robust aggregation
def test_trimmed_mean_and_krum_are_flowers_rules_on_the_updates(tmp_path):
    updates = [_vec(v) for v in (1.0, 1.2, 0.9, 1.1, 50.0)]  # one hostile site
    for rule, expect in (
        ("trimmed-mean", aggregate_trimmed_avg([(u, 10) for u in updates], 0.2)),
        ("krum", aggregate_krum([(u, 10) for u in updates], 1, 0)),
        ("multi-krum", aggregate_krum([(u, 10) for u in updates], 1, 4)),
    ):
        sub = tmp_path / rule
        sub.mkdir()
        s = _strategy(sub, [np.zeros(3, np.float32)], aggregation=rule, trim_fraction=0.2, byzantine_sites=1)
        params = _round(s, 1, [_reply(f"s{i}", u, node=i) for i, u in enumerate(updates)], [])
        assert np.allclose(params[0], expect[0]), rule
        assert params[0][0] < 2.0  # the hostile update does not drag the model away
    # Plain FedAvg is dragged: the contrast the robust rules exist for.
    s = _strategy(tmp_path, [np.zeros(3, np.float32)])
    assert _round(s, 1, [_reply(f"s{i}", u, node=i) for i, u in enumerate(updates)], [])[0][0] > 10


def test_krum_with_too_few_updates_skips_the_round_with_a_reason(tmp_path):
    s = _strategy(tmp_path, [np.zeros(3, np.float32)], aggregation="krum", byzantine_sites=1)
    params = _round(s, 1, [_reply(f"s{i}", _vec(1.0), node=i) for i in range(4)], [])
    assert params is None and "needs at least 5 updates" in s.records[1].failures[-1]
    assert all(r.status == "not_aggregated" for r in s.ledger.rows())


@pytest.mark.parametrize(
    "flat, match",
    [
        ({"aggregation": "median"}, "must be one of fedavg"),
        ({"aggregation": "krum", "num-sites": 4, "byzantine-sites": 1}, "needs at least 5 sites"),
        ({"aggregation": "trimmed-mean", "trim-fraction": 0.5}, "trim-fraction"),
        ({"aggregation": "krum", "secagg.enabled": True}, "sees only their sum"),
        ({"aggregation": "trimmed-mean", "central-dp.enabled": True}, "central-DP"),
        ({"norm-outlier-factor": 0.5}, "0 \\(off\\) or > 1"),
        ({"round-timeout": -1}, "round-timeout"),
        ({"faults.corrupt-rate": 0.2, "secagg.enabled": True}, "corrupted masked update"),
        ({"faults.corrupt-kinds": "nan,zeros"}, "corrupt-kinds"),
        ({"faults.crash-rate": 1.5}, "crash-rate"),
    ],
)
def test_reliability_config_errors(flat, match):
    with pytest.raises(ConfigError, match=match) as err:
        make_cfg(**flat)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- lost replies
def test_a_lost_reply_is_ledgered_when_the_site_next_reports_it(tmp_path):
    s = _strategy(tmp_path, [np.zeros(3, np.float32)], accountant="rdp")
    _round(s, 1, [_reply("a", _vec(1.0))], [])  # site b's round-1 reply never arrived
    lost = json.dumps([[1, PLAN.noise_multiplier, PLAN.sample_rate, PLAN.steps]])
    _round(
        s,
        2,
        [_reply("a", _vec(1.0), history=json.dumps([[1, 1.2, 0.5, 4]])), _reply("b", _vec(1.0), node=2, history=lost)],
        [],
    )
    rows = [(r.round, r.site_id, r.status, r.used) for r in s.ledger.rows()]
    assert rows == [
        (1, "a", "trained", True),
        (1, "b", "lost", False),
        (2, "a", "trained", True),
        (2, "b", "trained", True),
    ]
    assert s.records[2].caught_up == ["b@1"]
    b = [r for r in s.ledger.rows() if r.site_id == "b"]
    mech = (PLAN.noise_multiplier, PLAN.sample_rate, PLAN.steps)
    assert b[-1].eps_total == pytest.approx(epsilon([mech, mech], 1e-5, "rdp"))  # both rounds, once each
    assert s.ledger.verify().ok
    # Reported again next round: nothing is ledgered twice.
    _round(s, 3, [_reply("b", _vec(1.0), node=2, history=json.dumps([[1, 1.2, 0.5, 4], [2, 1.2, 0.5, 4]]))], [])
    assert [(r.round, r.site_id) for r in s.ledger.rows()][-1] == (3, "b") and s.ledger.count() == 5


@pytest.mark.parametrize(
    "history",
    [
        "[[1, 1.0, 0.5]]",
        '{"a": 1}',
        "not json",
        "[[0, 1.0, 0.5, 4]]",
        "[[1, 1.0, 1.5, 4]]",
        "[[1, NaN, 0.5, 4]]",
        "[[1, 1e-300, 0.5, 4]]",
        7,
    ],
)
def test_a_malformed_history_is_rejected_with_a_reason(history):
    _, res = _reply("a", _vec(1.0), history=history)
    with pytest.raises(MalformedReport, match="history"):
        parse_fit_metrics(res.metrics)


# -------------------------------------------------------- site durable state
def _site(tmp_path, rnd_ctx=None):
    cfg = make_cfg(**{"num-sites": 3, "dp.noise-multiplier": 1.0, "dp.epsilon-budget": 50.0, "train.local-epochs": 0.5})
    ctx = rnd_ctx or Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    return SiteClient(cfg, 0, "site-0", ctx, state_dir=str(tmp_path / "state"), declared=declared(cfg, 0))


def test_site_history_survives_a_restart_and_travels_with_each_reply(tmp_path):
    site = _site(tmp_path)
    model = site.task.build_model()
    params = get_state(model, site.task.shared_keys(model))
    for rnd in (1, 2):
        _, _, m = site.fit(params, {"server-round": rnd, "run-id": "run-x"})
    assert [h[0] for h in json.loads(m["history"])] == [1]  # the rounds before this one
    restarted = _site(tmp_path)  # a fresh node state: what a restarted SuperNode or a resumed simulation has
    _, _, m = restarted.fit(params, {"server-round": 5, "run-id": "run-x"})
    assert [h[0] for h in json.loads(m["history"])] == [1, 2]
    assert m["eps_spent"] == pytest.approx(epsilon(restarted._history(), 1e-5, "rdp"))
    assert len(restarted._history()) == 3
    other = _site(tmp_path)  # another run id starts its own history
    _, _, m = other.fit(params, {"server-round": 1, "run-id": "run-y"})
    assert json.loads(m["history"]) == []


def test_a_damaged_site_state_is_an_error_not_a_fresh_start(tmp_path):
    from client.state import state_path
    from common.errors import PrivfedError

    site = _site(tmp_path)
    model = site.task.build_model()
    params = get_state(model, site.task.shared_keys(model))
    site.fit(params, {"server-round": 1, "run-id": "r"})
    path = state_path(tmp_path / "state", "r", "site-0")
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(PrivfedError, match="cannot be read"):
        _site(tmp_path).fit(params, {"server-round": 2, "run-id": "r"})


# ---------------------------------------------------------- ledger head check
def test_rows_after_the_recorded_head_pass_but_a_cut_does_not(tmp_path):
    from server.ledger import SiteSpend

    led = Ledger(tmp_path / "l.sqlite", run_id="t")
    spend = SiteSpend("a", "image", PLAN, PLAN.steps, 10.0, True, "trained", "os")
    led.record_round(1, [spend])
    head = led.head()
    led.record_round(2, [spend])  # the server was killed before writing round 2's metrics line
    result = led.verify(expected_head=head)
    assert result.ok and result.unrecorded == 1
    assert not led.verify(expected_head="0" * 64).ok
    assert math.isfinite(led.rows()[-1].eps_total)


def test_a_failure_after_training_does_not_make_the_site_forget_its_spend(tmp_path):
    """Flower drops a failed ClientApp's changes to its node state; the state file must not."""
    import copy

    from client.mods import InjectedDropout

    cfg_kw = {"faults.dropout-stage": "upload", "faults.dropout-sites": "0", "faults.rounds": "2"}
    cfg = make_cfg(
        **{"num-sites": 3, "dp.noise-multiplier": 1.0, "dp.epsilon-budget": 50.0, "train.local-epochs": 0.5, **cfg_kw}
    )
    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    site = SiteClient(cfg, 0, "site-0", ctx, state_dir=str(tmp_path / "state"), declared=declared(cfg, 0))
    model = site.task.build_model()
    params = get_state(model, site.task.shared_keys(model))
    site.fit(params, {"server-round": 1, "run-id": "r"})
    before = copy.deepcopy(ctx.state)  # holds round 1's history
    with pytest.raises(InjectedDropout):
        site.fit(params, {"server-round": 2, "run-id": "r"})
    ctx.state = before  # what Flower keeps when the app fails
    _, _, m = site.fit(params, {"server-round": 3, "run-id": "r"})
    assert [h[0] for h in json.loads(m["history"])] == [1, 2]
    assert len(site._history()) == 3


def test_round_timeout_reaches_every_wait_of_the_round():
    """Flower's workflows call send_and_receive without a timeout; TimedGrid supplies it."""
    from server.workflow import TimedGrid

    class FakeGrid:
        def __init__(self):
            self.timeouts = []

        def send_and_receive(self, messages, *, timeout=None):
            self.timeouts.append(timeout)
            return []

        def get_node_ids(self):
            return [1, 2]

    inner = FakeGrid()
    grid = TimedGrid(inner, 7.5)
    grid.send_and_receive([])
    grid.send_and_receive([], timeout=3.0)  # SecAgg+ passes its own stage timeout: kept
    assert inner.timeouts == [7.5, 3.0] and grid.get_node_ids() == [1, 2]


def test_a_fit_reply_lost_in_the_last_round_is_ledgered_from_the_evaluate_reply(tmp_path):
    from types import SimpleNamespace

    from flwr.common import Code, EvaluateRes, Status

    s = _strategy(tmp_path, [np.zeros(3, np.float32)], accountant="rdp")
    _round(s, 1, [_reply("a", _vec(1.0)), _reply("b", _vec(1.0), node=2)], [])
    _round(s, 2, [_reply("a", _vec(1.0), history=json.dumps([[1, 1.2, 0.5, 4]]))], [])  # b's round-2 reply is lost
    hist = json.dumps([[1, 1.2, 0.5, 4], [2, 1.2, 0.5, 4]])
    res = EvaluateRes(Status(Code.OK, ""), 1.0, 5, {"site_id": "b", "loss": 1.0, "history": hist})
    s.aggregate_evaluate(2, signed(s, 2, [(SimpleNamespace(node_id=2), res)], "evaluate"), [])
    rows = [(r.round, r.site_id, r.status) for r in s.ledger.rows()]
    assert rows[-1] == (2, "b", "lost") and len(rows) == 4 and s.records[2].caught_up == ["b@2"]
    s.aggregate_evaluate(2, [(SimpleNamespace(node_id=2), res)], [])  # told twice: ledgered once
    assert s.ledger.count() == 4
    bad = EvaluateRes(Status(Code.OK, ""), 1.0, 5, {"site_id": "b", "loss": 1.0, "history": "[[2, 1.2]]"})
    s.aggregate_evaluate(3, signed(s, 3, [(SimpleNamespace(node_id=2), bad)], "evaluate"), [])
    assert "evaluate reply" in s.records[3].failures[-1] and s.ledger.count() == 4


def test_a_task_metric_named_like_a_reply_field_is_refused_not_merged(tmp_path, monkeypatch):
    """Without DP the training metrics are sent; one called like a protocol field (here
    ``history``) must not overwrite that field (found in review of the pipeline split)."""
    import client.app as client_app
    from common.errors import PrivfedError
    from common.privacy.training import RoundOutcome

    cfg = make_cfg(**{"num-sites": 3, "dp.enabled": False, "train.local-epochs": 0.5})
    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    site = SiteClient(cfg, 0, "site-0", ctx, state_dir=str(tmp_path / "state"), declared=declared(cfg, 0))
    model = site.task.build_model()
    params = get_state(model, site.task.shared_keys(model))
    _, _, honest = site.fit(params, {"server-round": 1, "run-id": "r"})
    assert "train_loss" in honest  # non-private runs do send their training metrics
    monkeypatch.setattr(client_app, "run_local_round", lambda *a, **k: RoundOutcome({"history": 1.0}, 1))
    with pytest.raises(PrivfedError, match="history") as err:
        site.fit(params, {"server-round": 2, "run-id": "r"})
    assert "\n" not in str(err.value)
