"""metrics.dp end to end: a short secure recommender run, each site's noisy release is its own
ledger row that verifies, the test metrics carry error bars, and the summary says so.

The run is user-level (dp.unit = user, issue 21), the strictest combination: persons sampled
and clipped, evaluation sums per user, every row in the unit "user" or "one user", and the
summary's per-person worst case over the declared max-sites-per-person. (Record-level
metrics.dp runs end to end in the deployment and release-inventory tests.)"""

from __future__ import annotations

import json

import pytest

from common.privacy.metrics_dp import MECHANISM
from server.ledger import Ledger
from simulations.launcher import simulate

pytestmark = pytest.mark.slow


def test_secure_recsys_run_with_private_metrics(tmp_path):
    run_dir = tmp_path / "run"
    # A small catalogue (as in test_secagg): SecAgg+ masks every coordinate, and the default
    # 131072 item buckets are most of the run's time; nothing checked here depends on the size.
    small = ["recsys.synthetic-users=200", "recsys.synthetic-items=80", "recsys.num-buckets=512"]
    # A fixed noise multiplier: no noise search in the preflight (two rounds spend about 3.9
    # per site, and the metrics releases on top still fit the budget of 9). The preflight's
    # metrics-budget check with a target epsilon is tests/unit/test_metrics_dp.py's.
    small += ["dp.target-epsilon=0.0", "dp.noise-multiplier=1.0"]
    # The sites run in this process (backend=in-process): the checks are on the ledger, the
    # metrics and the summary, and Ray's start-up was most of the run's time.
    simulate(
        "recsys-synthetic",
        small
        + ["rounds=2", "metrics.dp=true", "dp.epsilon-budget=9", "secagg.enabled=true", f"run-dir={run_dir}"]
        + ["dp.unit=user", "train.batch-size=16", "max-sites-per-person=2", "backend=in-process"],
    )
    with Ledger(run_dir / "ledger.sqlite") as ledger:
        rows = ledger.rows()
        assert ledger.verify().ok
    releases = [r for r in rows if r.mechanism == MECHANISM]
    sites = {r.site_id for r in rows if r.mechanism == "dp-sgd"}
    assert {(r.round, r.site_id) for r in releases} == {(rnd, s) for rnd in (1, 2) for s in sites}
    # Each site's last row composes both mechanisms: above its DP-SGD-only epsilon.
    last = {r.site_id: r for r in rows}
    sgd_last = {r.site_id: r for r in rows if r.mechanism == "dp-sgd"}
    assert all(last[s].eps_total > sgd_last[s].eps_round for s in sites)
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final = [m for m in lines if m.get("test")][-1]
    assert final["test_std"]["rmse"] > 0 and "hr_at_k" not in final["test"]  # ranking withheld
    summary = (run_dir / "summary.md").read_text()
    assert "metrics: private (metrics.dp)" in summary
    assert {r.unit for r in rows if r.mechanism == "dp-sgd"} == {"user"}
    assert {r.unit for r in releases} == {"one user"}
    assert "per person, federation-wide" in summary and "declared max-sites-per-person = 2" in summary
    worst = json.loads((run_dir / "privacy-audit.json").read_text())["per_person_worst_case"]
    assert worst["sites"] == 2 and worst["unit"] == "user"
