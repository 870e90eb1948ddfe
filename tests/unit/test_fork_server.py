"""The site's fork server (client/supervisor.py): one process imports the ClientApp's code
ahead, and each task runs in a child forked from it, handed Flower's arguments on stdin;
whenever the server cannot take a task, the task starts cold and nothing is lost.

The executor tests run the real :func:`serve_forks` with a stand-in task (it records what it
was given) and a stand-in import, so no Flower or torch process starts there; the last test
forks from a process that really imported ``client.app``. tests/integration/test_deployment.py
runs the real server behind every deployed round."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from flwr.supercore.constant import TaskType
from flwr.supercore.superexec.executor import ExecutionSpec, LaunchResultStatus

from client import supervisor
from client.supervisor import FORK_FLAG, ForkServerExecutor, clientapp_args, serve_forks

ROOT = Path(__file__).resolve().parents[2]

# The stand-in ClientApp. With --fork-server FD it is the real serve_forks, whose "import"
# returns the hash in $STAND_IN_HASH (unset: nothing imported) and whose task records its
# arguments, its pid, its server's pid and a NumPy draw, then sleeps $STAND_IN_TASK_SECONDS.
# Started cold it records its arguments. Each process writes its own file, named by its pid.
STAND_IN = """
import json, os, sys, time
import numpy as np
if os.environ.get("STAND_IN_TORCH"):
    import torch
if os.environ.get("STAND_IN_LIBDIR"):
    sys.path.append(os.environ["STAND_IN_LIBDIR"])  # a library directory a pip install would change
from client import supervisor
out = sys.argv[1]

def record(what):
    path = os.path.join(out, str(os.getpid()))
    with open(path + ".tmp", "w") as fh:
        fh.write(json.dumps(what))
    os.replace(path + ".tmp", path)

def task(args):
    torch_draw = float(sys.modules["torch"].rand(1)) if "torch" in sys.modules else None
    record({"forked": args, "server": os.getppid(), "draw": float(np.random.random()), "torch": torch_draw})
    time.sleep(float(os.environ.get("STAND_IN_TASK_SECONDS", "0.5")))

if sys.argv[2:3] == ["--fork-server"] and os.environ.get("STAND_IN_HANG"):
    os.write(int(sys.argv[3]), b"ready\\n")
    time.sleep(600)  # ready, then never forks: hung
if sys.argv[2:3] == ["--fork-server"]:
    time.sleep(float(os.environ.get("STAND_IN_IMPORT_SECONDS", "0")))  # a slow import
    hashes = iter(os.environ.get("STAND_IN_HASHES", "").split(","))
    supervisor.installed_app_hash = lambda: next(hashes, "changed")
    imported = os.environ.get("STAND_IN_HASH") or None
    raise SystemExit(supervisor.serve_forks(0, int(sys.argv[3]), frozenset(), prepare=lambda a: imported, run=task))
record({"cold": sys.argv[2:]})
"""
HASH = "a" * 64


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


def _new_records(folder: Path, seen: set[Path], count: int = 1, timeout: float = 20) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        new = sorted(p for p in folder.iterdir() if p not in seen and not p.name.endswith(".tmp"))
        if len(new) >= count:
            seen.update(new)
            return [{**json.loads(p.read_text()), "pid": int(p.name)} for p in new]
        assert time.monotonic() < deadline, f"{len(new)} of {count} processes recorded"
        time.sleep(0.05)


def _until(executor: ForkServerExecutor, done, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "timed out"
        executor.reconcile()
        time.sleep(0.05)


@pytest.fixture
def stand_in(tmp_path, monkeypatch) -> tuple[list[str], Path]:
    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN)
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    # The server checks the checkout before each fork: the same hash, task after task.
    monkeypatch.setenv("STAND_IN_HASH", HASH)
    monkeypatch.setenv("STAND_IN_HASHES", ",".join([HASH] * 20))
    return [sys.executable, str(script), str(out)], out


def test_the_arguments_are_flowers(monkeypatch):
    """What the server is handed is what Flower's SubprocessExecutor puts after the command."""
    from flwr.supercore.superexec.executor import SubprocessExecutor

    seen: list[list[str]] = []
    monkeypatch.setattr(subprocess, "Popen", lambda args, **kw: seen.append(list(args)))
    tls = ExecutionSpec(**{**_spec().__dict__, "insecure": False, "root_certificates_path": "/ca.pem"})
    for spec in (_spec(), tls):
        SubprocessExecutor().launch(spec)
        assert seen[-1][1:] == clientapp_args(spec)


def test_each_task_is_a_child_of_one_server_with_flowers_arguments_and_its_own_randomness(stand_in, monkeypatch):
    command, out = stand_in
    monkeypatch.setenv("STAND_IN_TORCH", "1")
    # Long enough that both tasks still run when the second is started (the 0.5 s default let a
    # slow server reap the first before forking the second, and ``forked`` held only one).
    monkeypatch.setenv("STAND_IN_TASK_SECONDS", "2")
    executor = ForkServerExecutor(command)
    seen: set[Path] = set()
    try:
        _until(executor, lambda: executor._ready)
        server = executor.server
        assert server is not None and server.args[-2] == FORK_FLAG  # no token on any command line
        for token in ("first-token", "second-token"):
            assert executor.launch(_spec(token)).status == LaunchResultStatus.ACCEPTED
        first, second = _new_records(out, seen, 2)
        assert {json.dumps(r["forked"]) for r in (first, second)} == {
            json.dumps(clientapp_args(_spec(t))) for t in ("first-token", "second-token")
        }
        assert first["server"] == second["server"] == server.pid and first["pid"] != second["pid"]
        # NumPy's and torch's global generators are reseeded in each child, as a fresh
        # interpreter seeds them: no two tasks draw the same numbers.
        assert first["draw"] != second["draw"] and first["torch"] != second["torch"]
        assert executor.forked == {first["pid"], second["pid"]}
        _until(executor, lambda: not executor.forked)  # the server reports each end
        assert executor.server is server and server.poll() is None  # one server, task after task
    finally:
        executor.close()
    assert server.wait(timeout=20) == 0 and executor.server is None


def test_a_dead_server_loses_no_task_and_is_replaced_once_none_runs(stand_in):
    command, out = stand_in
    executor = ForkServerExecutor(command)
    seen: set[Path] = set()
    try:
        dead = executor.server
        assert dead is not None
        dead.kill()
        dead.wait(timeout=20)
        executor.launch(_spec())  # nothing lost: the task starts as Flower would start it
        (cold,) = _new_records(out, seen)
        assert cold["cold"] == clientapp_args(_spec())
        assert executor.server is None and executor.quick_deaths == 1
        _until(executor, lambda: executor.server is not None)  # once the cold task has ended
        executor.launch(_spec("next"))
        (forked,) = _new_records(out, seen)
        assert forked["forked"] == clientapp_args(_spec("next"))
    finally:
        executor.close()


def test_a_changed_checkout_sends_its_task_cold_and_a_new_server_imports_it(stand_in, monkeypatch):
    """The server forks only while the checkout builds to what it imported: otherwise it says
    so and exits, the task starts cold (whose own check decides), and that is no death."""
    command, out = stand_in
    monkeypatch.setenv("STAND_IN_HASHES", "b" * 64)  # the checkout changed after the import
    executor = ForkServerExecutor(command)
    seen: set[Path] = set()
    try:
        old = executor.server
        assert old is not None
        executor.launch(_spec())
        (cold,) = _new_records(out, seen)
        assert cold["cold"] == clientapp_args(_spec())
        assert old.poll() == 0 and executor.quick_deaths == 0
        _until(executor, lambda: executor.server is not None and executor.server is not old)
    finally:
        executor.close()


def test_a_server_that_imported_nothing_or_keeps_dying_is_given_up_for_a_while(stand_in, monkeypatch, capsys):
    """An unapproved checkout (or a failed import) leaves nothing to fork from: the server
    exits. After three quick deaths tasks start cold, and the server is tried again later."""
    command, out = stand_in
    monkeypatch.delenv("STAND_IN_HASH")
    executor = ForkServerExecutor(command)
    executor.RETRY_SECONDS = 2.0
    try:
        _until(executor, lambda: executor.quick_deaths == ForkServerExecutor.MAX_QUICK_DEATHS)
        for _ in range(5):
            executor.reconcile()
        assert executor.server is None
        assert executor.launch(_spec()).status == LaunchResultStatus.ACCEPTED
        (cold,) = _new_records(out, set())
        assert cold["cold"] == clientapp_args(_spec())
        log = capsys.readouterr().err
        assert "tried again in" in log and "started cold" not in log  # said once, not per task
        monkeypatch.setenv("STAND_IN_HASH", HASH)  # the checkout is approved again
        time.sleep(executor.RETRY_SECONDS)
        _until(executor, lambda: executor.server is not None and executor._ready)
    finally:
        executor.close()


def test_a_hung_server_costs_no_task(stand_in, monkeypatch, capsys):
    """It never says it forked: the task starts cold well within the 30 s Flower gives a
    claimed task, and the site's log says why in one line without the task's token."""
    command, out = stand_in
    monkeypatch.setenv("STAND_IN_HANG", "1")
    executor = ForkServerExecutor(command)
    executor.FORK_WAIT_SECONDS = 1.0
    try:
        _until(executor, lambda: executor._ready)
        hung = executor.server
        assert hung is not None
        t = time.monotonic()
        executor.launch(_spec())
        assert time.monotonic() - t < 10
        (cold,) = _new_records(out, set())
        assert cold["cold"] == clientapp_args(_spec()) and hung.poll() is not None
        (line,) = [x for x in capsys.readouterr().err.splitlines() if "started cold" in x]
        assert "did not answer within 2 s" in line and _spec().token not in line
    finally:
        executor.close()


def test_a_task_does_not_wait_long_for_a_slow_import_and_the_import_is_not_lost(stand_in, monkeypatch):
    """A server still importing is not handed the task (so nothing is to be taken back): after
    a short wait the task starts cold, and the server, left running, forks the next one."""
    command, out = stand_in
    monkeypatch.setenv("STAND_IN_IMPORT_SECONDS", "3")
    executor = ForkServerExecutor(command)
    executor.READY_WAIT_SECONDS = 0.5
    seen: set[Path] = set()
    try:
        server = executor.server
        executor.launch(_spec("early"))
        (cold,) = _new_records(out, seen)
        assert cold["cold"] == clientapp_args(_spec("early"))
        assert executor.server is server and server is not None and server.poll() is None
        assert executor.quick_deaths == 0
        _until(executor, lambda: executor._ready)
        executor.launch(_spec("later"))
        (forked,) = _new_records(out, seen)
        assert forked["forked"] == clientapp_args(_spec("later")) and forked["server"] == server.pid
    finally:
        executor.close()


def test_the_library_fingerprint_covers_the_interpreters_site_packages():
    """The venv lies inside the checkout (make install), which the app hash covers file by
    file but not its libraries: an upgraded torch must still be seen."""
    import sysconfig

    stamps, installed = supervisor.environment_fingerprint()
    assert sysconfig.get_paths()["purelib"] in {path for path, _ in stamps}
    assert any(name.lower() == "torch" for name, _ in installed)


def _serve(lines: list[str], monkeypatch) -> list[str]:
    """serve_forks in this process on ``lines``; its status lines."""
    monkeypatch.setattr(supervisor, "_imported_hash", None)  # serve_forks sets it: restored after
    commands, feed = os.pipe()
    reports, status = os.pipe()
    os.write(feed, "".join(line + "\n" for line in lines).encode())
    os.close(feed)
    try:
        try:
            serve_forks(commands, status, frozenset(), prepare=lambda a: HASH, run=lambda args: None)
        finally:
            os.close(status)
        return os.read(reports, 65536).decode().split()
    finally:
        os.close(commands)
        os.close(reports)


def test_a_task_past_its_deadline_is_not_forked(monkeypatch):
    """The supervisor may already have started it cold: forking it too would race for its token."""
    monkeypatch.setattr(supervisor, "installed_app_hash", lambda: HASH)
    late = json.dumps({"args": ["--token", "x"], "deadline": time.monotonic() - 1})
    assert _serve([late], monkeypatch) == ["ready", "late"]


def test_a_checkout_mid_update_makes_the_server_stale_not_crash(monkeypatch):
    """A file vanishing under the hash (mid git pull): not known to be current, so not forked."""

    def vanished() -> str:
        raise FileNotFoundError("client/app.py")

    monkeypatch.setattr(supervisor, "installed_app_hash", vanished)
    task = json.dumps({"args": ["--token", "x"], "deadline": time.monotonic() + 60})
    assert _serve([task], monkeypatch) == ["ready", "stale"]


def test_an_upgraded_library_sends_its_task_cold(stand_in, monkeypatch, tmp_path):
    """A pip install changes a library directory on sys.path: the server's imported torch or
    Opacus is no longer what is installed, so it forks nothing more."""
    command, out = stand_in
    libdir = tmp_path / "site-packages"
    libdir.mkdir()
    monkeypatch.setenv("STAND_IN_LIBDIR", str(libdir))
    executor = ForkServerExecutor(command)
    seen: set[Path] = set()
    try:
        _until(executor, lambda: executor._ready)
        executor.launch(_spec("before"))
        assert "forked" in _new_records(out, seen)[0]
        time.sleep(0.05)
        (libdir / "opacus-9.9.dist-info").mkdir()  # what pip leaves behind
        executor.launch(_spec("after"))
        (cold,) = _new_records(out, seen)
        assert cold["cold"] == clientapp_args(_spec("after")) and executor.quick_deaths == 0
    finally:
        executor.close()


def test_a_task_that_ends_cleanly_clears_the_count_of_quick_deaths(stand_in):
    """Deaths count in a row: a checkout briefly broken (mid git pull) does not turn the
    server off for good once one has worked again."""
    command, out = stand_in
    executor = ForkServerExecutor(command)
    try:
        executor.quick_deaths = ForkServerExecutor.MAX_QUICK_DEATHS - 1
        executor.launch(_spec())
        _new_records(out, set())
        _until(executor, lambda: executor.quick_deaths == 0)
    finally:
        executor.close()


def test_the_server_reads_one_task_per_line(monkeypatch):
    """Anything else on its stdin stops it with one line that echoes nothing."""
    for bad in ("not json", '{"token": "x"}', '["--token", "x"]', '{"args": [1, 2], "deadline": 1}'):
        with pytest.raises(SystemExit) as exc:
            _serve([bad], monkeypatch)
        assert "\n" not in str(exc.value) and bad not in str(exc.value)


def test_the_server_imports_only_an_approved_checkout_that_stays_the_same(monkeypatch):
    """A checkout the site has not approved runs no code ahead of a task's check; one that
    changes during the import is marked so that no FAB's check passes (the next test)."""
    installed = supervisor.installed_app_hash()
    assert supervisor.import_ahead(frozenset({"f" * 64})) is None
    assert supervisor.import_ahead(frozenset({installed})) == installed
    hashes = iter(["a" * 64, "b" * 64])  # before the import, after it
    monkeypatch.setattr(supervisor, "installed_app_hash", lambda: next(hashes))
    assert supervisor.import_ahead(frozenset({"a" * 64})) == supervisor.CHANGED_WHILE_IMPORTING


def test_a_forked_task_runs_no_code_that_changed_after_the_import(monkeypatch, tmp_path):
    """Its server imported privfed before the task: if the checkout changed since, the
    approved FAB (today's checkout) is not what it would run, so it refuses."""
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


FORK_AFTER_IMPORT = textwrap.dedent(
    """
    import os
    import client.app  # what the fork server imports, and nothing more
    pid = os.fork()
    if pid == 0:
        import torch
        torch.set_num_threads(2)
        x = torch.nn.functional.conv2d(torch.randn(16, 3, 32, 32), torch.randn(8, 3, 3, 3))
        y = torch.randn(400, 400) @ torch.randn(400, 400)
        os._exit(0 if float(x.sum() + y.sum()) == float(x.sum() + y.sum()) else 1)
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
    """
)


def test_a_child_forked_after_the_import_can_train():
    """A child of a process that ran a parallel (OpenMP) region can hang in its own first one.
    The server only imports: if an import ever starts computing, this test hangs and fails,
    not a site's round."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("OMP_NUM_THREADS", None)  # the site's default: more than one thread
    r = subprocess.run([sys.executable, "-c", FORK_AFTER_IMPORT], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "0", r.stderr[-2000:]
