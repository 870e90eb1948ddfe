"""Whole runs through Flower's run_simulation (Ray), as a user launches them; two that check what
the run computes run their sites in this process instead (backend=in-process)."""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path

import pytest
import torch

from common.deploy.simulation_ids import simulation_identities
from common.privacy.accounting import epsilon
from common.privacy.plan import plan_round
from common.tasks import get_task
from server.ledger import Ledger
from simulations.launcher import resolve, simulate
from tests.conftest import assert_no_new_simulation_processes

pytestmark = pytest.mark.slow

SMALL = [
    "num-sites=3",
    "vae.hidden-dim=16",
    "vae.latent-dim=2",
    "sample-every=1",
    "dp.target-epsilon=0.0",
    "dp.noise-multiplier=1.0",
]


@pytest.fixture(scope="module")
def two_rounds(tmp_path_factory) -> tuple[Path, list[str]]:
    """One seeded 3-site, 2-round run (its run dir and overrides), shared to save a run:
    test_three_sites_two_rounds checks it, test_seeded_runs_repeat_exactly repeats it.
    Tests only read it."""
    run_dir = tmp_path_factory.mktemp("two-rounds") / "run"
    overrides = SMALL + ["rounds=2", f"run-dir={run_dir}"]
    simulate("vae-digits", overrides)
    return run_dir, overrides


def test_three_sites_two_rounds(two_rounds):
    run_dir, overrides = two_rounds
    cfg = resolve("vae-digits", overrides)

    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in lines] == [1, 2]
    sites = ["site-0", "site-1", "site-2"]
    for m in lines:
        assert m["sites_trained"] == sites and m["sites_used"] == sites and m["aggregated"]
        assert set(m["site_val"]) == set(sites) and all("neg_elbo" in v for v in m["site_val"].values())
        assert math.isfinite(m["test"]["neg_elbo"]) and 0 < m["test"]["recon_mse"] < 1
        vals = [v["neg_elbo"] for v in m["site_val"].values()]
        fair = m["site_fairness"]
        assert fair["sites"] == 3 and fair["worst"] == max(vals) and fair["mean"] == pytest.approx(sum(vals) / 3)

    ledger = Ledger(run_dir / "ledger.sqlite")
    rows = ledger.rows()
    assert [(r.round, r.site_id) for r in rows] == [(r, s) for r in (1, 2) for s in sites]
    assert ledger.verify().ok
    task = get_task("vae")(cfg)
    for r in rows:
        # In a simulation the launcher declares each site's n-hat = its training-split size.
        n = len(task.site_data(int(r.site_id.split("-")[1]))[0])
        plan = plan_round(cfg, n)
        assert r.neighbouring == "add-remove"
        assert (r.unit, r.dataset_size, r.sample_rate, r.noise_multiplier, r.steps) == (
            "image",
            n,
            plan.sample_rate,
            1.0,
            plan.steps,
        )
        assert r.used and r.status == "trained" and r.delta < 1 / n
        assert r.eps_total == epsilon([plan.mechanism] * r.round, r.delta, "rdp")
    # metrics.jsonl agrees with the ledger and anchors its head hash
    assert lines[-1]["eps"] == {r.site_id: r.eps_total for r in rows if r.round == 2}
    assert lines[-1]["ledger_head"] == ledger.head()

    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert ckpt["round"] == 2 and ckpt["ledger_rows"] == 6 and ckpt["ledger_head"] == ledger.head()
    model = task.build_model()
    model.load_state_dict(ckpt["state"])
    task.artifacts_dir = run_dir  # the run's evaluation classifier (class_tv), not a second training of it
    assert task.evaluate(model, task.server_test_data())["neg_elbo"] == pytest.approx(
        lines[-1]["test"]["neg_elbo"], rel=1e-5
    )

    saved = tomllib.loads((run_dir / "config.toml").read_text())
    assert saved["rounds"] == 2 and saved["dp"]["noise-multiplier"] == 1.0
    for name in ("summary.md", "eps.png", "utility.png", "samples/final.png", "samples/round-002.png"):
        assert (run_dir / name).stat().st_size > 0, name
    summary = (run_dir / "summary.md").read_text()
    assert "one image" in summary and "δ" in summary and "rdp" in summary.lower()
    audit = json.loads((run_dir / "privacy-audit.json").read_text())
    mia = audit["membership_inference"]
    assert 0 <= mia["mia_auc"] <= 1 and mia["mia_eps"] == max(r.eps_total for r in rows if r.round == 2)
    assert mia["mia_advantage"] <= mia["mia_advantage_bound"]
    assert [c["site_id"] for c in audit["cross_check"]] == sites and all(c["ok"] for c in audit["cross_check"])
    assert_no_new_simulation_processes()


def test_run_ends_cleanly_when_no_site_can_train(tmp_path):
    """Budget between every site's 1-round and 3-round spend: each site trains, then says no.

    The sites run in this process (backend=in-process): what is checked is the budget stop,
    which the sites' replies and the server decide; the runs around it check Ray's."""
    base = resolve("vae-digits", SMALL)
    task = get_task("vae")(base)
    plans = [plan_round(base, n) for n in task.site_sizes()]
    one = max(epsilon([p.mechanism], p.delta, "rdp") for p in plans)
    three = min(epsilon([p.mechanism] * 3, p.delta, "rdp") for p in plans)
    assert one < three
    budget = (one + three) / 2

    run_dir = tmp_path / "run"
    # No samples or membership-inference audit: this test reads the budget stop only.
    simulate(
        "vae-digits",
        SMALL
        + ["sample-every=0", "audit.mia=false", "rounds=8", f"dp.epsilon-budget={budget}", f"run-dir={run_dir}"]
        + ["backend=in-process"],
    )

    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert 2 <= len(lines) < 8  # stopped early
    assert sorted(lines[-1]["sites_budget_exhausted"]) == ["site-0", "site-1", "site-2"]
    rows = Ledger(run_dir / "ledger.sqlite").rows()
    assert all(r.eps_total <= budget for r in rows)
    exhausted = [r for r in rows if r.status == "budget_exhausted"]
    assert exhausted and all(r.steps == 0 and r.eps_round == 0 and not r.used for r in exhausted)
    assert "budgets exhausted" in (run_dir / "summary.md").read_text()
    assert_no_new_simulation_processes()


def test_a_run_in_which_no_round_aggregated_anything_fails(tmp_path):
    """Every site crashes every round: before, the run exited 0 and reported the untrained
    model's metrics as its result. Now it fails in one line, and its rounds stay on disk.

    The sites run in this process (backend=in-process): a site's crash reaches the server as
    the same error reply as under Ray; test_gan_end_to_end's failing run checks that a run
    that fails under Ray leaves none of its processes."""
    from common.errors import TrainingFailure

    run_dir = tmp_path / "run"
    with pytest.raises(TrainingFailure, match="no round aggregated an update") as e:
        simulate(
            "vae-digits",
            SMALL
            + ["rounds=2", "sample-every=0", "audit.mia=false", "faults.crash-rate=1.0", f"run-dir={run_dir}"]
            + ["backend=in-process"],
        )
    assert "\n" not in str(e.value)
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(not line["sites_trained"] and line["failures"] for line in lines)
    assert "FAILED: no round aggregated" in (run_dir / "summary.md").read_text()
    assert_no_new_simulation_processes()


def test_missing_sites_fail_clearly_and_leave_no_run_dir(tmp_path):
    """Fewer SuperNodes than num-sites: a one-line error after site-wait-seconds, not a day-long hang."""
    from flwr.simulation import run_simulation

    from client.app import build_client_app
    from common.errors import PrivfedError
    from server.app import build_server_app

    run_dir = tmp_path / "run"
    ids = simulation_identities(tmp_path / "ids", [100, 100, 100])  # the parties' keys, outside the run dir
    overrides = [f"registry={ids.registry_path}", f"server-key={ids.server_key_path}"]
    flat = resolve(
        "vae-digits", SMALL + ["rounds=1", "site-wait-seconds=1", f"run-dir={run_dir}", *overrides]
    ).to_flat()
    with pytest.raises(PrivfedError) as info:
        run_simulation(
            build_server_app(flat),
            build_client_app(flat, signing_keys=ids.site_keys, server_public_key=ids.server_public_key),
            num_supernodes=2,
            backend_config={"client_resources": {"num_cpus": 1}},
        )
    assert isinstance(info.value, PrivfedError)
    assert "only 2 of num-sites=3 sites connected" in str(info.value)
    assert not run_dir.exists()
    assert_no_new_simulation_processes()


def test_seeded_runs_repeat_exactly(tmp_path, two_rounds):
    """The README's numbers are reproducible: same seed, same metrics, same ledger epsilons.

    The repeat runs its sites in this process (backend=in-process), the shared run under
    Ray: the numbers must not depend on which backend ran a site's rounds either."""
    first, _ = two_rounds
    again = tmp_path / "b"
    simulate("vae-digits", SMALL + ["rounds=2", f"run-dir={again}", "backend=in-process"])  # the shared run's
    outs = []
    for run_dir in (first, again):
        lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        eps = [r.eps_total for r in Ledger(run_dir / "ledger.sqlite").rows()]
        outs.append(([m["test"] for m in lines], [m["site_val"] for m in lines], eps))
    assert outs[0] == outs[1]
