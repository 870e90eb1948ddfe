"""Whole GAN runs through run_simulation: a normal 2-round run (sites in this process), and a
run that fails (under Ray)."""

from __future__ import annotations

import json

import pytest
import torch

from common.errors import TrainingFailure
from server.ledger import Ledger
from simulations.launcher import simulate
from tests.conftest import assert_no_new_simulation_processes

pytestmark = pytest.mark.slow

SMALL = ["num-sites=3", "gan.features=256", "gan.hidden-dim=32", "gan.eval-samples=200", "sample-every=1"]
# A fixed noise multiplier instead of the scenario's target (no noise search in the preflight);
# two rounds at sigma 1 spend 5.9 to 7.6 per site, inside the budget of 10, so every site trains.
SMALL += ["dp.target-epsilon=0.0", "dp.noise-multiplier=1.0"]


def test_two_round_gan_run(tmp_path):
    # The sites run in this process (backend=in-process): what is checked is what the run
    # computes and writes. The failing run below starts Ray, and checks it is gone after.
    run_dir = tmp_path / "run"
    simulate("gan-digits", SMALL + ["rounds=2", f"run-dir={run_dir}", "backend=in-process"])
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in lines] == [1, 2]
    for m in lines:
        t = m["test"]
        assert t["fid"] > 0 and 0 <= t["tstr"] <= 1 and 0 <= t["class_tv"] <= 1
        assert sum(t[f"class_share.{k}"] for k in range(10)) == pytest.approx(1.0)
        assert all("d_loss" in v and "fid" not in v for v in m["site_val"].values())  # sites have no classifier
    rows = Ledger(run_dir / "ledger.sqlite").rows()
    assert len(rows) == 6 and {r.unit for r in rows} == {"image"} and all(r.eps_total > 0 for r in rows)
    for name in ("eval-classifier.pt", "checkpoint.pt", "quality.png", "samples/round-001.png", "samples/final.png"):
        assert (run_dir / name).is_file(), name
    assert "tstr" in (run_dir / "summary.md").read_text()
    # gan-digits serves the average of the global models (ema-decay 0.8): the checkpoint keeps
    # both, they differ after round 2, and the metrics say whose they are.
    payload = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    weights = [k for k in payload["state"] if k.startswith("generator.") and k.endswith("weight")]
    assert weights and not torch.equal(payload["state"][weights[0]], payload["served"][weights[0]])
    assert all("average of the global models, ema-decay 0.8" in m["test_source"] for m in lines)
    assert_no_new_simulation_processes()


def test_mode_collapse_ends_the_run_as_a_failure_without_a_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    # every class distribution has a largest share >= 10%: "collapse" from round 1
    with pytest.raises(Exception) as exc:
        simulate(
            "gan-digits", SMALL + ["rounds=2", "gan.collapse-share=0.05", "gan.collapse-rounds=1", f"run-dir={run_dir}"]
        )
    assert isinstance(exc.value, TrainingFailure) or "total mode collapse" in str(exc.value)
    assert not (run_dir / "checkpoint.pt").exists()  # no round completed: nothing to resume from
    summary = (run_dir / "summary.md").read_text()
    assert "FAILED: total mode collapse" in summary
    assert_no_new_simulation_processes()
