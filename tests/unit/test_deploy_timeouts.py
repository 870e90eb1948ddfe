"""Issue 20, finding 2: every wait for the sites has a limit by default, and a deployment
cannot switch it off; a silent site costs a round its reply, not the federation its run."""

from __future__ import annotations

import threading
import time
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest

from common.config import RunConfig, flatten
from common.config.rules import check_deployment
from common.errors import ConfigError
from server.app import build_server_app, is_simulation
from server.workflow import TimedGrid

ROOT = Path(__file__).resolve().parents[2]


def test_both_timeouts_are_on_by_default_in_the_schema_and_the_app():
    cfg = RunConfig.from_flat({})
    assert cfg.federation.round_timeout == 900.0 and cfg.secagg.timeout == 900.0
    fab = flatten(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])
    assert fab["round-timeout"] == 900.0 and fab["secagg.timeout"] == 900.0  # what `flwr run .` deploys
    check_deployment(cfg)


@pytest.mark.parametrize(
    "flat, key",
    [
        ({"round-timeout": 0.0}, "round-timeout"),
        ({"secagg.enabled": True, "num-sites": 3, "secagg.timeout": 0.0}, "secagg.timeout"),
    ],
)
def test_a_deployment_without_a_timeout_is_refused_in_one_line(flat, key):
    cfg = RunConfig.from_flat(flat)  # valid as such: a simulation may wait without a limit
    with pytest.raises(ConfigError) as info:
        check_deployment(cfg)
    msg = str(info.value)
    assert msg.startswith(f"config key '{key}': must be > 0 in a deployment") and "\n" not in msg


def test_secagg_timeout_is_not_required_when_secagg_is_off():
    check_deployment(RunConfig.from_flat({"secagg.timeout": 0.0}))  # the key does nothing then


def test_the_server_app_refuses_it_before_anything_starts_under_a_superlink(tmp_path):
    """The ServerApp is told it is deployed by Flower's grid (not InMemoryGrid): no config key
    can make a deployment pass for a simulation."""
    from flwr.app import Context, RecordDict

    assert not is_simulation(SimpleNamespace())  # anything not known to be a simulation is checked
    app = build_server_app({"run-dir": str(tmp_path / "run")})
    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={"round-timeout": 0.0})
    with pytest.raises(ConfigError, match="config key 'round-timeout': must be > 0 in a deployment"):
        app(SimpleNamespace(), ctx)  # type: ignore[arg-type]
    assert not (tmp_path / "run").exists()


def _silent_site_grid():
    """Flower's in-memory grid (the simulation's) with one registered node that never answers."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.proto.task_pb2 import Task  # pylint: disable=E0611
    from flwr.server.superlink.fleet.vce.vce_api import _register_nodes
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.superlink.federation import NoOpFederationManager
    from flwr.superlink.grid import InMemoryGrid

    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    nodes = _register_nodes(1, factory)
    run = Run.create_empty(run_id=7)
    run.primary_task_id, run.federation_id = 11, NOOP_FEDERATION_ID
    state = factory.state()
    state.run_ids[run.run_id] = RunRecord(run=run)
    state.task_store[11] = Task(task_id=11, run_id=run.run_id)
    # What run_simulation sets for its ServerApp (process-wide; every simulation sets it again).
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 11, 7, SUPERLINK_NODE_ID
    grid = InMemoryGrid(factory)
    grid.set_run(run)
    return grid, next(iter(nodes))


def test_a_silent_site_does_not_hang_the_round():
    """Flower's workflows wait without a limit (send_and_receive(timeout=None)); the round's
    grid (TimedGrid, round-timeout) returns without the silent site's reply."""
    from flwr.app import RecordDict

    grid, node = _silent_site_grid()
    assert is_simulation(grid)
    msg = grid.create_message(RecordDict(), "train", node, "1")
    done: list[list] = []
    t0 = time.monotonic()
    waiter = threading.Thread(target=lambda: done.append(list(TimedGrid(grid, 0.5).send_and_receive([msg]))))
    waiter.daemon = True
    waiter.start()
    waiter.join(timeout=20)
    assert done == [[]], "the round still waits for the silent site"
    assert 0.4 < time.monotonic() - t0 < 10
