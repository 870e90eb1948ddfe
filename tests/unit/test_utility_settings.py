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
