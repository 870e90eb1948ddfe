"""The README's Flower-native run: the real ``flwr run .`` against a local SuperLink (Flower's
simulation engine), with the parties' keys from ``privfed keys simulation`` named by
``$PRIVFED_SIMULATION_IDS`` (common/deploy/simulation_ids.py).

One run, as small as a run can be (2 sites, 2 rounds, no membership inference, no sample
grids, a tiny VAE, a fixed sigma): it checks that the run ends, prints one line per round
and no line twice, leaves a ledger that verifies against the registry's keys, and that
stopping the local SuperLink by its PID leaves none of the processes it started.
"""

from __future__ import annotations

import collections
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from common.deploy.simulation_ids import ENV, app_config, make_for_app

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # flwr starts flower-superlink from PATH
SMALL = [
    "num-sites=2",
    "rounds=2",
    "audit.mia=false",
    "sample-every=0",
    "vae.hidden-dim=16",
    "vae.latent-dim=2",
    "dp.target-epsilon=0.0",
    "dp.noise-multiplier=1.0",
]
ANSI = re.compile(r"\x1b\[[0-9;]*m")
MARKER = "PRIVFED_TEST_FLWR_NATIVE"  # every process the run starts inherits it: how the test finds them
# Lines that legitimately repeat: a warning's source line, Flower's empty INFO line.
REPEATABLE = {"warnings.warn(", "INFO :"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def marked(tag: str) -> dict[int, str]:
    """{pid: command line} of this user's processes whose environment carries the run's marker."""
    found: dict[int, str] = {}
    needle = f"{MARKER}={tag}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            if needle not in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                continue
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone, or not ours
            continue
        if cmd:  # a zombie has none: it is gone, its parent has not reaped it yet
            found[int(entry)] = cmd.strip()
    return found


def wait_gone(tag: str, seconds: float) -> dict[int, str]:
    deadline = time.monotonic() + seconds
    left = marked(tag)
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = marked(tag)
    return left


def test_flwr_run_dot_runs_a_local_simulation_with_keys_from_privfed(tmp_path, capsys):
    ids, run_dir, home = tmp_path / "ids", tmp_path / "run", tmp_path / "home"
    home.mkdir()
    # What `privfed keys simulation DIR num-sites=2 ...` does (the same settings as --run-config).
    made = make_for_app(ids, app_config(ROOT, SMALL))
    assert len(made.sizes) == 2
    tag = uuid.uuid4().hex
    env = {
        **os.environ,
        "HOME": str(home),  # Flower writes ~/.flwr/config.toml and apps/ there
        "FLWR_HOME": str(home / ".flwr"),
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
        "FLWR_TELEMETRY_ENABLED": "0",
        "OMP_NUM_THREADS": "1",
        ENV: str(ids),
        MARKER: tag,
    }
    env.pop("FLWR_LOG_LEVEL", None)
    run_config = " ".join([*SMALL, f'run-dir="{run_dir}"'])
    cmd = [str(BIN / "flwr"), "run", str(ROOT), "--stream"]
    cmd += ["--federation-config", "num-supernodes=2", "--run-config", run_config]
    try:
        proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        out = ANSI.sub("", proc.stdout + proc.stderr)
        superlinks = [pid for pid, c in marked(tag).items() if "flower-superlink" in c]
        assert len(superlinks) == 1, f"the local SuperLink keeps running after `flwr run`: {marked(tag)}"
        # What the docs tell a person to do: stop the SuperLink by its PID; it stops the rest.
        os.kill(superlinks[0], signal.SIGTERM)
        left = wait_gone(tag, 60)
    finally:
        for pid in marked(tag):  # whatever is still there, so no test after this one inherits it
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    assert proc.returncode == 0, out[-3000:]
    assert left == {}, f"still running after the SuperLink was stopped: {left}"

    lines = [ln.rstrip() for ln in out.splitlines() if ln.strip()]
    rounds = [ln for ln in lines if re.match(r"round\s+\d+/2 ", ln)]
    assert [re.match(r"round\s+(\d+)/", ln).group(1) for ln in rounds] == ["1", "2"], out[-3000:]  # type: ignore[union-attr]
    twice = [ln for ln, n in collections.Counter(lines).items() if n > 1 and ln.strip() not in REPEATABLE]
    assert twice == [], twice
    assert "fit progress" not in out  # Flower's per-round metric dict stays out (server.flower_logging)
    assert (run_dir / "registry.toml").read_text() == made.registry_path.read_text()

    from simulations.cli import main

    capsys.readouterr()
    assert main(["audit", str(run_dir), "--verify"]) == 0
    stdout = capsys.readouterr().out.strip().splitlines()
    assert stdout[-1].startswith("verdict: PASS"), stdout[-5:]
