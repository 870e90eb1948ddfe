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

One more change is for speed, not safety: a **warm spare**. Flower starts a fresh
ClientApp process for every message (train, evaluate), and each spends about 4 s of a
core importing torch and Opacus before it reads its task: most of a small deployed round.
The supervisor keeps one ``privfed-clientapp --warm`` process started ahead of time; it
imports the code (nothing of the site's data, no task, no token) and waits on its stdin.
When a task comes, the supervisor writes the task's arguments to that stdin, exactly the
arguments Flower would have put on the command line (so the token is not in the process
list either); the next spare starts once no task runs, so that its import never competes
with training. Each task still runs in a process of its own that ends with it, through the
same guard. A spare imports ahead only a checkout that builds to an approved app, and
refuses its task if the checkout changed since (:func:`await_task`).
``PRIVFED_WARM_CLIENTAPP=0`` turns the spare off (it holds about 400 MB of memory while it
waits). A spare that dies within 30 s three times in a row (one that serves a task clears
the count) is given up: tasks then start cold, as Flower starts them, until the site restarts.

Both changes go through Flower's module attributes (``TASK_TYPE_TO_COMMAND``,
``AutoExecPlugin.supported_task_types``, ``run_clientapp.install_from_fab``,
``run_superexec.get_executor``). If a Flower release renames them, this module refuses to
start rather than run unguarded.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

from common.deploy.app_approval import fab_hash_of, parse_approved

APPROVED_ENV = "PRIVFED_APPROVED_APPS"  # how the supervisor hands the pins to the runner it starts
CLIENTAPP_SCRIPT = "privfed-clientapp"
WARM_FLAG = "--warm"  # privfed-clientapp's one own flag: import, then wait for a task on stdin
WARM_ENV = "PRIVFED_WARM_CLIENTAPP"  # "0": no warm spare, every task starts cold
_imported_hash: str | None = None  # a warm spare: the installed app's hash when it imported it
CHANGED_WHILE_IMPORTING = "the checkout changed while a warm spare imported it"  # matches no FAB hash
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
        # A warm spare imported the code before this check: it runs only if that code was
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
    flags); with ``--warm`` alone, a spare that imports first and reads those flags from stdin."""
    approved = frozenset(parse_approved(os.environ.get(APPROVED_ENV, "")))
    guard_runner(approved)
    if sys.argv[1:] == [WARM_FLAG]:
        args = await_task(sys.stdin, approved)
        if args is None:
            return  # the supervisor stopped before it had a task for this spare
        sys.argv = [sys.argv[0], *args]
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    flwr_clientapp()


def await_task(stdin: IO[str], approved: frozenset[str]) -> list[str] | None:
    """A warm spare's wait: import what every task imports, then read the task's arguments
    (one JSON list of strings) from ``stdin``; None when it closes without one.

    It imports only a checkout that builds to an approved app (a checkout the site has not
    approved yet runs no code here before a task's check), and only if the checkout is the
    same after the import as before it. Otherwise, or if the import fails, it imports
    nothing ahead: the task then loads the code as a cold start does, inside Flower's
    runner, so a failure becomes Flower's error reply to the coordinator, not a lost task.
    """
    global _imported_hash
    before = installed_app_hash()
    if before in approved:
        try:
            import client.app  # noqa: F401  (torch, Opacus, Flower: the seconds this process is for)
        except Exception:  # the task's own load reports it
            pass
        else:
            # Changed while importing: what was imported is not known to be any approved app.
            _imported_hash = before if installed_app_hash() == before else CHANGED_WHILE_IMPORTING

    line = stdin.readline()
    if not line:
        return None
    try:
        args = json.loads(line)
    except ValueError:
        args = None
    if not (isinstance(args, list) and all(isinstance(a, str) for a in args)):
        raise SystemExit("privfed-clientapp --warm: stdin did not hold a JSON list of arguments")
    return args


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


class WarmSpareExecutor:
    """Flower's subprocess executor, with one ClientApp process started before its task (the
    module's docstring says why). Capacity, output and reaping are as Flower's: tasks are
    never refused for capacity, and their output goes where the supervisor's goes."""

    # A spare that dies within QUICK_SECONDS this often in a row is given up until one serves a task.
    MAX_QUICK_DEATHS = 3
    QUICK_SECONDS = 30.0

    def __init__(self, command: list[str]) -> None:
        from flwr.supercore.superexec.executor import SubprocessExecutor

        self._flower = SubprocessExecutor()  # capacity answers: Flower's own
        self.command = command
        self.spare: subprocess.Popen | None = None
        self.tasks: list[subprocess.Popen] = []  # started, not yet seen to end
        self._warm_pids: set[int] = set()  # those of them that were spares
        self._spare_started = 0.0
        self.quick_deaths = 0
        self._start_spare()

    def _start_spare(self) -> None:
        if self.quick_deaths >= self.MAX_QUICK_DEATHS:
            self.spare = None
            return
        self.spare = subprocess.Popen([*self.command, WARM_FLAG], stdin=subprocess.PIPE, text=True)
        self._spare_started = time.monotonic()

    def get_eligible_capacity(self, supported_task_types: Any, **kwargs: Any) -> Any:
        return self._flower.get_eligible_capacity(supported_task_types, **kwargs)

    def wait_for_capacity(self, task_type: Any = None, **kwargs: Any) -> None:
        self._flower.wait_for_capacity(task_type, **kwargs)

    def launch(self, spec: Any) -> Any:
        from flwr.supercore.superexec.executor import LaunchResult

        args = clientapp_args(spec)
        spare, self.spare = self.spare, None
        if spare is not None and self._hand_over(spare, args):
            self.tasks.append(spare)
            self._warm_pids.add(spare.pid)
        else:
            self.tasks.append(subprocess.Popen([*self.command, *args]))  # cold, exactly as Flower starts it
        return LaunchResult.accepted()

    def _hand_over(self, spare: subprocess.Popen, args: list[str]) -> bool:
        if spare.poll() is not None:
            self._note_death()
            return False
        assert spare.stdin is not None
        try:
            spare.stdin.write(json.dumps(args) + "\n")
            spare.stdin.close()
        except OSError:  # it died between the poll and the write
            self._note_death()
            return False
        return True

    def _note_death(self) -> None:
        if time.monotonic() - self._spare_started < self.QUICK_SECONDS:
            self.quick_deaths += 1

    def reconcile(self) -> None:
        """Between task polls (every second): once no task runs, a spare is started, so that
        its import never competes with a task's training for the site's cores; it runs in
        the gap before the next message (the SuperNode's 3 s poll, the server's aggregation).
        A spare that died while waiting (killed, out of memory) is replaced."""
        if self.spare is not None and self.spare.poll() is not None:
            self._note_death()
            self.spare = None
        running: list[subprocess.Popen] = []
        for task in self.tasks:
            code = task.poll()
            if code is None:
                running.append(task)
            elif code == 0 and task.pid in self._warm_pids:
                self.quick_deaths = 0  # a spare served a task: the checkout imports (again)
        self.tasks = running
        self._warm_pids &= {t.pid for t in running}
        if self.spare is None and not self.tasks:
            self._start_spare()

    def close(self) -> None:
        """At the supervisor's exit: the spare reads end-of-input and exits without a task."""
        spare, self.spare = self.spare, None
        if spare is None:
            return
        try:
            assert spare.stdin is not None
            spare.stdin.close()
            spare.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            spare.kill()


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
        setattr(superexec, "get_executor", lambda *args, **kwargs: WarmSpareExecutor([script]))  # noqa: B010
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
