"""The tests' way to the in-process backend (simulations/in_process.py) for runs they start
through ``run_simulation`` directly, or from a module-scoped fixture; a run started through
``simulate`` can say ``backend=in-process`` instead.

Tests whose assertions are about what the ServerApp and ClientApp compute (aggregates,
ledger rows, metrics records, message fields) run their sites there. What only Ray does
(processes started and stopped, a SIGINT or SIGKILL mid-round, Ray's traceback in an error
reason) stays checked by the tests that start Ray: test_end_to_end (its shared run and the
missing-sites run), test_gan_end_to_end's failing run, test_interrupt, test_resume,
test_flwr_native and test_release_inventory's exception test.
test_end_to_end's repeat of its shared run runs in process, so it also checks that a seeded
run gives the same numbers either way.
"""

from __future__ import annotations

import pytest

from simulations.in_process import in_process_backend
from simulations.in_process import sites_in_process as _sites_in_process


def sites_in_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs started after this, until the test ends, run their sites in the test's process."""
    from flwr.server.superlink.fleet.vce.backend import raybackend

    monkeypatch.setattr(raybackend, "RayBackend", in_process_backend())


in_process = _sites_in_process  # the sites in this process for a block (a module-scoped fixture has no monkeypatch)
