"""Ctrl-C during ``privfed simulate`` / ``privfed resume``: stop within seconds, lose nothing.

See :func:`ctrl_c_stops`. Imported by the launcher only once a run starts (it names Flower's
and Ray's internals, and those are imported by then anyway).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

from rich.console import Console

from common.progress import StatusLine
from common.textsafe import console_text
from server.workflow import StopRequest


def interrupted_text(run_dir: Path) -> str:
    """What Ctrl-C kept, and the command that goes on (cli.py then says "interrupted")."""
    from server.run_files import read_metrics

    if not (run_dir / "config.toml").is_file():
        return "stopped before the run started: nothing to resume"
    lines = read_metrics(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").is_file() else []
    done = max((int(m["round"]) for m in lines), default=0)
    kept = f"stopped after round {done}: its ledger rows and checkpoint are on disk" if done else "stopped in round 1"
    where = console_text(str(run_dir))
    return (
        f"{kept}; the round in progress was abandoned (a site's spend in it is ledgered on resume)\n"
        f"run dir: {where}\n"
        f"continue with: [bold]privfed resume {where}[/]"
    )


@contextlib.contextmanager
def ctrl_c_stops(
    stop: StopRequest, console: Console, status: StatusLine, run_dir: Path, forget_unstarted: Callable[[], None]
) -> Iterator[None]:
    """Ctrl-C (SIGINT, to the process or its group) during run_simulation: stop within seconds.

    Python's default, a KeyboardInterrupt in the main thread, hangs the process. The main
    thread is then inside Flower's simulation engine, which shuts Ray down while Flower's
    worker threads (a concurrent.futures pool, not daemons) are still blocked in ``ray.get``
    on a site's task; they never return, and the interpreter waits for them at exit
    (threading._shutdown). Meanwhile the ServerApp thread waits forever for the round's replies.

    So the handler raises nothing: it asks the ServerApp thread to stop (:class:`StopRequest`;
    it leaves the round at its next wait and closes the ledger), then a helper thread cancels
    the sites' running tasks, after which Flower's engine ends as after a finished run.
    A second Ctrl-C exits at once; so does the helper, once the ledger is closed, if
    Flower or Ray still hold the process after a few seconds (e.g. Ctrl-C during Ray's own start).
    Either exit is as safe as a finished round: each round's ledger rows are one committed
    transaction, the checkpoint is replaced atomically, each metrics line is fsynced.
    ``forget_unstarted()`` removes the run dir of a run that never started (the launcher's rule),
    before such an exit.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread can handle signals (e.g. the launcher called from a thread)
        return
    released = threading.Event()  # run_simulation has returned: the normal way out

    def hard_exit(why: str) -> None:
        status.close()
        end_ray_processes()
        forget_unstarted()
        console.print(f"[yellow]{why}[/]")
        console.print(interrupted_text(run_dir))
        console.print("interrupted")
        console.file.flush()
        os._exit(130)

    def stopper() -> None:
        # The ServerApp leaves its wait within a tenth of a second; the final checks, if the
        # run was past its last round, take a few seconds and are let finish (the summary).
        while not stop.server_done.wait(0.1):
            if released.is_set():  # run_simulation ended before the ServerApp ran at all
                return
        # Flower logs each cancelled task as a site's failure: it is not one.
        flwr_logger.disabled = True
        cancel_site_tasks()
        if not released.wait(STOP_GRACE_SECONDS):
            # A non-daemon thread of Flower's or Ray's that cannot be told to stop (e.g. Ray
            # still starting): the ledger is closed, so exiting now loses nothing.
            hard_exit("Ray is still starting or stopping: exiting now (the run's files are complete)")

    stoppers: list[threading.Thread] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        if stop.requested.is_set():
            hard_exit("second Ctrl-C: stopping at once")
        stop.requested.set()
        status.detail("Ctrl-C: stopping after the current step (Ctrl-C again: at once)")
        stoppers.append(threading.Thread(target=stopper, name="privfed-stopper", daemon=True))
        stoppers[-1].start()

    flwr_logger = logging.getLogger("flwr")
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        released.set()
        signal.signal(signal.SIGINT, previous)
        for thread in stoppers:
            thread.join()  # it returns at once now: nothing is left for it to wait for
        flwr_logger.disabled = False


# After the ServerApp stopped on Ctrl-C: how long Flower's engine and Ray get to shut down
# (about 2 s: Flower's workers poll every second, then ray.shutdown, which waits up to 1 s per
# process type) before the process exits anyway. 3 s was too tight on a loaded 2-core machine
# (a CI run's stop would end on this deadline); a user who will not wait presses Ctrl-C again.
STOP_GRACE_SECONDS = 10.0


def cancel_site_tasks() -> None:
    """Kill the Ray actors still running a site's task for the abandoned round.

    Flower's worker threads wait for those tasks in ``ray.get``, with no timeout and no
    way to be told to stop; a killed actor makes ``ray.get`` raise at once, and the
    worker thread then sees Flower's stop flag and ends. Flower keeps its actor pool to
    itself, so it is found among live objects; if Flower's internals change and it is not
    found, the stopper's grace period still ends the process.
    """
    import gc

    try:
        import ray
        from flwr.simulation.ray_transport.ray_actor import BasicActorPool
    except ImportError:
        return
    for pool in [o for o in gc.get_objects() if type(o) is BasicActorPool]:
        busy = getattr(pool, "_future_to_actor", {})
        for actor in list(busy.values()):
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001  (already dead, or Ray already shut down: nothing to cancel)
                pass


def end_ray_processes() -> None:
    """SIGKILL every process below this one (Ray's GCS, raylet, agents, site workers).

    Only before an exit that skips ``ray.shutdown``: Ray's raylet and GCS die with their
    parent, but its dashboard and runtime-env agents outlive it, orphaned. A site worker
    killed mid-round is a lost reply, which the protocol is built for (its state file is
    replaced atomically; its spend is ledgered on resume). Linux (/proc) only; elsewhere nothing.
    """
    for pid in descendants(os.getpid()):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Ray starts its own process groups, so killpg would miss them)."""
    children: dict[int, list[int]] = {}
    proc = Path("/proc")
    for entry in proc.iterdir() if proc.is_dir() else ():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], list(children.get(pid, []))
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out
