"""Ctrl-C a real simulated run: it stops promptly and cleanly, loses nothing, and resumes.

SIGINT goes to the run's process group, as a terminal sends it. Before the fix the main
process hung in threading._shutdown on a Flower worker thread blocked in ``ray.get``
(simulations/interrupt.py). The time bound below is a hang check, not a timing test.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from client.verify import verify_site
from server.ledger import Ledger
from tests.conftest import assert_no_new_simulation_processes, simulation_processes
from tests.integration.test_resume import ARGS as RESUME_ARGS
from tests.integration.test_resume import _kill_tree, _lines, _privfed, _resume

# SIGINT lands 0.3 s after round 1's line, in round 2 or, on a fast machine, round 3. The
# resume abandons that round and runs the rest; with 3 rounds a SIGINT in the last one left
# nothing to resume (seen once in a suite run), so there are rounds to spare.
ROUNDS = 6
SITES = ("site-0", "site-1")
# As small as a run gets (test_resume's settings, two sites): the fixed noise multiplier
# skips the noise search in both the run's and the resume's preflight.
ARGS = [a for a in RESUME_ARGS if not a.startswith(("rounds=", "num-sites="))] + [
    f"rounds={ROUNDS}",
    f"num-sites={len(SITES)}",
]
HANG = 30  # seconds from SIGINT to exit that only a hang exceeds (the run stops in about 2)


def _ledger_vs_sites(run_dir: Path) -> dict[str, list[str]]:
    """Each site's findings of ``privfed site verify`` (its own history against the ledger)."""
    return {site: verify_site(run_dir / "site-state", run_dir, site_id=site)[0] for site in SITES}


@pytest.mark.slow
def test_sigint_stops_the_run_cleanly_and_resume_completes_it(tmp_path):
    run_dir = tmp_path / "run"
    before = set(simulation_processes())
    log = tmp_path / "first.log"
    with log.open("w") as out:
        proc = _privfed("simulate", *ARGS, f"run-dir={run_dir}", stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while not _lines(run_dir) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None and _lines(run_dir), f"round 1 never completed: {log.read_text()[-2000:]}"
        time.sleep(0.3)  # into round 2: the sites are training
        signal_sent = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)  # the run leads its own session: this is a terminal's Ctrl-C
        try:
            code = proc.wait(timeout=HANG)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {HANG} s after SIGINT: {log.read_text()[-2000:]}")
        stopped_in = time.monotonic() - signal_sent
    finally:
        _kill_tree(proc.pid)
        proc.wait()
    text = log.read_text()
    assert code == 130, text[-2000:]
    assert "Traceback" not in text, text[-3000:]
    assert f"run dir: {run_dir}" in text and f"privfed resume {run_dir}" in text, text[-2000:]
    assert "stopped after round" in text and "interrupted" in text
    assert "exiting now" not in text  # Flower's engine ended its own way, not on the stopper's deadline
    assert not (run_dir / "summary.md").exists()  # written by the resume, at the end
    print(f"SIGINT to exit: {stopped_in:.1f} s")

    # Nothing lost: the ledger's chain holds and ends at the last recorded round's head, and
    # it charges no site for a round the site has no record of. A site that finished training
    # in the abandoned round has the spend in its own history only: its next reply reports it.
    done = max(m["round"] for m in _lines(run_dir))
    assert done < ROUNDS
    with Ledger(run_dir / "ledger.sqlite") as ledger:
        check = ledger.verify(expected_head=_lines(run_dir)[-1]["ledger_head"])
        assert check.ok, check.reason
    for site, findings in _ledger_vs_sites(run_dir).items():
        late = re.compile(rf"round {done + 1}: trained by this site, missing from the ledger$")
        assert all(late.match(f) for f in findings), (site, findings)

    # The run stopped its Ray processes (another run of this checkout may be running: only new ones count).
    assert_no_new_simulation_processes(before)

    _resume(run_dir)
    lines = _lines(run_dir)
    assert [m["round"] for m in lines] == list(range(1, ROUNDS + 1))
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["round"] == ROUNDS
    assert (run_dir / "summary.md").is_file()
    # Now every round each site trained, the abandoned one included, is in the ledger unchanged.
    assert _ledger_vs_sites(run_dir) == {site: [] for site in SITES}
