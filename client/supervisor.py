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

Both changes go through Flower's module attributes (``TASK_TYPE_TO_COMMAND``,
``AutoExecPlugin.supported_task_types``, ``run_clientapp.install_from_fab``). If a Flower
release renames them, this module refuses to start rather than run unguarded.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from common.deploy.app_approval import fab_hash_of, parse_approved

APPROVED_ENV = "PRIVFED_APPROVED_APPS"  # how the supervisor hands the pins to the runner it starts
CLIENTAPP_SCRIPT = "privfed-clientapp"
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
    """``privfed-clientapp``: Flower's ``flwr-clientapp`` with the approved-app check (same flags)."""
    approved = frozenset(parse_approved(os.environ.get(APPROVED_ENV, "")))
    guard_runner(approved)
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    flwr_clientapp()


def supervise(runtime_api_address: str, parent_pid: int | None, approved: tuple[str, ...]) -> None:
    """Run Flower's SuperExec loop, narrowed to ClientApp tasks that start through the guard."""
    from flwr.supercore import constant
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec.plugin.base_exec_plugin import AutoExecPlugin
    from flwr.supercore.superexec.run_superexec import run_superexec

    commands = _require(constant, "TASK_TYPE_TO_COMMAND")
    _require(AutoExecPlugin, "supported_task_types")
    script = clientapp_script()
    os.environ[APPROVED_ENV] = ",".join(approved)
    for task_type in list(commands):  # whatever a task asks for, the guarded runner is what starts
        commands[task_type] = script
    AutoExecPlugin.supported_task_types = frozenset({TaskType.CLIENT_APP})
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
