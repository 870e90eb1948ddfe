"""One small tabular run through run_simulation, on records generated here (no Adult file needed),
with the sites in the test's process (backend=in-process)."""

from __future__ import annotations

import json

import pytest

from server.ledger import Ledger
from simulations.launcher import simulate
from tests.conftest import assert_no_new_simulation_processes, simulation_processes
from tests.unit.test_tabular_data import generated_rows, write_table

pytestmark = pytest.mark.slow

# The metrics module is the other half of issue 22; the run evaluates through it.
pytest.importorskip("common.metrics.tabular")


def test_two_round_dp_run_on_generated_records(tmp_path):
    # The sites run in this process (backend=in-process): the checks are on what the run
    # computes and writes; tests/integration/test_end_to_end.py checks the runs Ray starts.
    before = set(simulation_processes())
    rows = generated_rows(1500, seed=11)
    data, schema = write_table(tmp_path, rows)
    run_dir = tmp_path / "run"
    simulate(
        "tabular-adult",
        [
            "data.source=csv",
            f"data.path={data}",
            f"tabular.schema={schema}",
            "num-sites=3",
            "rounds=2",
            "sample-every=1",
            "train.batch-size=128",
            "tabular.eval-samples=400",
            # A fixed noise multiplier (no noise search); two rounds spend well inside the budget.
            "dp.target-epsilon=0.0",
            "dp.noise-multiplier=1.0",
            f"run-dir={run_dir}",
            "backend=in-process",
        ],
    )
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in lines] == [1, 2]
    for m in lines:
        t = m["test"]
        assert t["neg_elbo"] > 0
        for key in ("tstr.lr.accuracy", "tstr.gbm.accuracy", "tstr.lr.auc", "fidelity.tv_mean"):
            assert 0 <= t[key] <= 1, key
        assert "fair.sex.dp_diff" in t and "correction.balanced.sex.dp_diff" in t
    rows_ = Ledger(run_dir / "ledger.sqlite").rows()
    assert len(rows_) == 6 and {r.unit for r in rows_} == {"row"} and all(r.eps_total > 0 for r in rows_)
    # The report's marginals (real against synthetic) are written by the server's evaluation, 0600.
    from common.metrics.tabular_plots import MARGINALS_FILE
    from simulations.cli import main as cli

    marginals = run_dir / MARGINALS_FILE
    assert marginals.is_file() and marginals.stat().st_mode & 0o077 == 0
    assert cli(["report", str(run_dir)]) == 0
    page = (run_dir / "report.html").read_text()
    assert "marginals" in page.lower() and "fair" in page.lower()
    samples = (run_dir / "samples" / "round-001.csv").read_text().splitlines()
    assert samples[0].split(",") == ["age", "score", "job", "region", "sex", "income"]
    # No identifier value reaches anything the server wrote.
    ids = {r["id"] for r in rows} | {r["name"] for r in rows}
    for path in run_dir.rglob("*"):
        if path.is_file() and path.suffix in (".jsonl", ".csv", ".md", ".json", ".toml"):
            text = path.read_text(errors="replace")
            assert not any(i in text for i in ids), path.name
    assert_no_new_simulation_processes(before)
