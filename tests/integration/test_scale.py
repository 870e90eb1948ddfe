"""Settings that keep a round's cost flat in the number of sites (no Ray)."""

from __future__ import annotations

from unittest.mock import Mock

import numpy as np
import pytest
from flwr.common import ndarrays_to_parameters
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy

from common.errors import ConfigError
from server.strategy import DeltaFedAvg
from tests.conftest import make_cfg, make_strategy


def _manager(n: int) -> SimpleClientManager:
    cm = SimpleClientManager()
    for i in range(n):
        proxy = Mock(spec=ClientProxy)
        proxy.cid = str(i)
        proxy.node_id = i  # a real ClientProxy has one (instructions carry receipts by node)
        cm.register(proxy)
    return cm


def _strategy(fraction_evaluate: float, last_round: int) -> DeltaFedAvg:
    return make_strategy(
        init=[np.zeros(2, np.float32)], num_sites=40, fraction_evaluate=fraction_evaluate, last_round=last_round
    )


def test_fraction_evaluate_samples_sites_and_the_last_round_evaluates_all():
    cm, params = _manager(40), ndarrays_to_parameters([np.zeros(2, np.float32)])
    s = _strategy(0.1, last_round=5)
    picked = s.configure_evaluate(2, params, cm)
    assert len(picked) == 4
    last = s.configure_evaluate(5, params, cm)
    assert sorted(int(c.cid) for c, _ in last) == list(range(40))
    assert all(ins.config == {"server-round": 5} for _, ins in last)
    # The default evaluates every site every round.
    assert len(_strategy(1.0, last_round=5).configure_evaluate(2, params, cm)) == 40


@pytest.mark.parametrize("value", [0.0, 1.5, -0.1])
def test_fraction_evaluate_out_of_range_is_one_line_error(value):
    with pytest.raises(ConfigError, match="fraction-evaluate") as err:
        make_cfg(**{"fraction-evaluate": value})
    assert "\n" not in str(err.value)


def test_a_site_takes_the_launchers_noise_search_instead_of_repeating_it(monkeypatch):
    import common.privacy.accounting as accounting
    import common.privacy.plan as dp

    cfg = make_cfg(**{"dp.target-epsilon": 3.0, "dp.delta": 1e-5, "rounds": 4})
    monkeypatch.setattr(accounting, "_NOISE", {})  # the one noise-search cache (plan re-exports it)
    searched = dp.plan_round(cfg, 500).noise_multiplier  # the launcher's preflight searches once
    table = dp.known_noise()
    assert len(table) == 1
    # A fresh Ray worker: empty cache, and a search would fail loudly here.
    monkeypatch.setattr(accounting, "_NOISE", {})
    monkeypatch.setattr(
        accounting, "noise_for_target", lambda *a: (_ for _ in ()).throw(AssertionError("searched again"))
    )
    dp.remember_noise(table)
    assert dp.plan_round(cfg, 500).noise_multiplier == searched
    with pytest.raises(AssertionError, match="searched again"):  # another site size is still searched
        dp.plan_round(cfg, 700)
