"""`privfed report`: a self-contained HTML page that renders."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from simulations.cli import main as cli
from tests.conftest import tamper
from tests.unit.test_audit import _run_dir


def _with_metrics(tmp_path):
    run = _run_dir(tmp_path, rounds=3)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    with (run / "metrics.jsonl").open("w") as fh:
        for m in lines:
            m.update(
                primary_metric="neg_elbo",
                test={"neg_elbo": 40.0 - m["round"]},
                site_val={"site-0": {"neg_elbo": 41.0 - m["round"]}, "site-1": {"neg_elbo": 43.0 - m["round"]}},
            )
            fh.write(json.dumps(m) + "\n")
    (run / "privacy-audit.json").write_text(
        json.dumps(
            {
                "membership_inference": {
                    "mia_auc": 0.51,
                    "mia_advantage": 0.04,
                    "mia_chance_advantage": 0.1,
                    "mia_advantage_bound": 0.99,
                    "mia_eps": 3.0,
                    "mia_delta": 1e-5,
                    "mia_examples": 400.0,
                }
            }
        )
    )
    return run


def test_report_is_self_contained_and_states_the_claim(tmp_path, capsys):
    run = _with_metrics(tmp_path)
    assert cli(["report", str(run)]) == 0
    page = (run / "report.html").read_text()
    assert page.startswith("<!doctype html>")
    # every plot is embedded; nothing is fetched from anywhere
    assert len(re.findall(r'src="data:image/png;base64,', page)) >= 3
    assert not re.search(r'(src|href)="(https?:)?//', page)
    assert "one image" in page and "RDP" in page and "δ ≤ 1e-05" in page
    assert "verified" in page and "dp-accounting PLD" in page and "0.510" in page


def test_report_shows_a_failed_verification(tmp_path):
    run = _with_metrics(tmp_path)
    tamper(run / "ledger.sqlite", "UPDATE ledger SET eps_total = 0.5 WHERE seq = 2")
    assert cli(["report", str(run)]) == 0
    assert "FAILED at seq 2" in (run / "report.html").read_text()


def test_report_of_a_missing_run_is_one_line(tmp_path, capsys):
    assert cli(["report", str(tmp_path / "none")]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")
def test_report_renders_in_headless_chromium(tmp_path):
    run = _with_metrics(tmp_path)
    assert cli(["report", str(run)]) == 0
    shot = tmp_path / "report.png"
    subprocess.run(
        [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={shot}",
            "--window-size=1100,2400",
            (run / "report.html").as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    from PIL import Image

    img = Image.open(shot).convert("L")
    assert img.size == (1100, 2400)
    # a rendered page with text and plots is far from blank white
    assert len(set(img.getdata())) > 50


def test_site_fairness_on_a_hand_computed_case():
    import math

    from common.metrics.fairness import site_fairness

    f = site_fairness({"a": 1.0, "b": 2.0, "c": 3.0, "d": 6.0, "e": float("nan")})
    assert f["sites"] == 4 and f["mean"] == 3.0 and f["worst"] == 6.0 and f["best"] == 1.0 and f["gap"] == 5.0
    assert f["std"] == pytest.approx(math.sqrt((4 + 1 + 0 + 9) / 4))
    assert f["worst10_mean"] == 6.0  # ceil(10% of 4) = 1 site
    assert f["jain"] == pytest.approx(144 / (4 * 50))
    assert site_fairness({"a": 2.0, "b": 2.0})["jain"] == 1.0
    assert site_fairness({}) == {}
    many = site_fairness({str(i): float(i) for i in range(1, 21)})  # worst 10% of 20 = the 2 largest
    assert many["worst10_mean"] == 19.5


@pytest.mark.parametrize("dp, failures", [(True, []), (True, ["site-3: crashed"]), (False, []), (False, ["x"])])
def test_round_line_says_no_dp_only_for_a_non_private_run(dp, failures):
    # It once said "no DP (ε=∞)" on every DP round that had no failures.
    from types import SimpleNamespace

    from server.recorder import RunRecorder
    from tests.conftest import make_cfg

    fake = SimpleNamespace(
        cfg=make_cfg(**{"dp.enabled": dp}), task=SimpleNamespace(primary_metric="neg_elbo", privacy_unit="image")
    )
    line = {
        "sites_trained": ["a"],
        "sites_sampled": 1,
        "rejected": {},
        "sites_budget_exhausted": [],
        "test": {},
        "site_val": {},
        "delta": {"a": 1e-5} if dp else {},
        "eps_max": 2.5,
        "failures": failures,
        "seconds": 1.0,
    }
    text = RunRecorder._progress_line(fake, 1, line)
    assert ("no DP" in text) is (not dp)
    assert ("max ε 2.500" in text) is dp
    assert ("failure(s)" in text) is bool(failures)
