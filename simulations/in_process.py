"""``backend = "in-process"``: Flower's simulation engine with the virtual sites run in the
launcher's own process instead of Ray workers.

Starting Ray (its GCS, raylet and agent processes, then a worker per core that imports torch
and Opacus) costs about 10 s of a 2-core machine per run, more than a small run itself.
Here everything else is Flower's own: the simulation engine, the in-memory SuperLink state,
the ServerApp and the ClientApp with all their mods (SecAgg+ included). Each message runs
through the code a Ray actor would run (``VirtualClientEngineActor.run``), one at a time,
and goes through Flower's wire format both ways; a failing ClientApp becomes Flower's error
reply exactly as under Ray (the same ``ClientAppException``). The node's context goes in as
a copy, so a failing call leaves it unchanged, as under Ray. Sites do not run in parallel.

Flower 1.41 builds its backend by name inside the engine (``raybackend.RayBackend``), with
no registry to add one to, so :func:`sites_in_process` swaps that class for the run and
puts it back after. A Flower without it is refused rather than silently run under Ray.

The test suite runs this way every run whose checks are about what the ServerApp and the
ClientApp compute (aggregates, ledger rows, metrics, message fields). What only Ray does
(processes started and stopped, SIGINT or SIGKILL mid-round, Ray's traceback in an error
reason) stays with the tests that start Ray: test_end_to_end's shared and missing-sites
runs, test_gan_end_to_end's failing run, test_interrupt, test_resume, test_flwr_native and
test_release_inventory's exception test.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

from common.errors import PrivfedError


def over_the_wire(msg: Any) -> Any:
    """The message as Flower serialises it (``message_to_proto`` leaves the id to the link)."""
    from flwr.common.serde import message_from_proto, message_to_proto

    wire = message_from_proto(message_to_proto(msg))
    wire.metadata.__dict__["_message_id"] = msg.metadata.message_id
    return wire


def in_process_backend() -> type:
    """The backend class (built on call: Flower's simulation modules import Ray's names)."""
    from flwr.server.superlink.fleet.vce.backend import Backend
    from flwr.simulation.ray_transport.ray_actor import VirtualClientEngineActor

    class InProcessBackend(Backend):
        """Flower's simulation backend without Ray (the module's docstring)."""

        def __init__(self, backend_config: Any) -> None:
            self.app_fn: Any = None

        def build(self, app_fn: Any) -> None:
            self.app_fn = app_fn

        @property
        def num_workers(self) -> int:
            return 1

        def is_worker_idle(self) -> bool:
            return True

        def terminate(self) -> None:
            pass

        def process_message(self, message: Any, context: Any) -> Any:
            ins = over_the_wire(message)  # a copy: the ClientApp's mods edit the message they get
            _, reply, updated = VirtualClientEngineActor().run(self.app_fn, ins, "0", copy.deepcopy(context))
            return over_the_wire(reply), updated

    return InProcessBackend


@contextlib.contextmanager
def sites_in_process() -> Iterator[None]:
    """Runs started inside (``simulate``, ``run_simulation``) run their sites in this process."""
    from flwr.server.superlink.fleet.vce.backend import raybackend

    if not hasattr(raybackend, "RayBackend"):
        raise PrivfedError("backend = in-process: this Flower has no raybackend.RayBackend to stand in for")
    original = raybackend.RayBackend
    setattr(raybackend, "RayBackend", in_process_backend())  # noqa: B010 (Flower's module global)
    try:
        yield
    finally:
        setattr(raybackend, "RayBackend", original)  # noqa: B010
