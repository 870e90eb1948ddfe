"""Issue 24, bad input: a utility setting that the budget cannot carry fails before training,
in one line naming the key (the run dir is never made)."""

from __future__ import annotations

import pytest

from common.errors import ConfigError
from common.preflight import preflight
from tests.conftest import make_cfg

SMALL = {"num-sites": 2, "rounds": 5, "dp.target-epsilon": 1.0}


def test_a_prv_target_equal_to_the_budget_fits_every_site_check():
    """Issue 24: PRV plans the target exactly, but a site checked its lifetime budget under RDP
    alone, which over-states PRV's epsilon, so such a run stopped rounds early (26 of 30) and was
    refused before training. The lifetime now takes the smaller of two valid bounds: the run fits,
    and the check that stopped it (RDP over the planned rounds) is indeed above the budget."""
    from common.privacy.accounting import epsilon, lifetime_epsilon
    from common.privacy.plan import plan_round

    cfg = make_cfg(**SMALL, **{"dp.accountant": "prv", "dp.epsilon-budget": 1.0})
    preflight(cfg)
    plan = plan_round(cfg, 200)
    planned = [plan.mechanism] * cfg.federation.rounds
    assert lifetime_epsilon(planned, plan.delta, "prv") <= 1.0 < epsilon(planned, plan.delta, "rdp")


def test_the_lifetime_bound_is_rdp_or_the_smaller_of_rdp_and_prv(monkeypatch):
    from common.privacy import accounting

    history = [(1.2, 0.05, 300), (0.9, 0.1, 40)]
    rdp = accounting.epsilon(history, 1e-5, "rdp")
    prv = accounting.epsilon(history, 1e-5, "prv")
    assert prv < rdp
    assert accounting.lifetime_epsilon(history, 1e-5, "rdp") == rdp
    assert accounting.lifetime_epsilon(history, 1e-5, "prv") == prv

    real = accounting.epsilon

    def prv_fails(hist, delta, accountant):
        if accountant == "prv":
            raise ValueError("domain")
        return real(hist, delta, accountant)

    monkeypatch.setattr(accounting, "epsilon", prv_fails)
    assert accounting.lifetime_epsilon(history, 1e-5, "prv") == rdp  # RDP's bound stands alone


def test_the_same_target_fits_under_rdp_or_with_room_in_the_budget():
    preflight(make_cfg(**SMALL, **{"dp.accountant": "rdp", "dp.epsilon-budget": 1.0}))
    preflight(make_cfg(**SMALL, **{"dp.accountant": "prv", "dp.epsilon-budget": 1.2}))


def _prv(**extra):
    return make_cfg(**{"dp.accountant": "prv", "dp.target-epsilon": 1.0, "rounds": 10, "train.batch-size": 32, **extra})


def test_a_metrics_dp_run_is_refused_exactly_when_a_site_would_stop():
    """Hostile review (issue 24): PRV, target 1, metrics.dp (z = 10), 10 rounds: DP-SGD alone
    (1.0) and everything composed (PRV 1.61; RDP, which once bounded the lifetime alone, 1.745)
    must be checked together, as the site composes them before every round."""
    from common.preflight import check_plan_fits_budget
    from common.privacy.plan import plan_round

    cfg = _prv(**{"dp.epsilon-budget": 1.6, "metrics.dp": True, "metrics.noise-multiplier": 10.0})
    with pytest.raises(ConfigError) as e:
        check_plan_fits_budget(cfg, plan_round(cfg, 200))
    assert e.value.key == "metrics.noise-multiplier" and "compose to eps=1.609" in str(e.value)
    ok = _prv(**{"dp.epsilon-budget": 1.7, "metrics.dp": True, "metrics.noise-multiplier": 10.0})
    check_plan_fits_budget(ok, plan_round(ok, 200))


@pytest.mark.parametrize(("target", "z"), [(0.5, 40.0), (8.0, 10.0)])
def test_the_budget_a_refusal_advises_is_enough(target, z):
    """Hostile review (issue 24): the advised budget was rounded to nearest (0.536 when 0.536008
    was needed), so following the advice was refused again."""
    import re

    from common.preflight import check_plan_fits_budget
    from common.privacy.plan import plan_round

    noisy = {"metrics.dp": True, "metrics.noise-multiplier": z}
    cfg = _prv(**{"dp.target-epsilon": target, "dp.epsilon-budget": target, **noisy})
    plan = plan_round(cfg, 200)
    with pytest.raises(ConfigError) as e:
        check_plan_fits_budget(cfg, plan)
    advised = re.search(r"raise dp\.epsilon-budget to ([0-9.e+-]+),", str(e.value))
    assert advised, str(e.value)
    budget = float(advised.group(1))
    check_plan_fits_budget(_prv(**{"dp.target-epsilon": target, "dp.epsilon-budget": budget, **noisy}), plan)


def test_gan_center_samples_has_an_upper_bound():
    """Hostile review (issue 24): a coordinator could ask every site to generate any number of
    images per label before every DP step."""
    with pytest.raises(ConfigError) as e:
        make_cfg(**{"task": "gan", "gan.center-samples": 10**9})
    assert e.value.key == "gan.center-samples" and "<= 4096" in str(e.value)
