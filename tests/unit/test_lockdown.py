"""Issue 20's lockdown, piece by piece: the approved-app pin, the site's guarded SuperExec,
the sites' proxy config and the coordinator's SuperLink command. The same pieces run as
real processes in tests/integration/test_deployment.py."""

from __future__ import annotations

import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from client import supervisor
from common.deploy import pki
from common.deploy.app_approval import (
    AppApprovalError,
    add_approved,
    build_fab,
    check_signature,
    fab_hash_of,
    parse_approved,
    sign_app,
)
from common.deploy.signing import new_signing_key, public_hex
from common.errors import PrivfedError
from server import coordinator, proxy

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pki")
    pki.make_ca(folder)
    pki.make_server_cert(folder, ["localhost", "127.0.0.1"])
    return folder


def test_the_approved_hash_is_the_hash_of_what_flwr_run_submits():
    """`privfed app sign` / `site approve` build the FAB faster than Flower (they skip ignored
    folders such as .venv), but it must be the same bytes `flwr run .` sends, or every site
    would refuse the coordinator's run."""
    from flwr.cli.build import build_fab_from_disk

    assert build_fab(REPO) == build_fab_from_disk(REPO)


def test_an_app_signature_binds_the_coordinator_to_one_hash():
    coordinator_key, other = new_signing_key(), new_signing_key()
    h = fab_hash_of(b"a fab")
    sig = sign_app(coordinator_key, h)
    check_signature(public_hex(coordinator_key), h, sig)
    for key, fab_hash, signature in (
        (public_hex(other), h, sig),  # another key
        (public_hex(coordinator_key), fab_hash_of(b"another fab"), sig),  # another app
        # a changed signature (its last byte flipped: "00" alone would leave 1 signature in 256 unchanged)
        (public_hex(coordinator_key), h, sig[:-2] + f"{int(sig[-2:], 16) ^ 0xFF:02x}"),
        (public_hex(coordinator_key), h, "not hex"),
    ):
        with pytest.raises(AppApprovalError, match="not the coordinator's signature"):
            check_signature(key, fab_hash, signature)


def test_approved_apps_parse_strictly_and_add_once():
    h1, h2 = "a" * 64, "b" * 64
    assert parse_approved(f"{h1}, {h2.upper()}") == (h1, h2)
    assert add_approved(add_approved("", h1), h1) == h1
    assert add_approved(h1, h2) == f"{h1},{h2}"
    for bad in ("abc", "g" * 64, f"{h1},../etc"):
        with pytest.raises(AppApprovalError, match="64 hex"):
            parse_approved(bad)


INSTALLED_FAB = build_fab(REPO)  # what this checkout is, as an app


@pytest.fixture
def guarded(monkeypatch):
    """Flower's ClientApp runner with the site's guard installed, restored afterwards; the
    approved apps: this checkout, and one that is not what is installed here."""
    import flwr.supernode.runtime.run_clientapp as runner

    for name in ("install_from_fab", "get_project_dir", "get_load_client_app_fn"):
        monkeypatch.setattr(runner, name, getattr(runner, name))
    supervisor.guard_runner(frozenset({fab_hash_of(INSTALLED_FAB), fab_hash_of(b"approved, not installed")}))
    return runner


def test_the_guard_refuses_an_unapproved_fab_before_anything_is_unpacked(guarded, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    with pytest.raises(supervisor.AppNotApproved) as exc:
        guarded.install_from_fab(b"an altered fab", skip_prompt=True)
    text = str(exc.value)
    # What reaches the coordinator: the FAB's own hash (the coordinator chose it), nothing of the site's.
    assert fab_hash_of(b"an altered fab")[:16] in text and str(tmp_path) not in text
    assert "refused app" in capsys.readouterr().err  # the site's own log
    assert list(tmp_path.iterdir()) == []  # nothing unpacked


def test_an_approved_fab_runs_the_sites_installed_clientapp(guarded, tmp_path, monkeypatch):
    from client.app import app as installed

    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    assert guarded.install_from_fab(INSTALLED_FAB, skip_prompt=True) is None
    assert list(tmp_path.iterdir()) == []  # not unpacked: the FAB's code is never on disk
    # An approved app that is not the code installed here (its checkout changed since): refused.
    with pytest.raises(supervisor.InstalledAppDiffers):
        guarded.install_from_fab(b"approved, not installed", skip_prompt=True)
    load = guarded.get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
    assert load("privfed/privfed", "1.0", "x" * 64) is installed
    assert guarded.get_project_dir("privfed/privfed", "1.0", "x" * 64) == supervisor.INSTALLED_ROOT


def test_the_supervisor_takes_clientapp_tasks_only_and_starts_them_through_the_guard(monkeypatch):
    from flwr.supercore import constant
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec.plugin.base_exec_plugin import AutoExecPlugin

    seen: dict[str, object] = {}
    monkeypatch.setattr(constant, "TASK_TYPE_TO_COMMAND", dict(constant.TASK_TYPE_TO_COMMAND))
    monkeypatch.setattr(AutoExecPlugin, "supported_task_types", AutoExecPlugin.supported_task_types)
    monkeypatch.delenv(supervisor.APPROVED_ENV, raising=False)
    import flwr.supercore.superexec.run_superexec as loop

    monkeypatch.setattr(loop, "run_superexec", lambda **kw: seen.update(kw))
    flowers = loop.get_executor
    monkeypatch.setattr(loop, "get_executor", flowers)
    monkeypatch.setenv(supervisor.WARM_ENV, "0")  # no fork server: Flower's own executor
    supervisor.supervise("127.0.0.1:9094", 123, ("a" * 64,))
    assert loop.get_executor is flowers
    monkeypatch.delenv(supervisor.WARM_ENV)  # the default: the fork server's (tests/unit/test_fork_server.py)
    supervisor.supervise("127.0.0.1:9094", 123, ("a" * 64,))
    assert loop.get_executor is not flowers
    assert AutoExecPlugin.supported_task_types == frozenset({TaskType.CLIENT_APP})
    assert set(constant.TASK_TYPE_TO_COMMAND.values()) == {supervisor.clientapp_script()}
    assert seen["runtime_dependency_install"] is False and seen["parent_pid"] == 123
    import os

    assert os.environ[supervisor.APPROVED_ENV] == "a" * 64
    monkeypatch.delenv(supervisor.APPROVED_ENV)


def test_a_flower_without_the_guarded_attributes_is_refused(monkeypatch):
    import flwr.supernode.runtime.run_clientapp as runner

    monkeypatch.delattr(runner, "install_from_fab")
    with pytest.raises(supervisor.UnguardedFlower, match="install_from_fab"):
        supervisor.guard_runner(frozenset())


def test_the_proxy_passes_the_fleet_api_and_health_only(pki_dir, tmp_path):
    plan = proxy.ProxyPlan(
        listen="0.0.0.0:9092",
        superlink="127.0.0.1:9093",
        cert=pki_dir / "superlink.pem",
        key=pki_dir / "superlink.key",
        ca=pki_dir / "ca.pem",
        folder=tmp_path / "proxy",
    )
    text = proxy.render(plan)
    locations = [line.split()[1:-1] for line in text.splitlines() if line.strip().startswith("location")]
    assert locations == [["=", "/v1/fleet/push-object"], ["/v1/fleet/"], ["=", "/health"], ["/"]]
    assert "return 403;" in text.split("location / {", 1)[1]
    assert text.count("proxy_ssl_verify on;") == 3 and "proxy_ssl_name localhost;" in text
    # What an unauthenticated client can make the SuperLink buffer (it reads a body before it
    # checks the node's signature): bounded per request, per connection count and rate.
    assert "client_max_body_size 16m;" in text and "client_max_body_size 2m;" in text
    assert "limit_conn per_address 16;" in text and "limit_req zone=fleet_rate" in text
    with pytest.raises(PrivfedError, match="loopback"):
        proxy.render(plan.__class__(**{**plan.__dict__, "superlink": "10.0.0.5:9093"}))
    if shutil.which("nginx") or Path("/usr/sbin/nginx").is_file():
        path = proxy.write(plan)  # nginx -t accepts it
        assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(plan.folder.stat().st_mode) == 0o700
        assert proxy.write(plan) == path  # the same config again (a restart) is fine
        path.write_text(path.read_text() + "# edited\n")
        with pytest.raises(PrivfedError, match="already exists"):
            proxy.write(plan)


def test_the_superlink_listens_on_loopback_without_runtime_installs(pki_dir, tmp_path):
    db = tmp_path / "not-yet" / "state.db"
    cmd = coordinator.superlink_command(str(pki_dir), str(db), "127.0.0.1:9093")
    assert stat.S_IMODE(db.parent.stat().st_mode) == 0o700  # the folder the SuperLink would die without
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and "--enable-supernode-auth" in cmd
    assert "--disable-runtime-dependency-installation" in cmd
    for public in ("0.0.0.0:9093", "203.0.113.7:9093"):
        with pytest.raises(PrivfedError, match="must be a loopback address"):
            coordinator.superlink_command(str(pki_dir), str(db), public)
    with pytest.raises(PrivfedError, match="CA certificate \\(ca.pem\\) not found"):
        coordinator.superlink_command(str(tmp_path), str(db), "127.0.0.1:9093")


def test_the_coordinator_commands_print_their_checks_in_one_line(pki_dir, tmp_path):
    from simulations.cli import main

    assert main(["coordinator", "superlink", "--pki", str(pki_dir), "--database", ":flwr-in-memory:", "--check"]) == 0
    assert main(["coordinator", "superlink", "--pki", str(tmp_path), "--database", "x.db", "--check"]) == 2
    import sys

    out = subprocess.run(
        [str(Path(sys.executable).with_name("privfed")), "coordinator", "flwr-config", "--pki", str(pki_dir)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert 'address = "127.0.0.1:9093"' in out.stdout and str(pki_dir / "ca.pem") in out.stdout


def test_inactive_task_tables_are_dropped_from_a_deployed_run_config():
    """The deployed app lists every task's table (Flower refuses an override it does not
    list); only the chosen task's table configures the run."""
    import tomllib

    from common.config import flatten
    from common.runtime import config_from

    listed = flatten(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])
    assert config_from(listed, {}).task == "vae"
    assert config_from(listed, {"task": "gan", "gan.features": 256}).task_params.features == 256
    recsys = config_from(listed, {"task": "recsys", "data.source": "synthetic", "data.partition": "iid"})
    assert recsys.task == "recsys"


@pytest.mark.parametrize("key", ["data.path", "data.users-path"])
def test_a_deployed_site_refuses_a_run_config_that_names_its_files(tmp_path, key):
    """Review of issue 20, finding 1: which of a site's files are read, and so the name of its
    lifetime budget, is the site's choice (its node config), never the coordinator's."""
    from flwr.app import Context, RecordDict

    from client.app import make_site
    from common.deploy.site_config import PolicyRefusal
    from tests.site_keys import site_keys

    ctx = Context(
        run_id=1,
        node_id=1,
        node_config={"partition-id": 0, "declared-size": 600, "state-dir": str(tmp_path)},
        state=RecordDict(),
        run_config={key: str(tmp_path / "any.csv")},
    )
    with pytest.raises(PolicyRefusal) as refused:
        make_site({"num-sites": 3}, ctx, **site_keys())  # a deployed site: no launcher consent
    assert refused.value.key == key and str(tmp_path) not in str(refused.value)
