"""Ctrl-C in the simulation launcher, piece by piece (tests/integration/test_interrupt.py runs it whole)."""

from __future__ import annotations

import atexit
import gc
import io
import logging
import os
import signal
import threading
import time

import pytest
from rich.console import Console

from common.progress import StatusLine
from server.workflow import RunInterrupted, StoppableGrid, StopRequest, TimedGrid
from tests.unit.test_deploy_timeouts import _silent_site_grid


def _wait_in_thread(fn) -> tuple[threading.Thread, list]:
    result: list = []

    def target() -> None:
        try:
            result.append(fn())
        except BaseException as exc:  # noqa: BLE001  (the test inspects it)
            result.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, result


def test_a_stop_request_ends_the_wait_for_replies():
    """Flower's own send_and_receive waits for every reply, without a limit in a simulation;
    the round's grid leaves that wait when Ctrl-C asks it to, with RunInterrupted."""
    from flwr.app import RecordDict

    grid, node = _silent_site_grid()
    stop = StopRequest()
    msg = grid.create_message(RecordDict(), "train", node, "1")
    thread, result = _wait_in_thread(lambda: list(StoppableGrid(grid, stop).send_and_receive([msg])))
    time.sleep(0.3)
    assert thread.is_alive() and not result  # waiting for the silent site
    stop.requested.set()
    thread.join(timeout=20)
    assert len(result) == 1 and isinstance(result[0], RunInterrupted)


def test_the_stoppable_grid_keeps_the_round_timeout():
    from flwr.app import RecordDict

    grid, node = _silent_site_grid()
    msg = grid.create_message(RecordDict(), "train", node, "1")
    # As RoundLoop composes them: the round timeout still ends the wait, with what arrived.
    thread, result = _wait_in_thread(
        lambda: list(TimedGrid(StoppableGrid(grid, StopRequest()), 0.3).send_and_receive([msg]))
    )
    thread.join(timeout=20)
    assert result == [[]]


def test_replies_pulled_after_the_request_are_not_the_rounds():
    """After Ctrl-C the launcher kills the sites' running tasks; what those return (errors)
    must never reach the strategy as the round's results."""
    stop = StopRequest()

    class Grid:
        pull_interval = 0.01

        def push_messages(self, messages):
            return ["m1"]

        def pull_messages(self, ids):
            stop.requested.set()  # Ctrl-C lands while the reply is being pulled
            reply = type("Reply", (), {"metadata": type("Meta", (), {"reply_to_message_id": "m1"})()})()
            return [reply]

    with pytest.raises(RunInterrupted):
        StoppableGrid(Grid(), stop).send_and_receive([object()])  # type: ignore[arg-type,list-item]
    with pytest.raises(RunInterrupted):  # nothing is sent once a stop is requested
        StoppableGrid(Grid(), stop).send_and_receive([])  # type: ignore[arg-type]


def test_run_interrupted_is_not_an_error_that_except_exception_would_swallow():
    assert not issubclass(RunInterrupted, Exception)


def test_ctrl_c_asks_the_server_to_stop_instead_of_raising_in_the_main_thread(tmp_path):
    from simulations.interrupt import ctrl_c_stops

    stop = StopRequest()
    console = Console(file=io.StringIO())
    before = signal.getsignal(signal.SIGINT)
    with ctrl_c_stops(stop, console, StatusLine(console), tmp_path, lambda: None):
        os.kill(os.getpid(), signal.SIGINT)  # no KeyboardInterrupt here: Flower's engine must end its own way
        deadline = time.monotonic() + 5
        while not stop.requested.is_set() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stop.requested.is_set()
        stop.server_done.set()  # what run_federation does once the ledger is closed
    assert signal.getsignal(signal.SIGINT) is before  # restored: a later Ctrl-C is Python's again
    assert not [t for t in threading.enumerate() if t.name == "privfed-stopper"]
    assert not logging.getLogger("flwr").disabled  # muted while cancelling only; a later run logs again


def test_what_the_user_is_told_after_ctrl_c(tmp_path):
    from simulations.interrupt import interrupted_text

    assert interrupted_text(tmp_path) == "stopped before the run started: nothing to resume"
    (tmp_path / "config.toml").write_text("")
    (tmp_path / "metrics.jsonl").write_text('{"round": 1}\n{"round": 2}\n')
    text = interrupted_text(tmp_path)
    assert text.startswith("stopped after round 2:")
    assert f"run dir: {tmp_path}" in text and f"privfed resume {tmp_path}" in text


def test_the_interpreter_skips_its_last_collections_once_per_process(monkeypatch):
    from simulations.launcher import _skip_final_gc

    registered: list = []
    monkeypatch.setattr(atexit, "register", registered.append)
    monkeypatch.setattr(atexit, "unregister", lambda fn: registered.remove(fn) if fn in registered else None)
    _skip_final_gc()
    _skip_final_gc()
    assert registered == [gc.freeze]


def test_descendants_finds_grandchildren(tmp_path):
    """What the hard exit kills: every process below the run's (Ray's agents are grandchildren)."""
    import subprocess
    import sys

    from simulations.interrupt import descendants

    sleep = "import time; time.sleep(30)"
    script = f"import subprocess, sys; subprocess.Popen([sys.executable, '-c', {sleep!r}]); {sleep}"
    child = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 10
        while len(descendants(os.getpid())) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        below = descendants(os.getpid())
        assert child.pid in below and len(below) >= 2
        assert os.getpid() not in below
    finally:
        for pid in descendants(child.pid) + [child.pid]:
            os.kill(pid, signal.SIGKILL)
        child.wait()
