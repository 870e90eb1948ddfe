"""The hostile review of issue 23's change: each test failed before its fix (audit verdicts, the
report's escaping, config.toml's resolved comments, npz member names, the simulation-keys variable)."""

from __future__ import annotations

import io
import tomllib
import zipfile

import numpy as np
import pytest

from common.config import RunConfig
from common.data.arrays import load_npz_images
from common.errors import DataError
from server.html_report import write_report
from server.ledger import Ledger
from server.recorder import config_toml
from server.run_facts import read_config
from simulations.cli import main as cli
from tests.unit.test_audit import _run_dir


# --- F1: audit verdict says PASS for nothing
def test_an_emptied_ledger_without_metrics_is_not_a_pass(tmp_path, capsys):
    """Wipe every row, head and claim and delete metrics.jsonl: the verdict must not be PASS
    ("head matches metrics.jsonl" is printed although there is no metrics.jsonl)."""
    run = tmp_path / "run"
    run.mkdir()
    Ledger(run / "ledger.sqlite", run_id="run").close()  # what a wiped ledger looks like
    rc = cli(["audit", str(run), "--verify"])
    out = capsys.readouterr().out
    assert "verdict: PASS" not in out, out
    assert rc != 0


def test_a_verdict_without_keys_does_not_start_with_pass(tmp_path, capsys):
    """No registry: only self-consistency was checked; a script grepping 'verdict: PASS' must not accept it."""
    run = _run_dir(tmp_path, rounds=1)
    cli(["audit", str(run), "--verify"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert not last.startswith("verdict: PASS"), last


# --- F2: report.html interpolates config values raw
def test_config_values_in_the_report_header_are_escaped(tmp_path):
    run = _run_dir(tmp_path, rounds=1)
    (run / "config.toml").write_text(
        'task = "vae"\nnum-sites = "<img src=x onerror=alert(1)>"\nrounds = "<script>alert(2)</script>"\n'
    )
    write_report(run)
    page = (run / "report.html").read_text()
    assert "<img src=x" not in page and "<script>alert(2)" not in page


# --- F3: a newline in a path breaks config.toml
def test_a_path_with_a_newline_cannot_forge_resolved_lines_or_break_config_toml(tmp_path):
    path = "/data/x\n# resolved dp.delta: FORGED\nseed = 99"
    cfg = RunConfig.from_flat({"task": "vae", "data.path": path})
    text = config_toml(cfg)
    (tmp_path / "config.toml").write_text(text)
    tomllib.loads(text)  # today: "Cannot overwrite a value" -> resume and the report lose the config
    assert "FORGED" not in read_config(tmp_path).resolved.get("dp.delta", "")


# --- F4: npz error repeats member names from the file
def test_the_missing_x_error_does_not_repeat_member_names_or_break_the_line(tmp_path):
    p = tmp_path / "images.npz"
    npy = io.BytesIO()
    np.save(npy, np.zeros(2))
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("patient 4242.125\n[red]forged.npy", npy.getvalue())
    with pytest.raises(DataError) as info:
        load_npz_images(p)
    msg = str(info.value)
    assert "4242.125" not in msg and "\n" not in msg, msg


# --- F5: a deployed node read the variable before it knew it was not simulated
def test_a_deployed_node_ignores_a_malformed_simulation_variable(monkeypatch):
    """The docstring promises a deployed site "still signs with its own signing-key" when the
    variable is set by mistake; a relative value makes it fail instead, and the failure text
    (config key 'PRIVFED_SIMULATION_IDS') tells the coordinator the site's environment has it."""
    from client.app import simulation_engine_site

    monkeypatch.setenv("PRIVFED_SIMULATION_IDS", "ids")
    node = {"partition-id": 0, "signing-key": "/k.pem", "server-key": "ab" * 32, "declared-size": 100}
    assert simulation_engine_site(node, 3, 0) is None
