from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

from common.config import RunConfig  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def make_cfg(**flat) -> RunConfig:
    """A RunConfig from flat keys (tests spell keys as in TOML: 'dp.noise-multiplier')."""
    return RunConfig.from_flat(flat)


def simulation_processes() -> list[str]:
    """Ray/Flower processes of this user (a test must leave none behind)."""
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    pattern = (
        "raylet",
        "gcs_server",
        "flower-superlink",
        "flower-supernode",
        "flower-superexec",
        "flwr-simulation",
        "flwr-serverapp",
        "flwr-clientapp",
    )
    # Only this checkout's (its venv is in the command line): another checkout's run on the
    # same machine is not this suite's leftover.
    return [line for line in out.splitlines() if any(p in line for p in pattern) and sys.prefix in line]


def tamper(ledger_path, *statements: str) -> None:
    """Edit a ledger the way a determined editor would: drop the append-only guards first."""
    import sqlite3

    conn = sqlite3.connect(ledger_path)
    conn.execute("DROP TRIGGER IF EXISTS ledger_no_update")
    conn.execute("DROP TRIGGER IF EXISTS ledger_no_delete")
    for sql in statements:
        conn.execute(sql)
    conn.commit()
    conn.close()
