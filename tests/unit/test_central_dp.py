"""Client-level DP (DP-FedAvg): clipping, noise, Poisson site sampling, accounting, budget."""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.common import ndarrays_to_parameters

from common.errors import ConfigError
from common.identifiers import CENTRAL_SITE_ID
from common.pipeline import Aggregate, ServerContext
from common.pipeline.stages.client_level_dp import ClientLevelDP
from common.privacy.accounting import RoundPlan, epsilon
from common.privacy.client_level import (
    all_or_nothing_probability,
    central_plan,
    clip_update,
    secure_clip_norm,
    update_norm,
)
from common.protocol import Status as SiteStatus
from common.seeds import RNG_SEEDED
from server.client_level_dp import CentralRelease
from server.ledger import Ledger
from tests.conftest import make_cfg, make_strategy
from tests.unit.test_server_client import _reply, _round

PLAN = RoundPlan(
    dataset_size=40, sample_rate=0.25, steps=1, noise_multiplier=1.5, max_grad_norm=0.5, delta=1e-5, accountant="rdp"
)


def test_clip_update_bounds_the_global_norm_and_keeps_direction():
    u = [np.array([3.0, 0.0], np.float32), np.array([[4.0]], np.float32)]  # norm 5
    c = clip_update(u, 1.0)
    assert update_norm(c) == pytest.approx(1.0, rel=1e-6)
    assert np.allclose(c[0], [0.6, 0.0]) and np.allclose(c[1], [[0.8]]) and c[0].dtype == np.float32
    assert clip_update(u, 10.0) is u  # inside the ball: untouched


def _central(tmp_path, budget=float("inf"), plan=PLAN, seed=0):
    return CentralRelease(plan, budget, np.random.default_rng(seed), RNG_SEEDED), Ledger(
        tmp_path / "l.sqlite", run_id="t"
    )


def _release(central, rnd, total, ledger, *, empty):
    """The strategy's end_fit path: ledger the round's mechanism, then the pipeline's client-level DP release."""
    row = central.ledger_row(rnd, ledger, empty=empty)
    ctx = ServerContext(rnd, [np.zeros_like(t) for t in total], central=central)
    step = ClientLevelDP(central.clip_norm, make_cfg().secagg).release(Aggregate(total), ctx).arrays
    return step, row


def test_release_adds_noise_of_the_stated_scale_and_ledgers_the_site_unit(tmp_path):
    central, ledger = _central(tmp_path)
    total = [np.zeros(200_000, np.float32)]
    step, row = _release(central, 1, total, ledger, empty=False)
    # (sum + N(0, (z C)^2)) / (q N): std z C / (q N) = 1.5 * 0.5 / 10
    assert np.std(step[0]) == pytest.approx(0.075, rel=0.01) and abs(np.mean(step[0])) < 1e-3
    assert (row.site_id, row.unit, row.status, row.steps) == (CENTRAL_SITE_ID, "site", "released", 1)
    for rnd in (2, 3):
        _, row = _release(central, rnd, total, ledger, empty=rnd == 3)
    assert row.status == "noise_only" and not row.used
    assert row.eps_total == epsilon([PLAN.mechanism] * 3, PLAN.delta, "rdp")
    assert ledger.verify().ok


def test_budget_stops_releases(tmp_path):
    one = epsilon([PLAN.mechanism], PLAN.delta, "rdp")
    two = epsilon([PLAN.mechanism] * 2, PLAN.delta, "rdp")
    central, ledger = _central(tmp_path, budget=(one + two) / 2)
    assert central.can_release(ledger)
    _release(central, 1, [np.zeros(3)], ledger, empty=False)
    assert not central.can_release(ledger)


def test_central_plan_from_config_and_target_epsilon():
    cfg = make_cfg(
        **{
            "num-sites": 50,
            "fraction-fit": 0.2,
            "rounds": 20,
            "central-dp.enabled": True,
            "central-dp.target-epsilon": 4.0,
        }
    )
    plan = central_plan(cfg)
    assert (plan.dataset_size, plan.sample_rate, plan.steps, plan.delta) == (50, 0.2, 1, 1e-5)
    assert 3.9 < epsilon([plan.mechanism] * 20, plan.delta, "rdp") <= 4.0
    with pytest.raises(ConfigError, match="central-dp.target-epsilon"):
        make_cfg(**{"central-dp.enabled": True, "central-dp.target-epsilon": 5.0, "central-dp.epsilon-budget": 4.0})


class _Clients:
    def __init__(self, n):
        self.proxies = {str(i): SimpleNamespace(cid=str(i), node_id=i) for i in range(n)}

    def all(self):
        return self.proxies


def _cdp_strategy(tmp_path, central, q=0.25, secure=False):
    return make_strategy(
        init=[np.zeros(3, np.float32)],
        ledger=Ledger(tmp_path / "s.sqlite", run_id="s"),
        num_sites=40,
        uniform=True,
        secure=secure,
        central=central,
        poisson_rng=random.Random(1),
        fraction_fit=q,
    )


def test_poisson_site_sampling_has_the_accounted_rate(tmp_path):
    central, _ = _central(tmp_path)
    s = _cdp_strategy(tmp_path, central)
    counts = [len(s.configure_fit(rnd, None, _Clients(40))) for rnd in range(1, 401)]
    # Binomial(40, 0.25): mean 10, sd 2.74; not a fixed count
    assert 9.7 < np.mean(counts) < 10.3 and 2.3 < np.std(counts) < 3.2


def test_central_round_clips_rejects_and_noises(tmp_path):
    plan = RoundPlan(40, 0.25, 1, 1.0, 1.0, 1e-5, "rdp")
    central, _ = _central(tmp_path, plan=plan)
    s = _cdp_strategy(tmp_path, central)
    s.configure_fit(1, None, _Clients(40))
    inside = [np.array([0.6, 0.0, 0.0], np.float32)]
    outside = [np.array([3.0, 0.0, 0.0], np.float32)]
    new = _round(s, 1, [_reply("a", inside), _reply("b", outside, node=2)], [])
    assert "exceeds central-dp.clip-norm=1" in s.records[1].rejected["b"]
    rows = {r.site_id: r for r in s.ledger.rows()}
    assert rows["b"].status == "rejected" and rows[CENTRAL_SITE_ID].status == "released"
    # noise std 1/(qN) = 0.1 per coordinate around 0.6/10
    assert np.all(np.abs(new[0] - np.array([0.06, 0, 0])) < 0.5)
    assert not np.allclose(new[0], [0.06, 0, 0])  # the noise is there


def test_a_round_nobody_joins_still_releases_noise(tmp_path):
    central, _ = _central(tmp_path)
    s = _cdp_strategy(tmp_path, central)
    s.configure_fit(1, None, _Clients(0))
    new = s.end_fit(1)
    # Releasing the unchanged model would reveal that nobody took part.
    assert new is not None and not np.allclose(new[0], 0.0)
    assert [r.status for r in s.ledger.rows()] == ["noise_only"]


def test_secure_round_with_a_rejected_report_discards_the_sum(tmp_path):
    s = _cdp_strategy(tmp_path, None, secure=True)
    mean = [np.full(3, 0.5, np.float32)]
    replies = [_reply("a", mean), _reply("b", mean, node=2, accountant="prv"), _reply("c", mean, node=3)]
    s.accountant = "rdp"
    assert _round(s, 1, replies, []) is None
    assert "secure sum discarded" in s.records[1].failures[-1]
    assert {r.site_id: r.status for r in s.ledger.rows()} == {
        "a": "not_aggregated",
        "b": "rejected",
        "c": "not_aggregated",
    }
    # A clean secure round: the replies carry the mean over all 3; the sum is divided by the trained count.
    new = _round(s, 2, [_reply("a", mean), _reply("b", mean, node=2), _reply("c", mean, node=3)], [])
    assert np.allclose(new[0], 0.5)


def test_secure_sum_counts_zero_replies_but_divides_by_trained_sites(tmp_path):
    s = _cdp_strategy(tmp_path, None, secure=True)
    z = [np.zeros(3, np.float32)]
    # Flower's mean over 4 masked replies (one out-of-budget site sent zeros): sum = 3 * 0.8
    mean = [np.full(3, 0.6, np.float32)]
    replies = [_reply(x, mean, node=i) for i, x in enumerate("abc")]
    replies.append(_reply("d", z, node=9, status=SiteStatus.BUDGET_EXHAUSTED))
    for _, res in replies:
        res.parameters = ndarrays_to_parameters(mean)
    assert np.allclose(_round(s, 1, replies, []), 0.8)
    # Two trained sites (plus zeros) are never enough for a secure sum.
    assert _round(s, 2, replies[:2] + replies[3:], []) is None
    assert "below 3" in s.records[2].failures[-1]


def test_all_or_nothing_probability_is_the_binomial_flip_event():
    # 6 sites, q = 0.5, a secure round needs 3: one site flips the round when exactly 2 of
    # the other 5 are sampled: C(5,2)/32 = 0.3125 per round.
    cfg = make_cfg(**{"num-sites": 6, "fraction-fit": 0.5, "rounds": 2, "secagg.enabled": True})
    assert all_or_nothing_probability(cfg) == pytest.approx(0.625)
    assert (
        all_or_nothing_probability(make_cfg(**{"num-sites": 5, "fraction-fit": 0.5})) == 0.0
    )  # m = 1: noise-only rounds
    with pytest.raises(ConfigError, match="one site decides"):
        make_cfg(**{"num-sites": 6, "fraction-fit": 0.5, "secagg.enabled": True, "central-dp.enabled": True})


def test_clip_bound_leaves_room_for_secagg_rounding():
    sa = make_cfg(**{"secagg.enabled": True}).secagg
    update = [np.zeros(10_000, np.float32)]
    assert secure_clip_norm(1.0, sa, update) == pytest.approx(1.0 - sa.step * 100)
    assert secure_clip_norm(1.0, make_cfg().secagg, update) == 1.0
    with pytest.raises(ValueError, match="rounding error"):
        secure_clip_norm(1e-6, sa, update)


def test_secure_sum_of_the_wrong_shape_is_discarded(tmp_path):
    s = _cdp_strategy(tmp_path, None, secure=True)
    bad = [np.zeros(4, np.float64)]
    replies = [_reply(x, bad, node=i) for i, x in enumerate("abc")]
    assert _round(s, 1, replies, []) is None
    assert "do not match the model's shapes" in s.records[1].failures[-1]


# ------------------------------------------- delta0 under the failures the config allows
def test_the_issues_dropout_config_is_refused_before_anything_starts(tmp_path, capsys):
    """Issue 18, finding 4: with sites 1 and 2 of 5 dropping, every round's release hinged on
    each survivor (3 updates or noise only), yet delta0 was reported as 0."""
    from simulations.cli import main as cli_main

    run_dir = tmp_path / "run"
    code = cli_main(["simulate", "recsys-movielens-secure-cdp", 'faults.dropout-sites="1,2"', f"run-dir={run_dir}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "Traceback" not in err
    assert "faults.dropout-sites" in err and "central-dp" in err and "secagg.enabled" in err
    assert not run_dir.exists()


@pytest.mark.parametrize(
    "fault, key",
    [
        ({"faults.dropout-rate": 0.1}, "faults.dropout-rate"),
        ({"faults.crash-rate": 0.05}, "faults.crash-rate"),
        (
            {"faults.delay-rate": 0.2, "faults.delay-seconds": 1.0, "round-timeout": 30.0},
            "faults.delay-rate",
        ),
    ],
)
def test_failures_no_count_bounds_are_refused_with_all_or_nothing_rounds(fault, key):
    base = {"num-sites": 200, "fraction-fit": 0.5, "central-dp.enabled": True, "dp.enabled": False}
    with pytest.raises(ConfigError, match=f"config key '{key}': lets any number"):
        make_cfg(**{**base, "secagg.enabled": True, **fault})
    with pytest.raises(ConfigError, match=key):
        make_cfg(**{**base, "min-fit-sites": 2, **fault})
    make_cfg(**{**base, **fault})  # m = 1: an empty round releases noise too, nobody decides anything
    make_cfg(**{**base, "secagg.enabled": True})  # without the fault, delta0 is negligible here


def test_delta0_counts_every_sample_the_allowed_failures_can_bring_to_the_edge():
    import math

    def mass(n, q, lo, hi):
        return sum(math.comb(n, k) * q**k * (1 - q) ** (n - k) for k in range(lo, hi + 1))

    flat = {"num-sites": 10, "fraction-fit": 0.5, "rounds": 3, "secagg.enabled": True}
    clean = all_or_nothing_probability(make_cfg(**flat))
    assert clean == pytest.approx(3 * mass(9, 0.5, 2, 2))
    # One named site may drop, in round 2 only: that round counts samples of 2 .. 3 others
    # (a secure round with 4 sampled and one dropping can also fall below its threshold).
    one = make_cfg(**{**flat, "faults.dropout-sites": "4", "faults.rounds": "2"})
    assert all_or_nothing_probability(one) == pytest.approx(2 * mass(9, 0.5, 2, 2) + mass(9, 0.5, 2, 3))
    assert all_or_nothing_probability(make_cfg(**{**flat, "faults.dropout-sites": "4"})) == pytest.approx(
        3 * mass(9, 0.5, 2, 3)
    )
    # A site index outside the federation never drops: no extra window.
    assert all_or_nothing_probability(make_cfg(**{**flat, "faults.dropout-sites": "99"})) == pytest.approx(clean)
    assert all_or_nothing_probability(make_cfg(**{**flat, "faults.crash-rate": 0.1})) == 1.0


def test_a_sample_level_budget_that_can_run_out_mid_run_is_refused_with_central_dp():
    flat = {"num-sites": 200, "fraction-fit": 0.5, "central-dp.enabled": True, "secagg.enabled": True}
    with pytest.raises(ConfigError, match="config key 'dp.target-epsilon': is 0.*dp.epsilon-budget runs out"):
        make_cfg(**flat)  # sample-level DP-SGD on, its spend per site unknown until the data is
    make_cfg(**{**flat, "dp.target-epsilon": 5.0, "dp.epsilon-budget": 5.0})  # spends exactly the planned target
    make_cfg(**{**flat, "dp.enabled": False})
    make_cfg(**{"num-sites": 200, "fraction-fit": 0.5, "central-dp.enabled": True})  # m = 1: nothing to decide
