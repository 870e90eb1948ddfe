"""The independent epsilon cross-check and the membership-inference attack."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from common.data.arrays import ArrayData
from common.privacy.accounting import RoundPlan
from server.eps_crosscheck import cross_check
from server.ledger import Ledger, SiteSpend
from server.membership_inference import advantage_bound, membership_inference


def _rows(tmp_path, accountant="rdp"):
    led = Ledger(tmp_path / "l.sqlite", run_id="r")
    for r in (1, 2):
        led.record_round(
            r,
            [
                SiteSpend(
                    "a", "image", RoundPlan(300, 0.1, 12, 1.3, 1.0, 1e-5, accountant), 12, 10.0, True, "trained", "os"
                )
            ],
        )
    return led.rows()


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_independent_accountant_agrees_with_the_ledger(tmp_path, accountant):
    (check,) = cross_check(_rows(tmp_path, accountant))
    assert check.ok and check.method == "dp-accounting PLD"
    # RDP over-states relative to a tight accountant; PRV and PLD are both tight.
    assert check.eps_recorded >= check.eps_independent * 0.95
    if accountant == "prv":
        assert check.eps_recorded == pytest.approx(check.eps_independent, rel=0.05)


def test_high_epsilon_rdp_ledger_is_not_flagged(tmp_path):
    """Far from the demo (eps ~ 66): RDP is >5% looser than PLD there, which is fine."""
    led = Ledger(tmp_path / "l.sqlite", run_id="r")
    led.record_round(
        1,
        [
            SiteSpend(
                "a", "image", RoundPlan(300, 0.15, 5000, 1.5, 1.0, 1e-5, "rdp"), 5000, math.inf, True, "trained", "os"
            )
        ],
    )
    (check,) = cross_check(led.rows())
    assert check.eps_recorded > 60 and check.eps_recorded > check.eps_independent * 1.03 and check.ok


def test_cross_check_flags_a_recorded_epsilon_that_is_too_small(tmp_path):
    rows = _rows(tmp_path)
    forged = [dataclasses.replace(r, eps_total=r.eps_total * 0.8) for r in rows]
    (check,) = cross_check(forged)
    assert not check.ok and check.shortfall > 0.05


def test_advantage_bound():
    assert advantage_bound(0.0, 1e-5) == pytest.approx(1e-5)
    assert advantage_bound(math.log(3), 0.0) == pytest.approx(0.5)
    assert advantage_bound(math.inf, 0.0) == 1.0
    assert advantage_bound(50.0, 0.0) == pytest.approx(1.0)


class _MarkedTask:
    """Members carry a marker in x[:, 0]; the 'loss' is low exactly for marked examples."""

    def __init__(self, leak: bool):
        g = torch.Generator().manual_seed(0)
        self.leak = leak
        self.cfg = type("C", (), {"federation": type("F", (), {"num_sites": 2})()})()
        self._sites = [
            ArrayData(torch.cat([torch.ones(100, 1), torch.rand(100, 3, generator=g)], 1), None) for _ in range(2)
        ]
        self._test = ArrayData(torch.cat([torch.zeros(150, 1), torch.rand(150, 3, generator=g)], 1), None)

    def server_test_data(self):
        return self._test

    def site_data(self, i):
        return self._sites[i], self._sites[i]

    def per_sample_loss(self, model, batch):
        return (1.0 - batch.x[:, 0]) if self.leak else batch.x[:, 1]


def test_attack_finds_a_leak_and_not_noise():
    model = torch.nn.Linear(1, 1)
    leaky = membership_inference(_MarkedTask(leak=True), model)
    assert leaky.auc == 1.0 and leaky.advantage == 1.0 and leaky.members == leaky.non_members == 150
    clean = membership_inference(_MarkedTask(leak=False), model)
    assert abs(clean.auc - 0.5) < 0.1
    assert clean.advantage < 1.36 * math.sqrt(2 / clean.members)  # under the chance level


def test_bound_does_not_overflow_and_violation_needs_more_than_noise():
    from server.membership_inference import violates_bound

    assert advantage_bound(1000.0, 1e-5) == pytest.approx(1.0)
    assert advantage_bound(3123.0, 0.0) == 1.0
    m = {"mia_advantage_bound": 0.05, "mia_chance_advantage": 0.1}
    assert violates_bound({**m, "mia_advantage": 0.2})
    assert not violates_bound({**m, "mia_advantage": 0.12})  # above the bound, within sampling error


def test_finite_claim_against_infinite_independent_epsilon_is_flagged():
    from server.eps_crosscheck import CrossCheck

    c = CrossCheck("a", "rdp", 1e-5, 5.0, math.inf, "dp-accounting PLD")
    assert c.shortfall == 1.0 and not c.ok
    assert CrossCheck("a", "rdp", 1e-5, math.inf, math.inf, "x").ok
