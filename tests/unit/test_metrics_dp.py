"""Private metrics (metrics.dp): the noise has the documented std, sites refuse to send un-noised
statistics, each release is its own ledger row that the audit recomputes, the per-record
bounds hold for the tasks' real evaluation sums, and an unaffordable config is refused."""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict

from client.app import SiteClient
from common.errors import ConfigError, PrivfedError
from common.metrics.error_bars import propagate
from common.pipeline import SiteContext, SiteUpdate, build_pipeline
from common.pipeline.stages.eval_sums import EvalSums
from common.pipeline.stages.metrics_dp import MetricsDP
from common.preflight import preflight
from common.privacy.accounting import RoundPlan, epsilon
from common.privacy.metrics_dp import MECHANISM, MetricBounds, NoisyMetrics, metrics_mechanism, release
from common.privacy.secagg_stats import SecureStats
from common.protocol import MalformedReport, MetricsSpend, parse_metrics_spend
from common.tasks.base import get_state
from server.ledger import Ledger, SiteSpend
from server.ledger_audit import audit_rows
from server.replies import metrics_spend
from tests.conftest import declared, make_cfg, tamper

BOUNDS = MetricBounds({"sse": 16.0, "sae": 4.0, "n": 1.0}, touched=3)


# ------------------------------------------------------------------ the mechanism
def test_noise_has_the_documented_std():
    """std on key k is z * sqrt(touched) * b_k; 4000 releases, fixed seed, 5 % tolerance
    (the sample std's relative error is about 1/sqrt(2 * 4000) = 1.1 %, so this fails for a
    wrong scale, e.g. a missing sqrt(touched), never by chance at this seed)."""
    z, rng = 2.0, np.random.default_rng(1234)
    draws = {k: [] for k in BOUNDS.keys}
    for _ in range(4000):
        out = release({"sse": 10.0, "sae": 3.0, "n": 5.0}, BOUNDS, z, rng)
        for k in BOUNDS.keys:
            draws[k].append(out.values[k])
    for k, b in BOUNDS.bounds.items():
        want = z * math.sqrt(3) * b
        assert out.std[k] == pytest.approx(want)
        assert np.std(draws[k]) == pytest.approx(want, rel=0.05)
    sd = z * math.sqrt(3) * 16.0
    assert np.mean(draws["sse"]) == pytest.approx(10.0, abs=4 * sd / math.sqrt(4000))  # unbiased


def test_release_sends_only_the_schema_and_refuses_non_finite_values():
    out = release({"sse": 1.0, "rmse": 0.3, "hits": 2.0}, BOUNDS, 1.0, np.random.default_rng(0))
    assert set(out.values) == {"sse", "sae", "n"} and out.withheld == ("hits", "rmse")
    assert out.reply_fields() == {"metrics_noise_multiplier": 1.0, "metrics_l2_sensitivity": math.sqrt(3)}
    with pytest.raises(PrivfedError, match="'sse' is not finite"):
        release({"sse": float("nan")}, BOUNDS, 1.0, np.random.default_rng(0))


# ------------------------------------------------------------------ the site's stages
def _secure_private_stages():
    sa = make_cfg(**{"secagg.enabled": True}).secagg
    return MetricsDP(BOUNDS, 1.0, in_fit=True), EvalSums(SecureStats(BOUNDS.keys, sa), private=True)


def test_eval_sums_refuses_un_noised_statistics_under_metrics_dp():
    noise, pack = _secure_private_stages()
    ctx = SiteContext(0, 1, evaluate=lambda: {"sse": 5.0, "sae": 2.0, "n": 3.0})
    with pytest.raises(PrivfedError, match="refusing to send un-noised statistics"):
        pack.before_training(ctx)  # the metrics_dp stage did not run: nothing noised
    ctx.metrics_rng = np.random.default_rng(0)
    noise.before_training(ctx)
    pack.before_training(ctx)
    assert isinstance(ctx.release, NoisyMetrics)
    sent = pack.codec.unpack(pack.site(SiteUpdate([], 1), ctx).extras[0])
    assert sent == pytest.approx(ctx.release.values, abs=1e-9) and sent["sse"] != 5.0
    # Over budget: zeros, nothing about the data.
    ctx = SiteContext(0, 1, evaluate=lambda: {"sse": 5.0}, metrics_allowed=False)
    noise.before_training(ctx)
    pack.before_training(ctx)
    assert ctx.release is None and not pack.site(SiteUpdate([], 1), ctx).extras[0].any()


def test_pipeline_noises_the_sums_before_packing_them():
    task = SimpleNamespace(sum_keys=lambda: ("sse", "sae", "n", "hits"), metric_bounds=lambda: BOUNDS)
    names = build_pipeline(make_cfg(**{"secagg.enabled": True, "metrics.dp": True}), task).names
    assert names.index("metrics_dp") + 1 == names.index("eval_sums")
    # The secure schema is exactly the released keys ("hits" is withheld).
    assert build_pipeline(make_cfg(**{"secagg.enabled": True, "metrics.dp": True}), task).get(
        "eval_sums"
    ).codec.keys == ("sse", "sae", "n")
    assert "metrics_dp" not in build_pipeline(make_cfg(**{"secagg.enabled": True}), task).names


def _site(**kw):
    cfg = make_cfg(**{"num-sites": 3, "dp.noise-multiplier": 1.0, "dp.epsilon-budget": 50.0, **kw})
    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    return SiteClient(cfg, 0, "site-0", ctx, declared=declared(cfg, 0))


def test_site_evaluate_reply_carries_only_noisy_sums_and_the_release():
    site = _site(**{"metrics.dp": True, "central-eval": False})
    torch.manual_seed(0)
    model = site.task.build_model()
    params = get_state(model, site.task.shared_keys(model))
    exact = site.task.dp_evaluate(model, site.val_data)
    loss, n, reply = site.evaluate(params, {"server-round": 1})
    bounds = site.task.metric_bounds()
    released = {k for k in reply if k in bounds.bounds}
    assert released == set(bounds.keys) and n == 1  # the exact validation count is not sent
    # Nothing un-noised: no plain metric (neg_elbo, recon_mse, ...) and every sum moved.
    assert not {"neg_elbo", "recon_nll", "kl", "recon_mse"} & set(reply)
    assert all(reply[k] != exact.get(k, 0.0) for k in bounds.keys)
    assert reply["metrics_noise_multiplier"] == 10.0 and math.isfinite(loss)
    # The release is in the site's own spend, composed with its training rounds.
    assert site._metrics_entries() == [(1, 10.0)]
    assert site._spend() == [metrics_mechanism(10.0)]


def test_a_site_that_releases_nothing_sends_no_release_the_server_would_refuse():
    """The GAN under metrics.dp without gan.class-target releases no statistics. Its evaluate
    reply carried release fields of sensitivity 0 anyway, which the server refused as out of
    range, so every GAN evaluate reply of a deployed run failed (found by the deployment test)."""
    site = _site(task="gan", **{"metrics.dp": True, "central-eval": False, "gan.features": 64})
    model = site.task.build_model()
    _, _, reply = site.evaluate(get_state(model, site.task.shared_keys(model)), {"server-round": 1})
    assert not any(k.startswith("metrics_") for k in reply)
    assert parse_metrics_spend(reply) is None and site._metrics_entries() == []


def test_a_plain_fit_releases_and_charges_nothing():
    """Without secure sums only the evaluate reply releases statistics (one row per round)."""
    site = _site(**{"metrics.dp": True})
    model = site.task.build_model()
    _, _, metrics = site.fit(get_state(model, site.task.shared_keys(model)), {"server-round": 1})
    assert not any(k.startswith("metrics_") for k in metrics) and site._metrics_entries() == []


def test_site_without_budget_for_the_release_sends_nothing():
    site = _site(**{"metrics.dp": True, "metrics.noise-multiplier": 20.0})
    # A budget the config itself would refuse: the site's own check is the one under test.
    site.cfg = dataclasses.replace(site.cfg, dp=dataclasses.replace(site.cfg.dp, epsilon_budget=0.1))
    model = site.task.build_model()
    loss, _, reply = site.evaluate(get_state(model, site.task.shared_keys(model)), {"server-round": 1})
    assert math.isnan(loss) and set(reply) == {"site_id", "history"}


# ------------------------------------------------------------------ the ledger and the audit
def test_metrics_rows_are_their_own_mechanism_composed_and_recomputed(tmp_path):
    path = tmp_path / "ledger.sqlite"
    ledger = Ledger(path, "run")
    plan = RoundPlan(100, 0.32, 4, 1.1, 1.0, 1e-5, "rdp")
    sgd = SiteSpend("site-0", "image", plan, 4, 10.0, True, "trained", "os")
    rel = metrics_spend("site-0", MetricsSpend(10.0, math.sqrt(7), 1e-5, "os"), 10.0, "rdp")
    ledger.record_round(1, [sgd, rel])  # one round, two rows: UNIQUE(round, site, mechanism)
    ledger.record_round(2, [sgd])
    rows = ledger.rows()
    assert [r.mechanism for r in rows] == ["dp-sgd", MECHANISM, "dp-sgd"]
    m = rows[1]
    assert (m.unit, m.sample_rate, m.steps, m.noise_multiplier) == ("one validation example", 1.0, 1, 10.0)
    assert m.eps_round == pytest.approx(epsilon([metrics_mechanism(10.0)], 1e-5, "rdp"))
    # Composed with the site's DP-SGD rows, in ledger order.
    both = [(1.1, 0.32, 4), metrics_mechanism(10.0), (1.1, 0.32, 4)]
    assert rows[2].eps_total == epsilon(both, 1e-5, "rdp") > epsilon([both[0], both[2]], 1e-5, "rdp")
    assert ledger.rounds("site-0") == {1, 2} and ledger.last_row("site-0").mechanism == "dp-sgd"
    assert ledger.verify().ok
    assert audit_rows(rows)[1]["mechanism"] == MECHANISM
    ledger.close()
    # The audit recomputes the metrics row too: a forged eps on it is caught.
    tamper(path, "UPDATE ledger SET eps_round = 0.001 WHERE mechanism = 'gaussian-metrics'")
    check = Ledger(path).verify()
    assert not check.ok and check.first_bad_seq == 2


def test_server_ledgers_an_evaluate_release(tmp_path):
    from tests.conftest import make_strategy

    s = make_strategy(tmp_path, [np.zeros(3, np.float32)], accountant="rdp")
    fields = {
        "metrics_noise_multiplier": 10.0,
        "metrics_l2_sensitivity": 2.0,
        "metrics_delta": 1e-5,
        "metrics_rng": "os",
    }
    rec = s.record(1)
    s.ledger_evaluation_release(1, {"site_id": "site-0", **fields, "eps_budget": 10.0}, rec)
    s.ledger_evaluation_release(1, {"site_id": "site-1"}, rec)  # no release: no row
    assert [(r.site_id, r.mechanism, r.noise_multiplier) for r in rec.ledger_rows] == [("site-0", MECHANISM, 10.0)]
    s.ledger_evaluation_release(2, {"site_id": "site-0", **fields, "metrics_noise_multiplier": 0.0}, rec)
    assert "out of range" in rec.failures[-1]
    # The ledger's rng column comes from the release; a reply that does not say which is refused.
    s.ledger_evaluation_release(3, {"site_id": "site-0", **fields, "metrics_rng": "guess"}, rec)
    assert "metrics_rng" in rec.failures[-1]


def test_reply_fields_are_validated():
    assert parse_metrics_spend({"site_id": "a"}) is None
    with pytest.raises(MalformedReport, match="metrics_delta"):
        parse_metrics_spend({"metrics_noise_multiplier": 5.0, "metrics_l2_sensitivity": 1.0})


# ------------------------------------------------------------------ sensitivity of the real sums
def _max_change(task, model, data, drop):
    keep = torch.as_tensor(np.arange(len(data)) != drop)
    full = task.dp_evaluate(model, data)
    less = task.dp_evaluate(model, dataclasses.replace(data, x=data.x[keep], y=data.y[keep]))
    bounds = task.metric_bounds()
    diff = {k: abs(full.get(k, 0.0) - less.get(k, 0.0)) for k in bounds.keys}
    return diff, bounds


def test_vae_one_image_moves_each_sum_within_its_bound_and_few_keys():
    site = _site(**{"metrics.dp": True, "metrics.loss-bound": 30.0})
    torch.manual_seed(0)
    model = site.task.build_model()
    for drop in range(min(5, len(site.val_data))):
        diff, bounds = _max_change(site.task, model, site.val_data, drop)
        assert all(diff[k] <= bounds.bounds[k] + 1e-6 for k in bounds.keys)
        assert sum(d > 1e-9 for d in diff.values()) <= bounds.touched


@pytest.mark.parametrize("error_bound", [0.0, 0.5])
def test_recsys_one_held_out_rating_moves_each_sum_within_its_bound_and_few_keys(error_bound):
    from tests.unit.test_recsys import recsys_task

    task = recsys_task(**{"metrics.dp": True, "metrics.loss-bound": error_bound})
    _, held = task.site_data(0)
    torch.manual_seed(0)
    model = task.build_model(0)
    bounds = task.metric_bounds()
    assert bounds.touched == 14 and not {"hits", "dcg", "pop_at_k_sum"} & set(bounds.keys)
    assert bounds.bounds["sae"] == (error_bound or 4.0)
    users = held.x[:, 0].numpy()
    # A user's only held-out rating (n_ranked and users move too), and one of many.
    counts = np.bincount(users)
    drops = [int(np.flatnonzero(counts[users] == counts[users].min())[0]), int(np.argmax(counts[users]))]
    for drop in drops:
        diff, _ = _max_change(task, model, held, drop)
        assert all(diff[k] <= bounds.bounds[k] + 1e-9 for k in bounds.keys), drop
        assert 0 < sum(d > 1e-12 for d in diff.values()) <= bounds.touched


# ------------------------------------------------------------------ error bars
def test_error_bars_follow_the_delta_method():
    sums, std = {"sse": 400.0, "n": 500.0}, {"sse": 30.0, "n": 10.0}

    def rmse(s):
        return {"rmse": math.sqrt(s["sse"] / s["n"])}

    r = math.sqrt(400 / 500)
    want = math.sqrt((30 / (2 * r * 500)) ** 2 + (r / (2 * 500) * 10) ** 2)
    assert propagate(rmse, sums, std)["rmse"] == pytest.approx(want, rel=1e-4)


# ------------------------------------------------------------------ config refusals
def test_unaffordable_metrics_noise_is_refused_before_the_run():
    with pytest.raises(ConfigError, match=r"^config key 'metrics.noise-multiplier': .*dp.epsilon-budget") as exc:
        make_cfg(**{"metrics.dp": True, "metrics.noise-multiplier": 0.5, "rounds": 10})
    assert "\n" not in str(exc.value)
    with pytest.raises(ConfigError, match=r"^config key 'metrics.dp': needs dp.enabled"):
        make_cfg(**{"metrics.dp": True, "dp.enabled": False})
    # Affordable alone but not with the planned DP-SGD spend: refused by the preflight.
    # Two sites, not the default eight: the preflight searches each site's noise multiplier
    # (about a second each) and the refusal and the acceptance are per site.
    cfg = make_cfg(**{"metrics.dp": True, "num-sites": 2, "dp.target-epsilon": 9.9, "dp.epsilon-budget": 10.0})
    with pytest.raises(ConfigError, match=r"^config key 'metrics.noise-multiplier': .*compose to eps="):
        preflight(cfg)
    preflight(make_cfg(**{"metrics.dp": True, "num-sites": 2, "dp.target-epsilon": 8.0, "dp.epsilon-budget": 10.0}))
