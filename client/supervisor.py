"""The site's own SuperExec: a ClientApp starts only when its app is one the site approved.

How Flower runs a site's code (flwr 1.41): the SuperNode pulls each instruction and the
run's FAB (the app bundle ``flwr run`` submitted); a SuperExec takes the pending task and
starts ``flwr-clientapp``, which unpacks the FAB and imports the ClientApp from it. Whoever
can submit a run therefore chooses the code every site executes.

``privfed site join`` starts ``flower-supernode --isolation process``, so the SuperNode
starts no SuperExec of its own, and forks this module in its place (``python -m
client.supervisor``). It is Flower's SuperExec loop (``run_superexec``) with two changes,
each narrowing what Flower would do:

* it takes ClientApp tasks only (no agent, connector or model tasks, which would run other
  code from the same FAB);
* every task it starts runs ``privfed-clientapp`` (:func:`clientapp_main`) instead of
  ``flwr-clientapp``: Flower's own ClientApp runner, with its FAB installer replaced by a
  check. It hashes the bytes it actually received and refuses any FAB whose SHA-256 is not
  in the site's ``approved-apps`` (common.deploy.app_approval); Flower then sends the
  coordinator its usual error reply, whose text is the exception below (the FAB's own
  hash, which the coordinator chose; nothing of the site's). An approved FAB is not
  unpacked either: the ClientApp that runs is the site's own installed privfed
  (``client.app:app``), which ``privfed site approve`` checked builds to that very FAB. No
  code that arrived over the network is ever written to disk or imported at the site.

One more change is for speed, not safety: a **fork server**. Flower starts a fresh
ClientApp process for every message (train, evaluate), and each spends about 3-4 s of a
core importing torch and Opacus before it reads its task: most of a small deployed round,
and on a small site machine a core taken from training. The supervisor keeps one
``privfed-clientapp --fork-server`` process that imports the code once (nothing of the
site's data, no task, no token) and then, for each task, forks a child that runs exactly
what Flower would have run, with the arguments Flower would have put on its command line
(written to the server's stdin, so the token is not in the process list either). Each task
still runs in a process of its own that ends with it, through the same guard, and starts
from the server's memory: imported code, and the argument lines of earlier tasks (each
token good for its own, already claimed, task only), never data. The child reseeds what a
fresh interpreter seeds from the OS (NumPy's global generator, torch's default one, Python's
``random``), and privfed's own DP noise and sampling draw 128 fresh bits of OS entropy per
round (common/privacy/training.py) whatever process they run in.
A server imports only a checkout that builds to an approved app, and forks a task only while
the checkout still builds to what it imported and no library changed (an upgrade:
:func:`environment_fingerprint`); otherwise the task starts cold and a new server imports the
new code. Whenever the server cannot take a task in time (still importing, dead, hung,
stale), the task starts cold, well within the 30 s Flower gives it, and the site's log says
why in one line. ``PRIVFED_WARM_CLIENTAPP=0`` turns it off (it holds about 400 MB of
memory while it waits; its children share those pages until they write to them). A server
that dies within 30 s three times in a row (a task it forked that ends cleanly clears the
count) is given up for 10 minutes: tasks start cold meanwhile, as Flower starts them.

Forking after importing torch is safe only while the importing process has not run a
parallel (OpenMP) region: a child of a process that did can hang in its first one. The
server therefore only imports; ``tests/unit/test_fork_server.py`` forks from a process that
imported ``client.app`` and trains in the child, so an import that starts computing fails
a test rather than a site's round. A GPU site is unaffected: importing torch does not
initialise CUDA, and each child initialises its own.

Both changes go through Flower's module attributes (``TASK_TYPE_TO_COMMAND``,
``AutoExecPlugin.supported_task_types``, ``run_clientapp.install_from_fab``,
``run_superexec.get_executor``). If a Flower release renames them, this module refuses to
start rather than run unguarded.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import random
import select
import subprocess
import sys
import sysconfig
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from common.deploy.app_approval import fab_hash_of, parse_approved

APPROVED_ENV = "PRIVFED_APPROVED_APPS"  # how the supervisor hands the pins to the runner it starts
CLIENTAPP_SCRIPT = "privfed-clientapp"
FORK_FLAG = "--fork-server"  # privfed-clientapp's one own flag, with the fd it reports on
WARM_ENV = "PRIVFED_WARM_CLIENTAPP"  # "0": no fork server, every task starts cold
_imported_hash: str | None = None  # a fork server (and its children): the app's hash when it imported it
CHANGED_WHILE_IMPORTING = "the checkout changed while the fork server imported it"  # matches no FAB hash
NOTHING_IMPORTED = 3  # a fork server's exit code when it imported nothing (unapproved checkout, failed import)
INSTALLED_ROOT = Path(__file__).resolve().parents[1]  # the site's own privfed checkout


class AppNotApproved(Exception):
    """The FAB this site received is not one of its approved apps. The text reaches the
    coordinator (Flower's error reply): it holds the FAB's hash only, which the coordinator
    itself chose, never anything of the site's."""

    def __init__(self, fab_hash: str) -> None:
        super().__init__(
            f"app not approved by this site (fab-hash {fab_hash[:16]}); the site runs only the apps in its "
            "approved-apps (privfed site approve)"
        )


class InstalledAppDiffers(Exception):
    """The run's app is approved, but the privfed installed at this site no longer builds to
    it (its checkout changed since the approval): the site runs only code it approved."""

    def __init__(self, fab_hash: str) -> None:
        super().__init__(
            f"the app installed at this site is not the run's app (fab-hash {fab_hash[:16]}); the site runs only "
            "the approved code"
        )


def installed_app_hash() -> str:
    """The hash of the FAB this site's installed privfed checkout builds to (what runs here)."""
    from common.deploy.app_approval import build_fab

    return fab_hash_of(build_fab(INSTALLED_ROOT))


class UnguardedFlower(RuntimeError):
    """This Flower release lacks an attribute the guard wraps: refuse rather than run unguarded."""


def clientapp_script() -> str:
    """The ``privfed-clientapp`` console script installed beside this Python."""
    path = Path(sys.executable).with_name(CLIENTAPP_SCRIPT)
    if not path.is_file():
        raise UnguardedFlower(f"{CLIENTAPP_SCRIPT} is not installed beside {sys.executable} (make install)")
    return str(path)


def _require(obj: Any, name: str) -> Any:
    if not hasattr(obj, name):
        raise UnguardedFlower(f"flwr has no {getattr(obj, '__name__', obj)}.{name}: this Flower is not the tested one")
    return getattr(obj, name)


def guard_runner(approved: frozenset[str]) -> None:
    """Wrap Flower's ClientApp runner: it checks the FAB's hash, never unpacks it, and runs
    the site's own installed ClientApp (``client.app:app``, as this site's pyproject names it)."""
    import flwr.supernode.runtime.run_clientapp as runner

    _require(runner, "install_from_fab")
    _require(runner, "get_project_dir")
    _require(runner, "get_load_client_app_fn")

    def check_only(content: bytes, *args: Any, **kwargs: Any) -> None:
        fab_hash = fab_hash_of(content)
        if fab_hash not in approved:
            print(f"privfed: refused app {fab_hash}: not in this site's approved-apps", file=sys.stderr)
            raise AppNotApproved(fab_hash)
        # Approved: nothing is unpacked. The code that runs is the site's installed privfed,
        # rebuilt here (0.1 s) so that it is exactly this FAB, not a checkout edited since.
        installed = installed_app_hash()
        if installed != fab_hash:
            print(f"privfed: refused app {fab_hash}: the installed privfed builds to {installed}", file=sys.stderr)
            raise InstalledAppDiffers(fab_hash)
        # A fork server imported the code before this check: it runs only if that code was
        # this FAB too (the checkout did not change while it waited).
        if _imported_hash is not None and _imported_hash != fab_hash:
            print(f"privfed: refused app {fab_hash}: this process imported privfed before it changed", file=sys.stderr)
            raise InstalledAppDiffers(fab_hash)

    def installed_app(*args: Any, **kwargs: Any) -> Any:
        def load(fab_id: str, fab_version: str, fab_hash: str) -> Any:
            from client.app import app

            return app

        return load

    # setattr: these are Flower's module globals, looked up when run_clientapp runs.
    setattr(runner, "install_from_fab", check_only)  # noqa: B010
    setattr(runner, "get_project_dir", lambda *args, **kwargs: INSTALLED_ROOT)  # noqa: B010
    setattr(runner, "get_load_client_app_fn", installed_app)  # noqa: B010


def clientapp_main() -> None:
    """``privfed-clientapp``: Flower's ``flwr-clientapp`` with the approved-app check (same
    flags); with ``--fork-server FD`` alone, a server that imports first and forks one such
    ClientApp per task it reads on stdin (:func:`serve_forks`)."""
    approved = frozenset(parse_approved(os.environ.get(APPROVED_ENV, "")))
    guard_runner(approved)
    if len(sys.argv) == 3 and sys.argv[1] == FORK_FLAG and sys.argv[2].isdigit():
        raise SystemExit(serve_forks(sys.stdin.fileno(), int(sys.argv[2]), approved))
    run_clientapp(sys.argv[1:])


def run_clientapp(args: list[str]) -> None:
    """Flower's ClientApp runner with ``args`` as its command line (the guard already installed)."""
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    sys.argv = [sys.argv[0], *args]
    flwr_clientapp()


def import_ahead(approved: frozenset[str]) -> str | None:
    """What a fork server does before its first task: import what every task imports, if the
    checkout builds to an approved app and is the same after the import as before it. The
    hash it imported (or :data:`CHANGED_WHILE_IMPORTING`), or None when it imported nothing: a
    checkout the site has not approved runs no code here before a task's check, and an import
    that fails is left for a cold start, whose failure becomes Flower's error reply."""
    try:  # a checkout mid-`git pull` can lack a file between listing and reading it
        before = installed_app_hash()
        if before not in approved:
            return None
        import client.app  # noqa: F401  (torch, Opacus, Flower: the seconds this process is for)

        return before if installed_app_hash() == before else CHANGED_WHILE_IMPORTING
    except Exception:
        return None


class _Lines:
    """Whole lines from a pipe's fd, read without blocking past what ``select`` saw."""

    def __init__(self, fd: int) -> None:
        self.fd, self.buffer, self.closed = fd, b"", False

    def ready(self, timeout: float) -> list[str]:
        if not self.closed and select.select([self.fd], [], [], timeout)[0]:
            chunk = os.read(self.fd, 65536)
            self.closed = not chunk
            self.buffer += chunk
        *lines, self.buffer = self.buffer.split(b"\n")
        return [line.decode("utf-8", "replace") for line in lines]


def environment_fingerprint() -> tuple[object, ...]:
    """What the app hash does not cover: the installed distributions (name and version) and
    when each library directory last had an entry added or removed (the interpreter's
    ``site-packages``, wherever it lies, and every ``sys.path`` directory outside the
    checkout). A ``pip install`` of another torch, Opacus or cryptography changes it. About
    60 ms, once per task."""
    root = str(INSTALLED_ROOT)
    paths = {sysconfig.get_paths()[key] for key in ("purelib", "platlib")}
    for entry in sys.path:
        path = os.path.abspath(entry or ".")
        if path != root and not path.startswith(root + os.sep):
            paths.add(path)
    stamps = []
    for path in sorted(paths):
        try:
            stamps.append((path, os.stat(path).st_mtime_ns))
        except OSError:
            stamps.append((path, -1))
    installed = sorted({(str(d.metadata["Name"]), d.version) for d in importlib.metadata.distributions()})
    return (tuple(stamps), tuple(installed))


def _task(line: str) -> tuple[list[str], float]:
    """One task line: Flower's arguments, and the supervisor's deadline to fork them by."""
    try:
        task = json.loads(line)
        args, deadline = task["args"], float(task["deadline"])
    except (ValueError, TypeError, KeyError):
        args = None
    if not (isinstance(args, list) and all(isinstance(a, str) for a in args)):
        raise SystemExit("privfed-clientapp --fork-server: stdin did not hold a task (JSON: args, deadline)")
    return args, deadline


def _current(imported: str, libraries: tuple[object, ...]) -> bool:
    """The checkout still builds to what was imported, and no library changed."""
    try:
        return installed_app_hash() == imported and environment_fingerprint() == libraries
    except Exception:  # mid-`git pull` or mid-`pip install`: not known to be current
        return False


def serve_forks(
    commands: int,
    status: int,
    approved: frozenset[str],
    *,
    prepare: Callable[[frozenset[str]], str | None] = import_ahead,
    run: Callable[[list[str]], None] = run_clientapp,
) -> int:
    """A fork server's life: ``prepare`` (import ahead), then one forked ``run(args)`` per line
    of ``commands`` (JSON: ``args``, Flower's arguments, and ``deadline``), until it closes.

    On ``status`` it writes one line per event: ``ready`` once imported, ``started PID`` after
    each fork, ``exited PID CODE`` when a child ends, ``late`` for a task whose deadline (the
    supervisor's, on the system-wide monotonic clock) passed before it could fork it, and
    ``stale`` before it exits when the checkout no longer builds to what it imported or a
    library changed (an upgrade: :func:`environment_fingerprint`). A late or stale task is
    the supervisor's to start cold: past its deadline the supervisor may already have. It
    exits at once, with :data:`NOTHING_IMPORTED`, if it imported nothing (an unapproved
    checkout, a failed import): it would only fork cold starts. Children that still run when
    it exits are left to end by themselves, as Flower leaves its own ClientApp processes
    (each watches its ``--parent-pid``).
    """
    global _imported_hash
    _imported_hash = prepare(approved)
    if _imported_hash is None or _imported_hash == CHANGED_WHILE_IMPORTING:
        return NOTHING_IMPORTED
    libraries = environment_fingerprint()
    os.write(status, b"ready\n")
    print(f"privfed: ClientApp fork server ready (app {_imported_hash[:16]})", file=sys.stderr, flush=True)
    reader = _Lines(commands)
    while True:
        while True:  # reap: the children are this process's, not the supervisor's
            try:
                pid, wait_status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            os.write(status, f"exited {pid} {os.waitstatus_to_exitcode(wait_status)}\n".encode())
        for line in reader.ready(0.2):
            args, deadline = _task(line)
            if not _current(_imported_hash, libraries):
                os.write(status, b"stale\n")
                return 0
            if time.monotonic() >= deadline:
                os.write(status, b"late\n")
                continue
            pid = os.fork()
            if pid == 0:
                _forked_task(args, (commands, status), run)
            os.write(status, f"started {pid}\n".encode())
        if reader.closed:
            return 0


def _forked_task(args: list[str], server_fds: tuple[int, ...], run: Callable[[list[str]], None]) -> NoReturn:
    """The child: one task, then ``os._exit`` (never the server's loop, atexit or buffers)."""
    code = 1
    try:
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)  # the server's command pipe is not the task's to read
        for fd in {devnull, *server_fds} - {0, 1, 2}:
            os.close(fd)  # nor its status pipe: the supervisor sees the server's end, not ours
        # What a fresh interpreter seeds from the OS, reseeded from the OS, not the server's
        # state: NumPy's global generator, torch's default one, Python's random (CPython does
        # that at fork too). Python's hash seed stays the server's: it is fixed at start-up.
        import numpy as np

        np.random.seed()
        random.seed()
        if "torch" in sys.modules:
            sys.modules["torch"].seed()
        run(args)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)


def clientapp_args(spec: Any) -> list[str]:
    """The arguments Flower's ``SubprocessExecutor`` gives a ClientApp process for ``spec``
    (an ``ExecutionSpec``), after the command: the same flags, in the same order."""
    from flwr.supercore.constant import TASK_TYPE_TO_APPIO_API_ADDRESS_ARG

    args = [TASK_TYPE_TO_APPIO_API_ADDRESS_ARG[spec.task_type], spec.runtime_api_address, "--token", spec.token]
    if spec.insecure:
        args.append("--insecure")
    elif spec.root_certificates_path is not None:
        args += ["--root-certificates", spec.root_certificates_path]
    if spec.parent_pid is not None:
        args += ["--parent-pid", str(spec.parent_pid)]
    if spec.runtime_dependency_install:
        args.append("--allow-runtime-dependency-installation")
    return args


class ForkServerExecutor:
    """Flower's subprocess executor, with each ClientApp process forked from one that imported
    the code ahead (the module's docstring says why). Capacity and output are as Flower's:
    tasks are never refused for capacity, and their output goes where the supervisor's goes.
    Whenever the server cannot take a task, the task starts cold, exactly as Flower starts it,
    and the site's own log says why (one line, never sent anywhere)."""

    # A server that dies within QUICK_SECONDS this often in a row is given up for RETRY_SECONDS
    # (one of its tasks ending cleanly clears the count).
    MAX_QUICK_DEATHS = 3
    QUICK_SECONDS = 30.0
    RETRY_SECONDS = 600.0
    # A task goes to the server only once it is ready (imported): a launch waits up to
    # READY_WAIT_SECONDS for that (a cold start would import too), then up to
    # FORK_WAIT_SECONDS for the fork, the server refusing to fork past that deadline. Both stay
    # well under the 30 s Flower gives a claimed task to start, so a cold fallback is in time.
    READY_WAIT_SECONDS = 15.0
    FORK_WAIT_SECONDS = 5.0
    MARGIN_SECONDS = 1.0  # past the deadline, before the supervisor stops waiting for the server

    def __init__(self, command: list[str]) -> None:
        from flwr.supercore.superexec.executor import SubprocessExecutor

        self._flower = SubprocessExecutor()  # capacity answers: Flower's own
        self.command = command
        self.server: subprocess.Popen | None = None
        self._status: _Lines | None = None
        self._ready = False
        self.cold: list[subprocess.Popen] = []  # tasks started cold, not yet seen to end
        self.forked: set[int] = set()  # tasks the server forked, not yet reported ended
        self._server_started = 0.0
        self._given_up_at: float | None = None
        self.quick_deaths = 0
        self._start_server()

    def _start_server(self) -> None:
        if self.quick_deaths >= self.MAX_QUICK_DEATHS:
            if self._given_up_at is None:
                self._given_up_at = time.monotonic()
                _site_log(
                    f"the ClientApp fork server died {self.quick_deaths} times within {self.QUICK_SECONDS:.0f} s; "
                    f"tasks start cold, and it is tried again in {self.RETRY_SECONDS / 60:.0f} min"
                )
            if time.monotonic() - self._given_up_at < self.RETRY_SECONDS:
                return
            self._given_up_at, self.quick_deaths = None, self.MAX_QUICK_DEATHS - 1  # one more try
        read, write = os.pipe()
        try:
            self.server = subprocess.Popen(
                [*self.command, FORK_FLAG, str(write)], stdin=subprocess.PIPE, pass_fds=(write,), text=True
            )
        finally:
            os.close(write)
        self._status, self._ready = _Lines(read), False
        self._server_started = time.monotonic()

    def get_eligible_capacity(self, supported_task_types: Any, **kwargs: Any) -> Any:
        return self._flower.get_eligible_capacity(supported_task_types, **kwargs)

    def wait_for_capacity(self, task_type: Any = None, **kwargs: Any) -> None:
        self._flower.wait_for_capacity(task_type, **kwargs)

    def launch(self, spec: Any) -> Any:
        from flwr.supercore.superexec.executor import LaunchResult

        args = clientapp_args(spec)
        why = self._fork(args)
        if why:
            if self._given_up_at is None:  # given up: said once, not per task
                _site_log(f"a ClientApp task started cold: {why}")
            self.cold.append(subprocess.Popen([*self.command, *args]))  # cold, exactly as Flower starts it
        return LaunchResult.accepted()

    def _fork(self, args: list[str]) -> str:
        """Hand ``args`` to the server: "" once it says it forked them, else why not."""
        if self.server is None:
            return "the fork server is not running"
        if not self._ready:  # the task is not sent until the import is done: nothing to take back
            until = time.monotonic() + self.READY_WAIT_SECONDS
            while not self._ready and self._status is not None and not self._status.closed:
                if time.monotonic() >= until:
                    return "the fork server was still importing (it is left to finish)"
                self._events(0.1)
            if not self._ready:
                return self._lost("before it was ready")
        server = self.server
        assert server is not None and server.stdin is not None
        deadline = time.monotonic() + self.FORK_WAIT_SECONDS
        try:
            server.stdin.write(json.dumps({"args": args, "deadline": deadline}) + "\n")
            server.stdin.flush()
        except OSError:  # it died before or during the write
            return self._lost("before it took the task")
        while time.monotonic() < deadline + self.MARGIN_SECONDS:
            for event in self._events(0.1):
                if event == "started":
                    return ""
                if event == "late":  # alive but slow: it forked nothing, and keeps serving
                    return f"the fork server could not fork it within {self.FORK_WAIT_SECONDS:.0f} s"
                if event == "stale":  # a new server imports the new code
                    self._server_gone(died=False)
                    return "the checkout or its libraries changed since the fork server imported them"
            if self._status is None or self._status.closed:
                return self._lost("while it took the task")
        # No answer: it hangs. Past its deadline it forks nothing more; stopped, it says no
        # more, and if its last words were a fork the task runs there (a cold start would only
        # race it for the same token).
        server.kill()
        drained = time.monotonic() + 2.0
        while self._status is not None and not self._status.closed and time.monotonic() < drained:
            if "started" in self._events(0.2):
                self._server_gone(died=True)
                return ""
        self._server_gone(died=True)
        return f"the fork server did not answer within {self.FORK_WAIT_SECONDS + self.MARGIN_SECONDS:.0f} s"

    def _lost(self, when: str) -> str:
        """The server's status pipe closed: it exited. Why, for the site's log."""
        code = self._server_gone(died=True)
        return f"the fork server exited {when} ({_exit_reason(code)})"

    def _events(self, timeout: float) -> list[str]:
        """The server's status lines so far, "started PID" as "started"; forks, task ends and
        readiness are recorded here."""
        if self._status is None:
            return []
        events = []
        for line in self._status.ready(timeout):
            parts = line.split()
            if len(parts) == 3 and parts[0] == "exited" and parts[1].isdigit():
                self.forked.discard(int(parts[1]))
                if parts[2] == "0":
                    self.quick_deaths = 0  # one of its tasks ended cleanly: the checkout imports (again)
            elif len(parts) == 2 and parts[0] == "started" and parts[1].isdigit():
                self.forked.add(int(parts[1]))
                events.append("started")
            elif line == "ready":
                self._ready = True
            else:
                events.append(line)
        return events

    def _server_gone(self, died: bool) -> int | None:
        """Forget the server (stopping it if it still runs); its exit code when known."""
        server, self.server = self.server, None
        code = None
        if server is not None:
            if died and time.monotonic() - self._server_started < self.QUICK_SECONDS:
                self.quick_deaths += 1
            try:
                code = server.wait(timeout=0.5 if died else 5)  # one that said "stale" is on its way out
            except subprocess.TimeoutExpired:
                server.kill()
                try:
                    code = server.wait(timeout=5)
                except subprocess.TimeoutExpired:  # unkillable for now (stuck in the kernel): not waited for
                    pass
            if server.stdin is not None:
                try:
                    server.stdin.close()
                except OSError:
                    pass
        if self._status is not None:
            os.close(self._status.fd)
            self._status = None
        # Tasks it forked run on by themselves, no longer reported: a new server's import may
        # overlap their last seconds, which is all that is lost by forgetting them.
        self.forked.clear()
        return code

    def reconcile(self) -> None:
        """Between task polls (every second): take the server's reports, reap cold tasks, and
        start a server if there is none. A new server imports while tasks may run (once,
        about 3-4 s of a core): cheaper than starting every later task cold."""
        self._events(0)
        if self.server is not None and self.server.poll() is not None:
            self._events(0)  # what it said before it died
            code = self._server_gone(died=True)
            _site_log(f"the ClientApp fork server exited ({_exit_reason(code)})")
        self.cold = [task for task in self.cold if task.poll() is None]
        if self.server is None:
            self._start_server()

    def close(self) -> None:
        """At the supervisor's exit: the server reads end-of-input and exits; its running
        tasks end by themselves, as Flower's cold ClientApp processes do."""
        server = self.server
        if server is None:
            return
        try:
            assert server.stdin is not None
            server.stdin.close()
            server.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            server.kill()
        self._server_gone(died=False)


def _exit_reason(code: int | None) -> str:
    if code == NOTHING_IMPORTED:
        return "it imported nothing: the checkout does not build to an approved app, or its import failed"
    return f"exit code {code}" if code is not None else "still stopping"


def _site_log(line: str) -> None:
    """One line in the site's own log (the SuperNode's output): never in a reply."""
    print(f"privfed: {line}", file=sys.stderr, flush=True)


def supervise(runtime_api_address: str, parent_pid: int | None, approved: tuple[str, ...]) -> None:
    """Run Flower's SuperExec loop, narrowed to ClientApp tasks that start through the guard."""
    import flwr.supercore.superexec.run_superexec as superexec
    from flwr.supercore import constant
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec.plugin.base_exec_plugin import AutoExecPlugin
    from flwr.supercore.superexec.run_superexec import run_superexec

    commands = _require(constant, "TASK_TYPE_TO_COMMAND")
    _require(AutoExecPlugin, "supported_task_types")
    _require(superexec, "get_executor")
    script = clientapp_script()
    os.environ[APPROVED_ENV] = ",".join(approved)
    for task_type in list(commands):  # whatever a task asks for, the guarded runner is what starts
        commands[task_type] = script
    AutoExecPlugin.supported_task_types = frozenset({TaskType.CLIENT_APP})
    if os.environ.get(WARM_ENV, "1") != "0":
        setattr(superexec, "get_executor", lambda *args, **kwargs: ForkServerExecutor([script]))  # noqa: B010
    run_superexec(
        runtime_api_address=runtime_api_address,
        insecure=True,  # the SuperNode's runtime API listens on loopback, as Flower's own SuperExec dials it
        parent_pid=parent_pid,
        runtime_dependency_install=False,  # the site's environment is the one it installed and reviewed
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m client.supervisor", description=__doc__.split("\n")[0])
    parser.add_argument("--runtime-api-address", required=True, help="the SuperNode's runtime API (host:port)")
    parser.add_argument("--parent-pid", type=int, default=None, help="exit when this process (the SuperNode) does")
    parser.add_argument("--approved-apps", required=True, help="comma-separated SHA-256 hashes of approved FABs")
    args = parser.parse_args(argv)
    supervise(args.runtime_api_address, args.parent_pid, parse_approved(args.approved_apps))


if __name__ == "__main__":
    main()
