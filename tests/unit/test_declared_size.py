"""The declared public size n-hat: the only size a site's releases depend on (issue 18, finding 2).

Add/remove-one DP-SGD is honest only if nothing a site sends depends on its real number of
records n. So q, steps, sigma, delta, the update's weight and the evaluation weight all derive
from n-hat, a constant declared before the run, and no timing is sent.
"""

from __future__ import annotations

import pytest
from flwr.app import Context, RecordDict

from client.app import SiteClient, make_site
from common.data.arrays import ArrayData
from common.deploy.site_config import DECLARED_SIZE, SiteConfig, declared_size
from common.errors import ConfigError
from common.privacy.plan import check_real_size, plan_round
from common.tasks.base import get_state
from tests.conftest import make_cfg
from tests.site_keys import site_keys

CFG = {"num-sites": 3, "dp.epsilon-budget": 50.0, "train.local-epochs": 0.5}
NHAT = 150  # declared; the real training splits of these sites are other sizes


def _site(real: int | None, declared: int = NHAT, **kw) -> SiteClient:
    cfg = make_cfg(**{**CFG, **kw})
    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    site = SiteClient(cfg, 0, "site-0", ctx, declared=declared)
    if real is not None:  # the same site with fewer real records
        site.train_data = ArrayData(site.train_data.x[:real], site.train_data.y[:real])
        site.val_data = ArrayData(site.val_data.x[: real // 5], site.val_data.y[: real // 5])
    return site


def _params(site: SiteClient):
    model = site.task.build_model()
    return get_state(model, site.task.shared_keys(model))


@pytest.mark.parametrize(
    "kw", [{"dp.noise-multiplier": 1.0}, {"dp.target-epsilon": 4.0}], ids=["sigma", "target-epsilon"]
)
def test_the_plan_and_the_reply_do_not_depend_on_the_real_size(kw):
    """Two real sizes, one n-hat: q, steps, sigma, delta, weight and every reply field identical."""
    replies = []
    for real in (None, 97):
        site = _site(real, **kw)
        _, weight, metrics = site.fit(_params(site), {"server-round": 1})
        loss_n = site.evaluate(_params(site), {})[1]
        replies.append((weight, loss_n, metrics))
    (w0, e0, m0), (w1, e1, m1) = replies
    assert (w0, e0) == (w1, e1) == (NHAT, NHAT)
    assert m0 == m1  # dataset_size, sample_rate, steps, sigma, delta, eps: bit-identical
    plan = plan_round(make_cfg(**{**CFG, **kw}), NHAT)
    assert (m0["dataset_size"], m0["sample_rate"], m0["steps_planned"], m0["noise_multiplier"], m0["delta"]) == (
        NHAT,
        plan.sample_rate,
        plan.steps,
        plan.noise_multiplier,
        plan.delta,
    )


def test_neither_reply_carries_the_real_size_nor_a_timing():
    site = _site(None, **{"dp.noise-multiplier": 1.0})
    real_train, real_val = len(site.train_data), len(site.val_data)
    assert NHAT not in (real_train, real_val)
    _, weight, fit = site.fit(_params(site), {"server-round": 1})
    _, eval_weight, evaluated = site.evaluate(_params(site), {})
    assert weight == NHAT and eval_weight == NHAT and fit["dataset_size"] == NHAT
    assert "train_seconds" not in fit and not any("second" in k for k in fit)
    numbers = [v for v in [*fit.values(), *evaluated.values()] if isinstance(v, (int, float))]
    assert real_train not in numbers and real_val not in numbers


def test_budget_refusal_sends_no_size_either():
    site = _site(None, **{"dp.noise-multiplier": 1.0, "dp.epsilon-budget": 1e-3})
    _, weight, metrics = site.fit(_params(site), {"server-round": 1})
    assert metrics["status"] == "budget_exhausted" and weight == 0 and metrics["dataset_size"] == NHAT


def test_a_real_size_delta_does_not_cover_is_refused_without_naming_it():
    dp = {"dp.noise-multiplier": 1.0, "dp.delta": 1 / 256}
    plan = plan_round(make_cfg(**{**CFG, **dp}), 20)  # delta < 1/n-hat: accepted by the plan
    check_real_size(plan, 255)
    with pytest.raises(ConfigError, match="declared-size") as info:
        check_real_size(plan, 256)
    assert "256" not in str(info.value) and "\n" not in str(info.value)
    # At the site, before anything is trained (its real split is larger than 256).
    site = _site(None, declared=5, **dp)
    assert len(site.train_data) >= 256
    with pytest.raises(ConfigError, match="declared-size") as info:
        site.fit(_params(site), {"server-round": 1})
    assert str(len(site.train_data)) not in str(info.value)
    assert site._entries() == []  # no round was spent


def test_a_deployed_site_without_a_declared_size_is_refused_in_one_line():
    with pytest.raises(ConfigError) as info:
        declared_size({"partition-id": 0})
    msg = str(info.value)
    assert DECLARED_SIZE in msg and "PRIVACY.md" in msg and "\n" not in msg
    assert declared_size({"partition-id": 0}, simulated=120) == 120  # the launcher's declaration
    assert declared_size({"declared-size": 80}, simulated=120) == 80  # the site's own wins


@pytest.mark.parametrize("bad", [0, -3, 2.5, "300", True, 123456789.0])
def test_a_declared_size_that_is_not_a_positive_integer_is_refused(bad):
    with pytest.raises(ConfigError, match="'declared-size': must be a positive integer") as info:
        declared_size({"declared-size": bad})
    # One fixed line: the value is never repeated.
    assert (
        str(info.value)
        == "config key 'declared-size': must be a positive integer (the site's public training-set size)"
    )


def test_site_config_requires_a_declared_size(tmp_path):
    site = SiteConfig("a", 0, "h:1", "ca", "k", "k.pub")
    with pytest.raises(ConfigError, match="declared-size"):
        site.validate()


def test_the_deployed_client_app_refuses_a_site_without_a_declared_size():
    """client.app:app has no launcher declaration to fall back on; the simulation's does."""
    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    with pytest.raises(ConfigError, match="'declared-size': missing"):
        make_site({}, ctx, **site_keys())
    assert make_site({}, ctx, declared_sizes=[NHAT, 1, 1], **site_keys()).declared == NHAT
