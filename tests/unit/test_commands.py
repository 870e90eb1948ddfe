"""`privfed simulate` and `privfed resume` end by naming the auditor's commands for the run they left."""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import pytest
from rich.console import Console

from simulations import commands


@pytest.mark.parametrize("command", ["simulate", "resume"])
def test_a_finished_run_ends_with_the_audit_and_report_commands(monkeypatch, command):
    run_dir = Path("/tmp/runs/a run [x]")  # a space and rich markup: quoted for the shell, shown as is
    monkeypatch.setattr("simulations.launcher." + command, lambda *a, **k: run_dir)
    out = io.StringIO()
    console = Console(file=out, highlight=False, soft_wrap=True, width=200)
    args = argparse.Namespace(scenario="vae-digits", overrides=[], verbose=False, key_file=None, run_dir=str(run_dir))
    assert commands.run(command, args, console, console, []) == 0
    last = out.getvalue().strip().splitlines()[-1]
    assert last == (
        "next: privfed audit '/tmp/runs/a run [x]' --verify (the ledger against the keys); "
        "privfed report '/tmp/runs/a run [x]' (report.html)"
    )
