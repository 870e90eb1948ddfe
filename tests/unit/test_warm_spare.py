"""The site's warm spare (client/supervisor.py): a ClientApp process started before its task,
handed the task's arguments on stdin, replaced once no task runs, given up if it keeps dying.

A stand-in command records what it was given, so no Flower or torch process starts here;
tests/integration/test_deployment.py runs the real one behind every deployed round."""

from __future__ import annotations

import io
import json
import sys
import time
from pathlib import Path

import pytest
from flwr.supercore.constant import TaskType
from flwr.supercore.superexec.executor import ExecutionSpec, LaunchResultStatus

from client import supervisor
from client.supervisor import WARM_FLAG, WarmSpareExecutor, await_task, clientapp_args

# The stand-in ClientApp: with --warm it waits for one line on stdin and records it (or
# "eof"); started cold it records its arguments. Each process writes its own file.
STAND_IN = """
import json, os, sys, time
out = os.path.join(sys.argv[1], str(os.getpid()))
if sys.argv[2:] == ["--warm"]:
    line = sys.stdin.readline()
    if line:
        time.sleep(0.5)  # a task that takes a while: no spare may start meanwhile
    open(out, "w").write(json.dumps({"warm": json.loads(line) if line else "eof"}))
else:
    open(out, "w").write(json.dumps({"cold": sys.argv[2:]}))
"""


def _spec(token: str = "t0ken-of-the-task") -> ExecutionSpec:
    return ExecutionSpec(
        task_type=TaskType.CLIENT_APP,
        runtime_api_address="127.0.0.1:9094",
        token=token,
        insecure=True,
        root_certificates_path=None,
        runtime_dependency_install=False,
        parent_pid=4242,
        suppress_output=False,
        task_id=7,
    )


def _records(folder: Path, pid: int, timeout: float = 20) -> dict:
    path = folder / str(pid)
    deadline = time.monotonic() + timeout
    while not (path.is_file() and path.read_text()):
        assert time.monotonic() < deadline, f"process {pid} recorded nothing"
        time.sleep(0.05)
    return json.loads(path.read_text())


@pytest.fixture
def stand_in(tmp_path) -> tuple[list[str], Path]:
    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN)
    out = tmp_path / "out"
    out.mkdir()
    return [sys.executable, str(script), str(out)], out


def test_the_arguments_are_flowers(monkeypatch):
    """What the spare is handed is what Flower's SubprocessExecutor puts after the command."""
    import subprocess

    from flwr.supercore.superexec.executor import SubprocessExecutor

    seen: list[list[str]] = []
    monkeypatch.setattr(subprocess, "Popen", lambda args, **kw: seen.append(list(args)))
    tls = ExecutionSpec(**{**_spec().__dict__, "insecure": False, "root_certificates_path": "/ca.pem"})
    for spec in (_spec(), tls):
        SubprocessExecutor().launch(spec)
        assert seen[-1][1:] == clientapp_args(spec)


def test_a_task_goes_to_the_waiting_spare_and_the_next_spare_waits_for_it_to_end(stand_in):
    command, out = stand_in
    executor = WarmSpareExecutor(command)
    try:
        first = executor.spare
        assert first is not None and first.args == [*command, WARM_FLAG]  # no token on a command line
        result = executor.launch(_spec())
        assert result.status == LaunchResultStatus.ACCEPTED
        # While the task runs, no spare: its import would compete with the task's training.
        executor.reconcile()
        assert executor.spare is None and first.poll() is None
        assert _records(out, first.pid) == {"warm": clientapp_args(_spec())}
        assert first.wait(timeout=20) == 0
        executor.reconcile()  # the task ended: the next spare starts
        second = executor.spare
        assert second is not None and second is not first and second.poll() is None
        executor.launch(_spec("another-token"))
        assert _records(out, second.pid) == {"warm": clientapp_args(_spec("another-token"))}
        second.wait(timeout=20)
        executor.reconcile()
        third = executor.spare
    finally:
        executor.close()
    # At the supervisor's exit the waiting spare reads end-of-input and runs no task.
    assert third is not None and third.wait(timeout=20) == 0
    assert _records(out, third.pid) == {"warm": "eof"} and executor.spare is None


def test_a_dead_spare_is_replaced_and_its_task_starts_cold(stand_in):
    command, out = stand_in
    executor = WarmSpareExecutor(command)
    try:
        dead = executor.spare
        assert dead is not None
        dead.kill()
        dead.wait(timeout=20)
        before = set(out.iterdir())
        executor.launch(_spec())  # nothing lost: the task starts as Flower would start it
        deadline = time.monotonic() + 20
        while not [p for p in set(out.iterdir()) - before if p.read_text()]:
            assert time.monotonic() < deadline, "the cold task recorded nothing"
            time.sleep(0.05)
        (cold,) = set(out.iterdir()) - before
        assert json.loads(cold.read_text()) == {"cold": clientapp_args(_spec())}
        deadline = time.monotonic() + 20
        while executor.spare is None:  # once the cold task has ended, a new spare waits
            assert time.monotonic() < deadline, "no new spare"
            executor.reconcile()
            time.sleep(0.05)
        assert executor.spare.poll() is None
    finally:
        executor.close()


def test_a_spare_that_keeps_dying_is_given_up_and_tasks_start_cold(tmp_path):
    executor = WarmSpareExecutor([sys.executable, "-c", "raise SystemExit(3)"])
    try:
        for _ in range(10):
            if executor.spare is not None:
                executor.spare.wait(timeout=20)
            executor.reconcile()
        assert executor.spare is None and executor.quick_deaths == WarmSpareExecutor.MAX_QUICK_DEATHS
        assert executor.launch(_spec()).status == LaunchResultStatus.ACCEPTED  # still started, cold
        assert executor.spare is None
    finally:
        executor.close()


def test_a_spare_reads_one_list_of_arguments_or_nothing(monkeypatch):
    installed = supervisor.installed_app_hash()
    monkeypatch.setattr(supervisor, "_imported_hash", None)
    assert await_task(io.StringIO(json.dumps(["--token", "x"]) + "\n"), frozenset({installed})) == ["--token", "x"]
    assert supervisor._imported_hash == installed  # what it imported
    assert await_task(io.StringIO(""), frozenset({installed})) is None
    for bad in ("not json\n", '{"token": "x"}\n', "[1, 2]\n"):
        with pytest.raises(SystemExit) as exc:
            await_task(io.StringIO(bad), frozenset({installed}))
        assert "\n" not in str(exc.value) and bad.strip() not in str(exc.value)  # one line, no echo


def test_a_spare_imports_only_an_approved_checkout_that_stays_the_same(monkeypatch):
    """A checkout the site has not approved runs no code ahead of a task's check; one that
    changes during the import is marked so that no FAB's check passes (the next test)."""
    monkeypatch.setattr(supervisor, "_imported_hash", None)
    assert await_task(io.StringIO('["--token", "x"]\n'), frozenset({"f" * 64})) == ["--token", "x"]
    assert supervisor._imported_hash is None  # nothing imported ahead: the task loads it, as a cold start
    hashes = iter(["a" * 64, "b" * 64])  # before the import, after it
    monkeypatch.setattr(supervisor, "installed_app_hash", lambda: next(hashes))
    await_task(io.StringIO('["--token", "x"]\n'), frozenset({"a" * 64}))
    assert supervisor._imported_hash == supervisor.CHANGED_WHILE_IMPORTING


def test_a_spare_runs_no_code_that_changed_while_it_waited(monkeypatch, tmp_path):
    """It imported privfed before its task: if the checkout changed since, the approved
    FAB (today's checkout) is not what it would run, so it refuses."""
    import flwr.supernode.runtime.run_clientapp as runner

    from common.deploy.app_approval import build_fab, fab_hash_of

    fab = build_fab(supervisor.INSTALLED_ROOT)
    for name in ("install_from_fab", "get_project_dir", "get_load_client_app_fn"):
        monkeypatch.setattr(runner, name, getattr(runner, name))
    supervisor.guard_runner(frozenset({fab_hash_of(fab)}))
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    monkeypatch.setattr(supervisor, "_imported_hash", fab_hash_of(fab))
    assert runner.install_from_fab(fab, skip_prompt=True) is None  # imported what is installed: runs
    monkeypatch.setattr(supervisor, "_imported_hash", "0" * 64)  # imported before an edit
    with pytest.raises(supervisor.InstalledAppDiffers):
        runner.install_from_fab(fab, skip_prompt=True)


def test_a_spare_that_served_a_task_clears_the_count_of_quick_deaths(stand_in):
    """Deaths count in a row: a checkout briefly broken (mid git pull) does not turn the
    spare off for good once one has worked again."""
    command, out = stand_in
    executor = WarmSpareExecutor(command)
    try:
        executor.quick_deaths = WarmSpareExecutor.MAX_QUICK_DEATHS - 1
        spare = executor.spare
        assert spare is not None
        executor.launch(_spec())
        spare.wait(timeout=20)
        executor.reconcile()
        assert executor.quick_deaths == 0 and executor.spare is not None
    finally:
        executor.close()
