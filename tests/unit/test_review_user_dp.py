"""Hostile review of user-level DP (issue 21, commits eabcbd3 and 3d117ed).

Each test is an attack on the claim "under dp.unit = user each site's released update (and
evaluation sums) is (eps, delta)-DP for add/remove of one person, the coordinator cannot
weaken it, and a malicious site cannot crash the server". Every test here FAILS on the
reviewed code; the failure message says what breaks.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict

from common.privacy.accounting import RoundPlan, epsilon
from common.privacy.engines import FastDPStep
from common.privacy.engines.rules import PersonGroups
from common.tasks import get_task
from common.tasks.base import get_state
from tests.conftest import declared, make_cfg, make_strategy
from tests.unit.test_recsys import KEY, SMALL

USER = {**SMALL, "dp.unit": "user", "dp.noise-multiplier": 1.0}


# ------------------------------------------------------------------ 1. exact evaluation sums
def test_user_level_with_exact_metrics_is_refused_because_the_sums_reveal_the_person():
    """Under record-level DP the exact evaluation sums were argued safe: held-out ratings are
    never trained on, so they are other records than the ones epsilon protects. Under
    dp.unit = user that argument is gone: a person's held-out ratings are that person's data,
    and the exact sums move deterministically with them (n_ranked by exactly 1, sse and the
    group counts too). The ledger still claims eps per user. The config accepts it (and the
    simulation launcher turns metrics.dp off by default)."""
    # Task.evaluate is what a site releases when metrics.dp = false (the launcher's default).
    task = get_task("recsys")(make_cfg(**{**USER, "metrics.dp": True}), KEY)
    held = task.site_data(0)[1]
    torch.manual_seed(0)
    model = task.build_model(0)
    victim = int(held.person[0])
    keep = held.person != victim
    without = type(held)(
        held.x[keep],
        held.y[keep],
        held.person[keep],
        num_users=held.num_users,
        attrs=held.attrs,
        catalogue=held.catalogue,
        collision_rate=held.collision_rate,
    )
    with_v, without_v = task.evaluate(model, held), task.evaluate(model, without)
    # The released (exact) sums tell whether the victim is in the data: no noise at all.
    assert with_v["n_ranked"] - without_v["n_ranked"] == 1.0
    assert with_v["n_ratings"] > without_v["n_ratings"]
    # So a deployed site must not release them exactly: it refuses the combination before any
    # data is read, whatever its allow-exact-metrics says. (The simulation launcher's virtual
    # sites may, and the report then says "metrics: not private".)
    from common.deploy.site_config import PolicyRefusal, refuse_exact_metrics

    cfg = make_cfg(**USER)  # metrics.dp = false, as the simulation launcher sets it
    with pytest.raises(PolicyRefusal) as err:
        refuse_exact_metrics(cfg, {"allow-exact-metrics": True})
    assert err.value.key == "metrics.dp"
    refuse_exact_metrics(cfg, {}, virtual_site=True)  # simulation: declared not private in the report


# ------------------------------------------------------------------ 2. lifetime budget units
def _site(tmp_path, **kw):
    from client.app import SiteClient

    cfg = make_cfg(**{**USER, "train.batch-size": 4, "train.local-epochs": 0.5, **kw})
    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    site = SiteClient(cfg, 0, "site-0", ctx, KEY, state_dir=str(tmp_path / "state"), declared=declared(cfg, 0, KEY))
    model = site.task.build_model()
    return site, get_state(model, site.task.shared_keys(model))


def test_the_lifetime_budget_does_not_count_rating_level_rounds_as_if_they_protected_a_person(tmp_path):
    """The site's lifetime history (client.state.Lifetime) has no unit. A dataset trained on
    at rating level in one run, then at user level in the next, is charged the rating-level
    round's epsilon at face value in the user-level budget. For a person with m ratings that
    round cost up to about m times more (group privacy): the user-level lifetime epsilon is
    understated, and the site trains past its per-person budget."""
    rating_site, params = _site(tmp_path, **{"dp.unit": "record", "dp.epsilon-budget": 50.0})
    _, _, m1 = rating_site.fit(params, {"server-round": 1, "run-id": "run-rating"})
    assert m1["status"] == "trained" and m1["unit"] == "rating"
    rating_round = rating_site._history()
    # The user-level run's own round, and a budget that holds only if the rating-level round
    # counted for a person what it counted for one rating.
    user_site, params = _site(tmp_path, **{"dp.epsilon-budget": 50.0})
    from common.privacy.plan import plan_round

    plan = plan_round(user_site.cfg, user_site.declared)
    face_value = epsilon(rating_round + [plan.mechanism], plan.delta, "rdp")
    user_only = epsilon([plan.mechanism], plan.delta, "rdp")
    assert face_value > user_only  # the rating-level round is in the composition...
    budget = face_value * 1.02
    user_site, params = _site(tmp_path, **{"dp.epsilon-budget": budget})
    # ...but only at face value. Every person here has many training ratings, so the rating-level
    # round alone is worth far more than its rating-level epsilon per person: the site refuses
    # to switch the dataset's unit, before training, and its history keeps only the first unit.
    from common.deploy.site_config import PolicyRefusal

    assert int(torch.bincount(user_site.train_data.person).min()) >= 5
    with pytest.raises(PolicyRefusal) as err:
        user_site.fit(params, {"server-round": 1, "run-id": "run-user"})
    assert err.value.key == "dp.unit"
    assert {e.unit for e in user_site.lifetime.load()} == {"record"}


# ------------------------------------------------------------------ 3. Gram norms can go negative
def test_a_person_whose_gradients_cancel_does_not_turn_the_update_into_nan():
    """LinearRule's per-person norm is sum_{i,j}(g_i.g_j)(a_i.a_j), computed in float32. When a
    person's per-example gradients (nearly) cancel, rounding makes it negative, sqrt gives
    NaN, the clip factor is NaN and every parameter's clipped sum becomes NaN: one person's
    data wrecks the step (and the site-local tables for good). Per-example clipping
    (|g|^2 (|a|^2 + 1)) can never be negative. Seen here on a Linear-only model (the MLP of
    recsys.model = neural, or the tabular task that will share this engine)."""
    g0 = torch.Generator().manual_seed(0)
    k = 5  # one person, five records with the same input (e.g. same user, same item bucket)
    a = (torch.randn(1, 4, generator=g0) * 10).repeat(k, 1)
    w = torch.randn(k, generator=g0)
    w[-1] = -w[:-1].sum()  # their losses' gradients cancel (up to rounding)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 1))
    eng = FastDPStep(model, torch.optim.SGD(model.parameters(), lr=0.0), RoundPlan(1, 1.0, 1, 0.0, 1.0, 1e-5, "rdp"))
    eng.clipped_grad_sum(model(a).squeeze(1) * w, PersonGroups.from_sorted(torch.zeros(k, dtype=torch.long), 1))
    grads = [p.grad for p in model.parameters()]
    eng.close()
    assert all(bool(torch.isfinite(g).all()) for g in grads), "per-person Gram norm < 0 -> NaN clip factor"


# ------------------------------------------------------------------ 4. the report denies user-level
def _user_run_dir(tmp_path, unit="user"):
    from server.ledger import Ledger, SiteSpend

    run = tmp_path / "run"
    run.mkdir(parents=True)
    led = Ledger(run / "ledger.sqlite", run_id="run")
    with (run / "metrics.jsonl").open("w") as fh:
        for r in (1, 2):
            spends = [
                SiteSpend(site, unit, RoundPlan(60, 0.1, 10, sigma, 1.0, 1e-5, "rdp"), 10, 8.0, True, "trained", "os")
                for site, sigma in (("site-0", 1.0), ("site-1", 2.0))
            ]
            led.record_round(r, spends)
            fh.write(json.dumps({"round": r, "ledger_head": led.head(), "primary_metric": "rmse"}) + "\n")
    led.close()
    return run


def test_the_report_of_a_user_level_run_does_not_say_it_is_not_user_level(tmp_path):
    """The HTML report of a dp.unit = user run reads 'unit of privacy: one user ... Not
    user-level or site-level privacy.' (server/html_report.py), and the markdown report
    'It says nothing about user-level ... privacy' for 'neighbouring datasets that differ by
    one added or removed example' (server/report.py): the one document an auditor reads
    contradicts the guarantee the run was configured for."""
    from simulations.cli import main as cli

    run = _user_run_dir(tmp_path)
    assert cli(["report", str(run)]) == 0
    page = (run / "report.html").read_text()
    assert "one user" in page
    assert "Not user-level" not in page


def test_max_sites_per_person_reaches_the_report(tmp_path):
    """federation.max-sites-per-person is validated and then read by nothing: the issue's
    'the report shows the per-person worst case' over that many sites is not there. A person
    at k sites is protected at the composition of k sites' epsilons, not at one site's."""
    from simulations.cli import main as cli

    run = _user_run_dir(tmp_path)
    (run / "config.toml").write_text('task = "recsys"\nmax-sites-per-person = 2\n[dp]\nunit = "user"\n')
    assert cli(["report", str(run)]) == 0
    page = (run / "report.html").read_text()
    page = page.split("<h2>Configuration</h2>")[0].lower()  # not the embedded config.toml itself
    assert "per person" in page or "max-sites-per-person" in page or "sites per person" in page


# ------------------------------------------------------------------ 5. the privacy argument
def test_privacy_doc_states_the_user_level_argument():
    """The schema (dp.unit, max-sites-per-person) points to docs/PRIVACY.md, 'User-level DP'
    and 'The same person at several sites'; neither section exists, and PRIVACY.md still says
    user-level DP 'would need per-user clipping (sampling users, not ratings)'."""
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "PRIVACY.md").read_text()
    assert "User-level DP" in doc and "The same person at several sites" in doc
    assert "would need per-user clipping" not in doc


# ------------------------------------------------------------------ 6. the server takes any unit
def test_the_server_refuses_a_reply_whose_unit_is_not_the_runs(tmp_path):
    """The server ledgers whatever unit a site's reply names: in a record-level run a site can
    write 'user' rows (and a user-level run 'rating' rows), and its epsilons of two units are
    composed as one. The ledger, the report and `site verify` then state a unit the run did
    not train under."""
    from tests.unit.test_server_client import _reply, _round

    s = make_strategy(tmp_path, [np.zeros(3, np.float32)], accountant="rdp")
    vec = [np.full(3, 0.1, np.float32)]
    _round(s, 1, [_reply("honest", vec), _reply("liar", vec, unit="user")], [])
    units = {r.site_id: r.unit for r in s.ledger.rows()}
    assert units["honest"] == "image"
    assert units.get("liar") in (None, "image") or "liar" in s.records[1].rejected, units


# ------------------------------------------------------------------ 7. metrics rows' unit
def test_a_user_level_runs_metrics_releases_are_not_labelled_per_validation_example(tmp_path):
    """Under dp.unit = user the noisy metrics release is calibrated per user (bounds times
    dp.max-records-per-user) and composed with user-level DP-SGD rows, but its ledger row
    (server.replies.metrics_spend) and the report name the fixed unit 'one validation
    example' (common.privacy.metrics_dp.UNIT): the ledger states a weaker guarantee than the
    one given, and an auditor cannot tell which relation the composed epsilon is for."""
    from common.protocol import MetricsSpend
    from server.ledger import Ledger
    from server.replies import metrics_spend
    from simulations.cli import main as cli

    task = get_task("recsys")(make_cfg(**{**USER, "metrics.dp": True}), KEY)
    release = MetricsSpend(10.0, task.metric_bounds().l2_sensitivity, 1e-5, "os")
    run = _user_run_dir(tmp_path)
    led = Ledger(run / "ledger.sqlite", run_id="run")
    led.record_round(3, [metrics_spend("site-0", release, 8.0, "rdp", dp_unit="user")])  # as the server calls it
    with (run / "metrics.jsonl").open("a") as fh:
        fh.write(json.dumps({"round": 3, "ledger_head": led.head(), "primary_metric": "rmse"}) + "\n")
    rows = led.rows()
    led.close()
    assert cli(["report", str(run)]) == 0
    page = (run / "report.html").read_text().split("<h2>Configuration</h2>")[0]
    labels = {r.unit for r in rows}
    assert "one validation example" not in labels and "one validation example" not in page, labels
