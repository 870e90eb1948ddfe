"""q-FedAvg fair aggregation (server.aggregation.qfedavg): the step, the strategy's rounds, the config."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.common import Code, EvaluateRes, Status

from common.errors import ConfigError
from server.aggregation.qfedavg import qffl_step, site_losses
from tests.conftest import assert_no_new_simulation_processes, make_cfg, make_strategy, signed, simulation_processes
from tests.unit.test_server_client import _reply, _round


def _reference_step(updates, losses, q, lipschitz, weights):
    """The paper's formula written out directly (no rescaling), for comparison."""
    num = [np.zeros_like(a, dtype=np.float64) for a in updates[0]]
    den = 0.0
    for u, f, p in zip(updates, losses, weights):
        dw = [-lipschitz * np.asarray(a, np.float64) for a in u]
        sq = sum(float((a**2).sum()) for a in dw)
        num = [n + p * f**q * d for n, d in zip(num, dw)]
        den += p * ((q * f ** (q - 1) * sq if q > 0 else 0.0) + lipschitz * f**q)
    return [-n / den for n in num]


# ------------------------------------------------------------------ the step
def test_step_on_a_hand_computed_case():
    # u_a = [1, 0], u_b = [0, 2], F = (1, 2), q = 1, L = 1, equal weights:
    # dw_a = [-1, 0], dw_b = [0, -2]; Delta_a = 1 * dw_a, Delta_b = 2 * dw_b = [0, -4];
    # h_a = 1 * 1 * 1 + 1 * 1 = 2, h_b = 1 * 1 * 4 + 1 * 2 = 6;
    # step = -(Delta_a + Delta_b) / (h_a + h_b) = [1, 4] / 8.
    step = qffl_step([[np.array([1.0, 0.0])], [np.array([0.0, 2.0])]], [1.0, 2.0], q=1.0, lipschitz=1.0)
    assert np.allclose(step[0], [0.125, 0.5])


def test_step_on_a_hand_computed_weighted_two_array_case():
    # Two arrays, q = 2, L = 0.5, weights p = (1, 3), F = (1, 2):
    # u_a = ([2], [0, 0]) -> dw_a = ([-1], [0, 0]), ||dw_a||^2 = 1
    # u_b = ([0], [1, 1]) -> dw_b = ([0], [-.5, -.5]), ||dw_b||^2 = 0.5
    # Delta_a = 1^2 dw_a = ([-1], [0, 0]); Delta_b = 2^2 dw_b = ([0], [-2, -2])
    # h_a = 2 * 1 * 1 + 0.5 * 1 = 2.5; h_b = 2 * 2 * 0.5 + 0.5 * 4 = 4
    # sum p Delta = ([-1], [-6, -6]); sum p h = 2.5 + 3 * 4 = 14.5
    updates = [[np.array([2.0]), np.zeros(2)], [np.array([0.0]), np.ones(2)]]
    step = qffl_step(updates, [1.0, 2.0], q=2.0, lipschitz=0.5, weights=[1.0, 3.0])
    assert np.allclose(step[0], [1 / 14.5]) and np.allclose(step[1], [6 / 14.5, 6 / 14.5])


@pytest.mark.parametrize("q", [0.0, 0.5, 1.0, 3.0, 20.0])
def test_step_matches_the_formula_for_any_q_and_scale(q):
    # The implementation rescales by (max F)^q; the step must not change.
    rng = np.random.default_rng(int(q * 10))
    updates = [[rng.normal(size=(3, 2)), rng.normal(size=4)] for _ in range(3)]
    losses, weights = [40.0, 55.0, 90.0], [10.0, 25.0, 5.0]
    step = qffl_step(updates, losses, q, 7.0, weights)
    for got, want in zip(step, _reference_step(updates, losses, q, 7.0, weights)):
        assert np.allclose(got, want, rtol=1e-10, atol=0)


def test_q_zero_is_the_weighted_fedavg_step_whatever_the_losses_and_l():
    # q = 0: Delta_k = -L u_k, h_k = L, so the step is sum p_k u_k / sum p_k: FedAvg.
    rng = np.random.default_rng(1)
    updates = [[rng.normal(size=5), rng.normal(size=(2, 2))] for _ in range(3)]
    weights = [10.0, 30.0, 60.0]
    fedavg = [sum(w * u[i] for w, u in zip(weights, updates)) / sum(weights) for i in range(2)]
    for losses, lipschitz in (([1.0, 5.0, 100.0], 200.0), ([3.0, 0.1, 2.0], 0.01)):
        step = qffl_step(updates, losses, 0.0, lipschitz, weights)
        assert all(np.allclose(s, f) for s, f in zip(step, fedavg))


def test_a_site_with_a_larger_loss_gets_more_weight_as_q_grows():
    # Orthogonal updates of equal norm: the step's component along each update is that
    # site's share, p_k F_k^q / sum h (same denominator), so b's share over a's is 3^q.
    u_a, u_b = [np.array([1.0, 0.0])], [np.array([0.0, 1.0])]
    ratios = []
    for q in (0.0, 1.0, 2.0, 5.0):
        step = qffl_step([u_a, u_b], [1.0, 3.0], q, lipschitz=1.0)
        ratios.append(step[0][1] / step[0][0])
        assert ratios[-1] == pytest.approx(3.0**q)
    assert ratios == sorted(ratios) and ratios[0] == pytest.approx(1.0)


def test_bad_inputs_are_refused():
    u = [[np.ones(2)]]
    for losses, q, lipschitz in (([0.0], 1.0, 1.0), ([float("nan")], 1.0, 1.0), ([1.0], -1.0, 1.0), ([1.0], 1.0, 0.0)):
        with pytest.raises(ValueError):
            qffl_step(u, losses, q, lipschitz)
    with pytest.raises(ValueError):
        qffl_step(u, [1.0, 2.0], 1.0, 1.0)


def test_site_losses_take_each_sites_latest_earlier_value():
    val = {
        1: {"a": {"loss": 5.0}, "b": {"loss": 4.0}},
        2: {"a": {"loss": 3.0}, "b": {"loss": float("nan")}, "c": {"other": 1.0}},
        0: {"c": {"loss": 0.0}},  # not a positive loss: unknown
        3: {"a": {"loss": 1.0}},  # the current round's own evaluation is not used
    }
    assert site_losses(["a", "b", "c"], val, 3, "loss") == {"a": 3.0, "b": 4.0}
    assert site_losses(["a"], val, 1, "loss") == {}


# ------------------------------------------------------------------ the strategy's rounds
def _strategy(tmp_path, init, **kw):
    return make_strategy(tmp_path, init, num_sites=3, **kw)


def _evaluated(s, rnd, losses, nodes=None):
    """What the evaluate round hands the strategy: each site's validation loss."""
    results = [
        (
            SimpleNamespace(node_id=nodes[site] if nodes else i),
            EvaluateRes(Status(Code.OK, ""), loss, 5, {"site_id": site, "loss": loss}),
        )
        for i, (site, loss) in enumerate(losses.items())
    ]
    s.aggregate_evaluate(rnd, signed(s, rnd, results, "evaluate"), [])


def test_rounds_use_the_previous_evaluation_and_fall_back_to_fedavg_then_the_mean(tmp_path):
    init = [np.zeros(2, np.float32)]
    s = _strategy(tmp_path, init, aggregation="q-fedavg", qffl_q=2.0, qffl_lipschitz=4.0)
    ups = {
        "a": [np.array([1.0, 0.0], np.float32)],
        "b": [np.array([0.0, 1.0], np.float32)],
        "c": [np.array([1.0, 1.0], np.float32)],
    }
    n = {"a": 10, "b": 30, "c": 20}
    replies = [_reply(site, u, n=n[site], node=i) for i, (site, u) in enumerate(ups.items())]

    # Round 1: no site has a validation loss yet -> the run's FedAvg step (by examples).
    p1 = _round(s, 1, replies, [])
    want1 = sum(n[k] * ups[k][0] for k in ups) / sum(n.values())
    assert np.allclose(p1[0], want1)

    # Round 2: F from round 1's evaluation; c did not evaluate and gets the mean of a and b.
    _evaluated(s, 1, {"a": 2.0, "b": 6.0})
    p2 = _round(s, 2, replies, [])
    losses = [2.0, 6.0, 4.0]
    want2 = _reference_step([ups[k] for k in "abc"], losses, 2.0, 4.0, [n[k] for k in "abc"])
    assert np.allclose(p2[0] - p1[0], want2[0], atol=1e-6)
    assert s.records[2].used == ["a", "b", "c"] and s.records[2].aggregated


def test_the_worse_site_pulls_harder_than_under_fedavg(tmp_path):
    # Two sites with opposite updates; b has the higher validation loss.
    ups = [[np.array([1.0], np.float32)], [np.array([-1.0], np.float32)]]
    moved = {}
    for agg in ("fedavg", "q-fedavg"):
        sub = tmp_path / agg
        sub.mkdir()
        s = _strategy(sub, [np.zeros(1, np.float32)], aggregation=agg, qffl_q=1.0, qffl_lipschitz=0.1)
        _round(s, 1, [_reply("a", ups[0], node=1), _reply("b", ups[1], node=2)], [])
        _evaluated(s, 1, {"a": 1.0, "b": 3.0}, nodes={"a": 1, "b": 2})  # the nodes that trained
        before = s.global_arrays[0].copy()
        moved[agg] = float(
            (_round(s, 2, [_reply("a", ups[0], node=1), _reply("b", ups[1], node=2)], [])[0] - before)[0]
        )
    assert moved["fedavg"] == pytest.approx(0.0) and moved["q-fedavg"] < -0.1  # towards b's update


# ------------------------------------------------------------------ config
@pytest.mark.parametrize(
    "flat, match",
    [
        ({"aggregation": "q-fedavg", "secagg.enabled": True}, "sees only their sum"),
        ({"aggregation": "q-fedavg", "central-dp.enabled": True}, "central-DP"),
        ({"qffl-q": -0.5}, "qffl-q"),
        ({"qffl-lipschitz": -1.0}, "qffl-lipschitz"),
        ({"aggregation": "q-fedavg", "task": "gan"}, "q-fedavg weighs sites by their validation fid"),
    ],
)
def test_config_errors(flat, match):
    with pytest.raises(ConfigError, match=match) as err:
        make_cfg(**flat)
    assert "\n" not in str(err.value)


def test_config_defaults_and_l_from_the_learning_rate():
    cfg = make_cfg(aggregation="q-fedavg")
    assert cfg.federation.qffl_q == 1.0 and cfg.qffl_lipschitz == 0.01
    # 0: the paper's L = 1 / learning rate
    assert make_cfg(
        **{"aggregation": "q-fedavg", "qffl-lipschitz": 0, "train.lr": 0.005}
    ).qffl_lipschitz == pytest.approx(200.0)
    assert make_cfg(**{"aggregation": "q-fedavg", "qffl-lipschitz": 3.0, "qffl-q": 0}).qffl_lipschitz == 3.0
    assert (
        make_cfg(
            aggregation="q-fedavg", task="recsys", **{"data.source": "synthetic", "data.partition": "iid"}
        ).federation.aggregation
        == "q-fedavg"
    )


# ------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_a_short_q_fedavg_run_trains_through_flower(tmp_path):
    from simulations.launcher import simulate

    # The sites run in this process (backend=in-process): the strategy is the server's, and
    # what is checked is what it computes through Flower's messages.
    run_dir = tmp_path / "run"
    before = set(simulation_processes())  # another run in this checkout is not this test's
    simulate(
        "vae-digits-nodp",
        [
            "num-sites=3",
            "rounds=3",
            "vae.hidden-dim=16",
            "vae.latent-dim=2",
            "audit.mia=false",
            "aggregation=q-fedavg",
            "qffl-q=5.0",
            "backend=in-process",
            f"run-dir={run_dir}",
        ],
    )
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in lines] == [1, 2, 3] and all(m["aggregated"] for m in lines)
    assert all(np.isfinite(m["test"]["neg_elbo"]) for m in lines)
    assert lines[-1]["test"]["neg_elbo"] < lines[0]["test"]["neg_elbo"]  # it still learns
    assert all(len(m["site_val"]) == 3 for m in lines)
    assert_no_new_simulation_processes(before)
