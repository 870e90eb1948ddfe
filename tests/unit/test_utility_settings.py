"""Issue 24, bad input: a utility setting that the budget cannot carry fails before training,
in one line naming the key (the run dir is never made)."""

from __future__ import annotations

import pytest

from common.errors import ConfigError
from common.preflight import preflight
from tests.conftest import make_cfg

SMALL = {"num-sites": 2, "rounds": 5, "dp.target-epsilon": 1.0}


def test_a_prv_target_equal_to_the_budget_is_refused_before_training():
    """PRV plans the target exactly, but a site also checks its lifetime budget under RDP, which
    is looser: before, such a run stopped rounds early ("no site can train", 27 of 30)."""
    cfg = make_cfg(**SMALL, **{"dp.accountant": "prv", "dp.epsilon-budget": 1.0})
    with pytest.raises(ConfigError) as e:
        preflight(cfg)
    text = str(e.value)
    assert e.value.key == "dp.epsilon-budget" and "\n" not in text
    assert "dp.accountant=rdp" in text and "raise dp.epsilon-budget" in text


def test_the_same_target_fits_under_rdp_or_with_room_in_the_budget():
    preflight(make_cfg(**SMALL, **{"dp.accountant": "rdp", "dp.epsilon-budget": 1.0}))
    preflight(make_cfg(**SMALL, **{"dp.accountant": "prv", "dp.epsilon-budget": 1.2}))


def test_an_unreachable_target_names_its_key():
    with pytest.raises(ConfigError) as e:
        preflight(make_cfg(**{**SMALL, "dp.target-epsilon": 0.001, "dp.epsilon-budget": 1.0}))
    assert e.value.key == "dp.target-epsilon" and "not reachable" in str(e.value)


def test_a_federation_table_key_written_with_its_table_suggests_the_bare_key():
    """Found while tuning: `federation.rounds=15` (the TOML path) was refused with "did you mean
    'faults.rounds'?", which sends the user to the wrong table."""
    with pytest.raises(ConfigError) as e:
        make_cfg(**{"federation.rounds": 15})
    assert e.value.key == "federation.rounds" and "did you mean 'rounds'?" in str(e.value)


def _prv(**extra):
    return make_cfg(**{"dp.accountant": "prv", "dp.target-epsilon": 1.0, "rounds": 10, "train.batch-size": 32, **extra})


def test_a_metrics_dp_run_that_fits_each_accountant_alone_but_not_both_is_refused():
    """Hostile review (issue 24): PRV, target 1, metrics.dp (z = 10), 10 rounds, budget 1.7:
    PRV over everything is 1.61 and RDP over DP-SGD alone 1.08, which passed the two separate
    checks; RDP over everything is 1.745, so every site stopped at round 10 of 10."""
    from common.preflight import check_plan_fits_budget
    from common.privacy.plan import plan_round

    cfg = _prv(**{"dp.epsilon-budget": 1.7, "metrics.dp": True, "metrics.noise-multiplier": 10.0})
    with pytest.raises(ConfigError) as e:
        check_plan_fits_budget(cfg, plan_round(cfg, 200))
    assert e.value.key == "metrics.noise-multiplier" and "lifetime rdp" in str(e.value)


@pytest.mark.parametrize("target", [0.5, 8.0])
def test_the_budget_a_refusal_advises_is_enough(target):
    """Hostile review (issue 24): the advised budget was rounded to nearest (0.536 when 0.536008
    was needed), so following the advice was refused again."""
    import re

    from common.preflight import check_plan_fits_budget
    from common.privacy.plan import plan_round

    cfg = _prv(**{"dp.target-epsilon": target, "dp.epsilon-budget": target})
    plan = plan_round(cfg, 200)
    with pytest.raises(ConfigError) as e:
        check_plan_fits_budget(cfg, plan)
    advised = re.search(r"raise dp\.epsilon-budget to ([0-9.e+-]+) or more", str(e.value))
    assert advised, str(e.value)
    check_plan_fits_budget(_prv(**{"dp.target-epsilon": target, "dp.epsilon-budget": float(advised.group(1))}), plan)


def test_gan_center_samples_has_an_upper_bound():
    """Hostile review (issue 24): a coordinator could ask every site to generate any number of
    images per label before every DP step."""
    with pytest.raises(ConfigError) as e:
        make_cfg(**{"task": "gan", "gan.center-samples": 10**9})
    assert e.value.key == "gan.center-samples" and "<= 4096" in str(e.value)
