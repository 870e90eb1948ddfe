"""Hostile review of i25-ema: kill a gan-digits run (ema-decay 0.8) after a round that changed
nothing, resume it, and check the served average is the one an uninterrupted run keeps.

Round 1: every site crashes (faults), so the round is recorded and checkpointed without
changing the model. Round 2 is killed (its update is lost: the model continues from the
round-1 checkpoint, i.e. the initial model). Round 3 is the first round whose model the run
keeps, so the average must start there: after round 3, served == global. On i25-ema the
checkpoint's "served" holds the initial model and the resumed average is 0.8 * init + 0.2 * g3.
"""

from __future__ import annotations

import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
import torch

from server.ledger import Ledger
from tests.integration.test_resume import _kill_tree, _lines, _privfed, _resume

ARGS = [
    "gan-digits",
    "rounds=3",
    "num-sites=3",
    "gan.features=256",
    "gan.hidden-dim=32",
    "gan.eval-samples=200",
    "dp.target-epsilon=0.0",
    "dp.noise-multiplier=1.0",
    "audit.mia=false",
    "sample-every=0",
    "faults.crash-rate=1.0",
    'faults.rounds="1"',
    # The subject is the average a resumed run serves, not Ray: the sites run in the launcher's
    # process (tests/integration/test_resume.py kills and resumes a run under Ray).
    "backend=in-process",
]


def _round_started(run_dir: Path) -> int:
    """The last round the server marked begun in its ledger; 0 while none (or it is busy)."""
    try:
        with Ledger(run_dir / "ledger.sqlite") as ledger:
            return ledger.round_started()
    except (FileNotFoundError, sqlite3.Error, ValueError):
        return 0


@pytest.mark.slow
def test_resumed_average_does_not_start_from_the_initial_model(tmp_path):
    run_dir = tmp_path / "run"
    log = (tmp_path / "first.log").open("w")
    proc = _privfed("simulate", *ARGS, f"run-dir={run_dir}", stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 400
        # Killed only once round 2 has begun, so that it is an interrupted round, whose update is
        # lost. A kill between round 1's line and round 2's start would make round 2 an ordinary
        # round after the resume, and the average would rightly start there (a CI run did that).
        while _round_started(run_dir) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        _kill_tree(proc.pid)
        proc.wait()
    first = _lines(run_dir)
    assert len(first) == 1 and not first[0]["aggregated"], first
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert ckpt["round"] == 1

    _resume(run_dir, timeout=500)
    lines = _lines(run_dir)
    assert [m["aggregated"] for m in lines] == [False, False, True], lines
    payload = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert payload["round"] == 3
    # Round 3's model is the first this run kept: the average is that model itself.
    key = next(k for k in payload["state"] if k.startswith("generator.") and k.endswith("weight"))
    assert torch.equal(payload["state"][key], payload["served"][key])  # fails: 0.8 * init + 0.2 * g3
