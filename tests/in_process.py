"""Flower's simulation engine with the sites run in the test's own process instead of Ray workers.

Starting Ray (its GCS, raylet, dashboard and agent processes, then a worker per core that
imports torch) costs about 10 s of a 2-core machine per run, more than a small run itself.
Tests whose assertions are about what the ServerApp and ClientApp compute (aggregates,
ledger rows, metrics records, message fields) run their sites here instead: everything
else is Flower's own (the simulation engine, the in-memory SuperLink state, the
ServerApp and ClientApp with all their mods, SecAgg+ included), each message goes
through Flower's wire format both ways, and a failing ClientApp becomes Flower's error
reply exactly as under Ray (the actor code raises the same ClientAppException).

What only Ray does (processes started and stopped, a SIGINT or SIGKILL mid-round, Ray's
traceback in an error reason) stays checked by the tests that start Ray: test_end_to_end,
test_gan_end_to_end, test_tabular_run, test_qfedavg's run, test_interrupt, test_resume and
test_release_inventory's exception test.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import pytest
from flwr.server.superlink.fleet.vce.backend import Backend, raybackend
from flwr.simulation.ray_transport.ray_actor import VirtualClientEngineActor


class InProcessBackend(Backend):
    """Flower's simulation backend without Ray: each message runs the ClientApp through the
    actor code Ray would run (``VirtualClientEngineActor.run``), here, one at a time. The
    node's context goes in as a copy, so a failing call leaves it unchanged, as under Ray,
    and the reply goes through Flower's serialisation, as over the wire."""

    def __init__(self, backend_config) -> None:
        self.app_fn = None

    def build(self, app_fn) -> None:
        self.app_fn = app_fn

    @property
    def num_workers(self) -> int:
        return 1

    def is_worker_idle(self) -> bool:
        return True

    def terminate(self) -> None:
        pass

    def process_message(self, message, context):
        ins = over_the_wire(message)  # a copy: the ClientApp's mods edit the message they get
        _, reply, updated = VirtualClientEngineActor().run(self.app_fn, ins, "0", copy.deepcopy(context))
        return over_the_wire(reply), updated


def over_the_wire(msg):
    """The message as Flower serialises it (``message_to_proto`` leaves the id to the link)."""
    from flwr.common.serde import message_from_proto, message_to_proto

    wire = message_from_proto(message_to_proto(msg))
    wire.metadata.__dict__["_message_id"] = msg.metadata.message_id
    return wire


def sites_in_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs started after this (``simulate``, ``run_simulation``) use :class:`InProcessBackend`."""
    monkeypatch.setattr(raybackend, "RayBackend", InProcessBackend)


@contextlib.contextmanager
def in_process() -> Iterator[None]:
    """:func:`sites_in_process` for a block (a module-scoped fixture has no ``monkeypatch``)."""
    with pytest.MonkeyPatch.context() as mp:
        sites_in_process(mp)
        yield
