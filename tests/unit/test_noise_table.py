"""simulations.noise_table: at a fixed ε and fixed epochs the batch size barely moves q·√T / σ."""

from __future__ import annotations

from simulations.noise_table import table


def test_signal_per_noise_is_flat_in_the_batch_and_larger_under_prv():
    rows = table(2_000, 10.0, 1.0, [100, 400], ["rdp", "prv"])
    rdp = [float(r["signal_per_noise"]) for r in rows if r["accountant"] == "rdp"]
    prv = [float(r["signal_per_noise"]) for r in rows if r["accountant"] == "prv"]
    assert [r["steps"] for r in rows[:2]] == [200, 50]
    assert abs(rdp[0] - rdp[1]) < 0.05 * rdp[0]  # 4x the batch, a quarter of the steps: the same
    assert all(p > r for p, r in zip(prv, rdp))  # the tighter accountant needs less noise
