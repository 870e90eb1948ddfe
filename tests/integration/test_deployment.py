"""A real deployment on loopback, run through the guide's own commands (docs/DEPLOYMENT.md).

The coordinator: ``privfed certs`` for the CA, the SuperLink certificate and the SuperNode
keys; ``privfed coordinator superlink`` (TLS, node authentication, loopback only);
``privfed coordinator proxy`` (Debian's nginx, passing the Fleet API only) for the sites;
``flwr supernode register`` from the admin address; ``privfed app sign`` for the app.
Each of 2 sites: ``privfed site init``, ``privfed site approve``, ``privfed site join``
(a SuperNode plus the site's own SuperExec, which starts approved apps only). Then two
rounds of each task, and the attacks the guide's lockdown is for, each refused: the
Control API from a site's address, an altered app, an unregistered key, a wrong CA, a
revoked key. Certificate rotation keeps every site online.

Every process is started in its own process group and stopped by that group (the
SuperLink's flower-superexec runs in a session of its own, so it is collected too).
The guide's wall time per step is written to logs/timings.json.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from client.verify import verify_site
from common.deploy.registry import Registry
from server.ledger import Ledger
from server.ledger_audit import verify_against_keys
from tests.conftest import simulation_processes

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
ADMIN, SITE = "privfed", "site"  # the flwr CLI's connections: the coordinator's, and one a site could make
# Two sites: every check here is about one site against the others and the coordinator (its
# own key, its own approval, its own state), which two show as well as more. Each site runs
# every message of every run in a ClientApp process of its own that first imports torch and
# Opacus (~4 s of a core), so each site more costs the suite about 14 such starts.
SITES = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True).stdout
    children: dict[int, list[int]] = {}
    for line in out.split("\n"):
        if line.strip():
            c, p = map(int, line.split())
            children.setdefault(p, []).append(c)
    todo, found = [pid], []
    while todo:
        for c in children.get(todo.pop(), []):
            found.append(c)
            todo.append(c)
    return found


def _nginx() -> str | None:
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).is_file()), None)


class Federation:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.pki = root / "pki"
        self.logs = root / "logs"
        self.pki.mkdir()
        self.logs.mkdir()
        self.admin_port = _free_port()  # the SuperLink, loopback only: the coordinator's flwr CLI
        self.site_port = _free_port()  # the proxy: the only address a site dials
        self.procs: list[subprocess.Popen] = []
        self.sites: dict[str, subprocess.Popen] = {}
        self.sessions: list[int] = []
        self.timings: dict[str, float] = {}
        # Exactly what an operator's shell has after `. .venv/bin/activate` (no Flower
        # variables: the guide's commands must work without them).
        self.env = {
            **os.environ,
            "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
            "FLWR_HOME": str(root / "flwr-home"),  # the CLI's connection config and Flower's app folder
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_TELEMETRY_ENABLED": "0",
        }
        self.env.pop("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", None)
        (root / "flwr-home").mkdir()

    def step(self, name: str, started: float) -> None:
        self.timings[name] = round(self.timings.get(name, 0.0) + time.monotonic() - started, 2)

    def privfed(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "privfed"), *args], env=self.env, cwd=self.root, capture_output=True, text=True, check=check
        )

    def spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
        # Output to a file, not a pipe: the SuperNode's SuperExec child inherits it.
        log = open(self.logs / f"{name}.log", "wb")
        p = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.root, start_new_session=True
        )
        self.procs.append(p)
        self.sessions.append(p.pid)  # a session leader: its group id is its pid, even after it exits
        return p

    def flwr(self, *args: str, timeout: float = 400) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "flwr"), *args], env=self.env, cwd=self.root, capture_output=True, text=True, timeout=timeout
        )

    def wait_healthy(self, port: int, name: str) -> None:
        ctx = ssl.create_default_context(cafile=str(self.pki / "ca.pem"))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"https://127.0.0.1:{port}/health", context=ctx, timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        raise TimeoutError((self.logs / f"{name}.log").read_text()[-2000:])

    def write_flwr_config(self) -> None:
        """The coordinator's connection (`privfed coordinator flwr-config`), plus one to the
        proxy with only what a site holds (ca.pem), for the attacks."""
        admin = self.privfed("coordinator", "flwr-config", "--pki", "pki", "--admin", f"127.0.0.1:{self.admin_port}")
        site = (
            f'\n[superlink.{SITE}]\naddress = "127.0.0.1:{self.site_port}"\n'
            f'root-certificates = "{self.pki / "ca.pem"}"\n'
        )
        (self.root / "flwr-home" / "config.toml").write_text(admin.stdout + site)

    def site_init(self, name: str, partition: int, ca: Path | None = None, key: str | None = None) -> Path:
        out = self.root / f"{name}.toml"
        r = self.privfed(
            "site",
            "init",
            "--out",
            str(out),
            "--site-id",
            name,
            "--partition-id",
            str(partition),
            "--superlink",
            f"127.0.0.1:{self.site_port}",
            "--ca-cert",
            str(ca or self.pki / "ca.pem"),
            "--auth-key",
            str(self.pki / f"{key or name}.key"),
            "--declared-size",  # the site's public size n-hat (docs/PRIVACY.md)
            "300",
            "--key-file",  # the federation key: the recommender pseudonymises ids with it
            str(self.root / "federation.key"),
            "--server-key",  # the coordinator's public key: receipts and the app are checked against it
            self.server_public,
            "--state-dir",
            str(self.root / f"state-{name}"),
            "--device",
            "cpu",
        )
        # The entry the site sends the coordinator over a trusted channel.
        self.registry_entries.append(r.stdout[r.stdout.index("[[site]]") :].strip())
        self.privfed("site", "approve", str(out), "--signature", self.app_signature, "--app", str(REPO))
        return out

    def join(self, name: str, config: Path, *extra: str) -> subprocess.Popen:
        cmd = [str(BIN / "privfed"), "site", "join", str(config), "--", "--host", "127.0.0.1"]
        return self.spawn(name, [*cmd, "--port", str(_free_port()), *extra])

    def submit(self, name: str, overrides: str, app: Path = REPO) -> tuple[subprocess.Popen, Path]:
        """`flwr run` in the background: the runs share the SuperLink and the sites, as a
        coordinator's concurrent runs would, and their rounds overlap (most of a deployed
        round is Flower's 3 s message polls and ClientApp process starts)."""
        run_dir = self.root / name
        config = (
            f'num-sites={SITES} run-dir="{run_dir}" audit.mia=false central-eval=false '
            f'registry="{self.root / "registry.toml"}" server-key="{self.root / "coordinator.key"}" {overrides}'
        )
        log = open(self.logs / f"flwr-run-{name}.log", "w")
        cmd = [str(BIN / "flwr"), "run", str(app), ADMIN, "--stream", "--run-config", config]
        p = subprocess.Popen(cmd, env=self.env, cwd=self.root, stdout=log, stderr=subprocess.STDOUT, text=True)
        self.procs.append(p)
        return p, run_dir

    def runs(self) -> list[dict]:
        return json.loads(self.flwr("ls", ADMIN, "--format", "json").stdout)["runs"]

    def nodes(self) -> list[dict]:
        return json.loads(self.flwr("supernode", "list", ADMIN, "--format", "json", timeout=60).stdout)["nodes"]

    def nodes_online(self) -> int:
        return [n["status"] for n in self.nodes()].count("online")

    def teardown(self) -> None:
        # Every spawned session's group, whether or not its leader is still alive: a SuperNode
        # that stopped by itself (the revoked site) can leave its SuperExec child running, an
        # orphan that no longer descends from anything this fixture holds.
        groups: set[int] = set(self.sessions)
        for p in self.procs:
            for pid in [p.pid, *_descendants(p.pid)]:
                try:
                    groups.add(os.getpgid(pid))
                except ProcessLookupError:
                    pass
        for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
            for g in groups:
                try:
                    os.killpg(g, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and any(p.poll() is None for p in self.procs):
                time.sleep(0.2)
        for p in self.procs:
            p.wait(timeout=5)


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    if shutil.which("flower-superlink", path=str(BIN)) is None:
        pytest.skip("flower-superlink is not installed beside this Python")
    if _nginx() is None:
        if os.environ.get("CI"):
            pytest.fail("nginx is missing: .ci/run installs Debian's nginx-light for this test")
        pytest.skip("nginx is not installed (apt-get install nginx-light)")
    fed = Federation(tmp_path_factory.mktemp("deploy"))
    t0 = time.monotonic()
    try:
        # 1. Coordinator: certificates and keys (the guide's section 1).
        t = time.monotonic()
        passphrase = fed.root / "ca.pass"  # the CA key is stored encrypted, as the guide does it
        passphrase.write_text("correct horse battery staple\n")
        passphrase.chmod(0o600)
        fed.passphrase = ["--passphrase-file", str(passphrase)]
        fed.privfed("certs", "ca", "--out", "pki", *fed.passphrase)
        fed.privfed("certs", "server", "--out", "pki", "--host", "localhost", "--host", "127.0.0.1", *fed.passphrase)
        for name in [*(f"clinic-{i}" for i in range(SITES)), "rogue"]:  # rogue: never registered
            fed.privfed("certs", "node", "--out", "pki", "--name", name)
        fed.server_public = fed.privfed("keys", "signing", "coordinator.key").stdout.split()[-1]
        fed.privfed("keys", "new", "federation.key")
        fed.registry_entries = []
        fed.step("1 certificates and keys", t)

        # 2. Coordinator: the SuperLink on loopback, the sites' proxy, the flwr connection.
        t = time.monotonic()
        database = fed.root / "superlink" / "state.db"  # its folder does not exist yet: the command makes it
        fed.spawn(
            "superlink",
            [str(BIN / "privfed"), "coordinator", "superlink", "--pki", "pki", "--database", str(database)]
            + ["--admin", f"127.0.0.1:{fed.admin_port}"],
        )
        fed.spawn(
            "proxy",
            [str(BIN / "privfed"), "coordinator", "proxy", "--pki", "pki", "--dir", "proxy"]
            + ["--listen", f"127.0.0.1:{fed.site_port}", "--superlink", f"127.0.0.1:{fed.admin_port}"],
        )
        fed.write_flwr_config()
        fed.wait_healthy(fed.admin_port, "superlink")
        fed.wait_healthy(fed.site_port, "proxy")
        fed.node_ids = {}
        for i in range(SITES):
            r = fed.flwr("supernode", "register", str(fed.pki / f"clinic-{i}.pub"), ADMIN, "--format", "json")
            assert json.loads(r.stdout)["success"], r.stdout + r.stderr
            fed.node_ids[f"clinic-{i}"] = json.loads(r.stdout)["node-id"]
        fed.step("2 SuperLink, proxy, registrations", t)

        # 3. The app every site will run, signed by the coordinator; each site approves it.
        t = time.monotonic()
        signed = fed.privfed("app", "sign", "--server-key", "coordinator.key", "--app", str(REPO)).stdout.split()
        fed.app_hash, fed.app_signature = signed[signed.index("fab-hash") + 1], signed[signed.index("signature") + 1]
        fed.step("3 app signed", t)

        # 4. Each site: init, approve, join.
        t = time.monotonic()
        configs = [fed.site_init(f"clinic-{i}", i) for i in range(SITES)]
        (fed.root / "registry.toml").write_text(
            f'[server]\npublic-key = "{fed.server_public}"\n\n' + "\n\n".join(fed.registry_entries)
        )
        for i, cfg in enumerate(configs):
            fed.sites[f"clinic-{i}"] = fed.join(f"clinic-{i}", cfg)
        deadline = time.monotonic() + 90
        while fed.nodes_online() < SITES:
            assert time.monotonic() < deadline, "SuperNodes did not come online"
            time.sleep(0.5)
        fed.step("4 sites init, approve, join", t)
        fed.timings["total to ready"] = round(time.monotonic() - t0, 2)
        yield fed
    finally:
        (fed.logs / "timings.json").write_text(json.dumps(fed.timings, indent=1))
        fed.teardown()


TASKS = {
    "vae": "vae.hidden-dim=16 vae.latent-dim=2 dp.target-epsilon=0.0 dp.noise-multiplier=1.0",
    "gan": 'task="gan" gan.features=256 gan.hidden-dim=32 gan.latent-dim=8 gan.eval-samples=64 '
    "dp.target-epsilon=0.0 dp.noise-multiplier=1.0 train.batch-size=32",
    "recsys": 'task="recsys" data.source="synthetic" data.partition="iid" recsys.synthetic-users=120 '
    "recsys.synthetic-items=60 recsys.num-buckets=4096 recsys.min-group-size=2 train.batch-size=64 "
    "dp.target-epsilon=0.0 dp.noise-multiplier=1.0",
}
UNITS = {"vae": "image", "gan": "image", "recsys": "rating"}


@dataclass
class Run:
    output: str
    run_dir: Path
    status: str
    marker: Path | None = None


def _altered_app(root: Path) -> tuple[Path, Path]:
    """A copy of the app with one added line that would leave a marker file when imported."""
    evil, marker = root / "altered-app", root / "IMPORTED"
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    for rel in files:
        if (REPO / rel).is_file():
            (evil / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, evil / rel)
    with open(evil / "client" / "app.py", "a") as fh:
        fh.write(f"\nimport pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n")
    return evil, marker


@pytest.fixture(scope="module")
def runs(federation) -> dict[str, Run]:
    """Two rounds of each task with the signed app, and one round of an altered app, all
    submitted at once from the coordinator's admin address."""
    t = time.monotonic()
    evil, marker = _altered_app(federation.root)
    started = {f"run-{task}": federation.submit(f"run-{task}", f"rounds=2 {TASKS[task]}") for task in TASKS}
    started["run-altered"] = federation.submit("run-altered", f"rounds=1 {TASKS['vae']}", app=evil)
    for p, _ in started.values():
        p.wait(timeout=900)
    federation.step("5 four runs at once (2 rounds of each task, 1 altered)", t)
    statuses = {str(r["run-id"]): r["status"] for r in federation.runs()}
    out: dict[str, Run] = {}
    for name, (_, run_dir) in started.items():
        text = (federation.logs / f"flwr-run-{name}.log").read_text()
        run_id = text.split("Successfully started run ", 1)[1].split()[0] if "Successfully started run" in text else ""
        out[name] = Run(text, run_dir, statuses.get(run_id, "not started"), marker if name == "run-altered" else None)
    return out


def _http(port: int, path: str, ca: Path, method: str = "POST") -> int:
    ctx = ssl.create_default_context(cafile=str(ca))
    req = urllib.request.Request(f"https://127.0.0.1:{port}{path}", data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_a_site_reaches_the_fleet_api_only(federation):
    """Issue 20, finding 1: with only ca.pem (what every site holds), the proxy's address
    gives no Control API: no listing, no node registration, no run submitted."""
    before = len(federation.runs())
    for args in (
        ["ls", SITE, "--format", "json"],
        ["supernode", "register", str(federation.pki / "rogue.pub"), SITE, "--format", "json"],
        ["run", str(REPO), SITE, "--format", "json", "--run-config", "rounds=1"],
    ):
        r = federation.flwr(*args, timeout=120)
        answer = json.loads(r.stdout)
        assert answer["success"] is False and "403" in answer["error-message"], (args, r.stdout[-1000:])
    # Nothing happened behind the refusals: no new run, the rogue key is not registered.
    assert len(federation.runs()) == before
    assert sorted(int(n["node-id"]) for n in federation.nodes()) == sorted(federation.node_ids.values())
    ca = federation.pki / "ca.pem"
    # Raw HTTP, past the flwr CLI: Control and runtime API paths stop at the proxy; health passes.
    for path in ("/v1/control/list-runs", "/v1/control/register-node", "/v1/serverappio/pull-messages", "/docs"):
        assert _http(federation.site_port, path, ca) == 403, path
    assert _http(federation.site_port, "/health", ca, method="GET") == 200
    assert _http(federation.site_port, "/v1/fleet/get-run", ca, method="GET") == 403  # POST only
    # The Control API itself still works from the coordinator's loopback address.
    assert _http(federation.admin_port, "/v1/control/list-runs", ca) != 403


@pytest.mark.parametrize("task", sorted(TASKS))
def test_each_task_runs_two_rounds_through_the_proxy(federation, runs, task):
    run = runs[f"run-{task}"]
    run_dir = run.run_dir
    # `flwr run` exits 0 even when the ServerApp fails: the run's status is the verdict
    assert run.status == "finished:completed", run.output[-3000:]

    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    sites = [f"clinic-{i}" for i in range(SITES)]
    assert [m["round"] for m in lines] == [1, 2]
    assert all(sorted(m["sites_trained"]) == sites and m["aggregated"] for m in lines), lines[-1]
    # Sites evaluate (central-eval=false, as the guide advises); metrics.dp is the deployment
    # default, so the pooled value is a noisy estimate with an error bar.
    assert all(set(m["site_val"]) == set(sites) for m in lines)
    assert all(math.isfinite(v) for m in lines for v in m["test"].values())
    ledger = Ledger(run_dir / "ledger.sqlite")
    every = ledger.rows()
    rows = [row for row in every if row.mechanism == "dp-sgd"]
    assert sorted((row.round, row.site_id) for row in rows) == [(rnd, s) for rnd in (1, 2) for s in sites]
    assert all(row.unit == UNITS[task] and row.noise_multiplier == 1.0 and row.used for row in rows)
    # Each site's noisy evaluation release is its own ledger row; the GAN's sites release
    # nothing under metrics.dp unless gan.class-target asks for class counts.
    released = {row.site_id for row in every if row.mechanism == "gaussian-metrics"}
    assert released == (set() if task == "gan" else set(sites))
    assert all(row.rng == "os" for row in every)  # dp.secure-rng is the deployment default
    assert ledger.verify(expected_head=lines[-1]["ledger_head"]).ok
    assert "rounds completed: 2" in run.output
    # Issue 19: the auditor checks every row against the registered keys, and each site checks
    # the coordinator's ledger against its own records and the receipt it kept.
    check = verify_against_keys(ledger, Registry.load(federation.root / "registry.toml"))
    assert check.ok, check.reason
    for site in sites:
        findings, summary = verify_site(federation.root / f"state-{site}", run_dir)
        assert findings == [] and summary.startswith("ok:"), findings
    # Private files: the run dir is the coordinator's alone (issue 20, item 5).
    assert (run_dir.stat().st_mode & 0o777) == 0o700
    assert ((run_dir / "ledger.sqlite").stat().st_mode & 0o777) == 0o600


def test_an_app_the_sites_did_not_approve_never_runs(federation, runs):
    """Issue 20, item 2: the coordinator submits an altered copy of the app (one added line
    that would leave a marker file when imported). Every site refuses it before any of its
    code is unpacked or imported; no site trains; the coordinator sees why."""
    run = runs["run-altered"]
    lines = [json.loads(x) for x in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert lines and not any(m["sites_trained"] for m in lines), lines
    failures = [f for m in lines for f in m["failures"]]
    assert failures and all("AppNotApproved" in f and "app not approved by this site" in f for f in failures)
    assert run.marker is not None and not run.marker.exists()  # the altered code never ran at any site
    assert not any(row.mechanism == "dp-sgd" for row in Ledger(run.run_dir / "ledger.sqlite").rows())
    for i in range(SITES):
        assert "refused app" in (federation.logs / f"clinic-{i}.log").read_text()


def test_every_task_ran_in_a_child_of_the_sites_fork_server(federation, runs):
    """client/supervisor.py: each site's tasks, the refused altered app's included, were forked
    from its fork server; none fell back to a cold start (which would only be slower, so no
    other test here would notice)."""
    for i in range(SITES):
        log = (federation.logs / f"clinic-{i}.log").read_text()
        assert "ClientApp fork server ready" in log
        assert "started cold" not in log and "fork server died" not in log, log[-3000:]


def _refused(federation, name: str, cmd: list[str]) -> tuple[int, str]:
    p = federation.spawn(name, cmd)
    rc = p.wait(timeout=90)
    return rc, (federation.logs / f"{name}.log").read_text()


def test_a_supernode_with_an_unregistered_key_or_a_wrong_ca_is_refused(federation, tmp_path):
    # An unregistered key: the SuperLink (behind the proxy) refuses to activate the node.
    rogue = federation.site_init("rogue", 0)
    rc, log = _refused(
        federation,
        "rogue",
        [str(BIN / "privfed"), "site", "join", str(rogue), "--", "--host", "127.0.0.1"]
        + ["--port", str(_free_port()), "--max-retries", "0"],
    )
    assert rc != 0 and "Failed to activate SuperNode" in log, log[-2000:]

    # A wrong CA: `site join` refuses before connecting, in one line ...
    other = tmp_path / "other-ca"
    other.mkdir()
    federation.privfed("certs", "ca", "--out", str(other))
    wrong = federation.site_init("clinic-wrong-ca", 0, ca=other / "ca.pem", key="clinic-0")
    rc, log = _refused(federation, "wrong-ca-join", [str(BIN / "privfed"), "site", "join", str(wrong)])
    assert rc == 2 and "does not verify against ca-cert" in log and len(log.strip().splitlines()) == 1
    # Neither joined: still exactly the registered sites online.
    assert federation.nodes_online() == SITES


def test_site_join_check_prints_pasteable_commands(federation):
    """Issue 20, finding 7: the printed command runs when pasted (the node config is quoted)."""
    import shlex

    out = federation.privfed("site", "join", str(federation.root / "clinic-0.toml"), "--check").stdout
    commands = [line for line in out.splitlines() if line.startswith("/")]
    assert len(commands) == 2
    supernode = shlex.split(commands[0])
    node_config = supernode[supernode.index("--node-config") + 1]
    assert 'site-id="clinic-0"' in node_config and "declared-size=300" in node_config
    assert supernode[supernode.index("--isolation") + 1] == "process"
    assert federation.app_hash in shlex.split(commands[1])


def test_rotating_the_superlink_certificate_keeps_every_site_online(federation):
    """Issue 20, item 7: a new server certificate, signed by the same CA, served after a
    proxy reload; the sites, which trust only ca.pem, never notice."""

    def served_serial() -> int:
        ctx = ssl.create_default_context(cafile=str(federation.pki / "ca.pem"))
        with socket.create_connection(("127.0.0.1", federation.site_port)) as sock:
            with ctx.wrap_socket(sock, server_hostname="localhost") as tls:
                der = tls.getpeercert(binary_form=True)
        from cryptography import x509

        return x509.load_der_x509_certificate(der).serial_number

    before = served_serial()
    t = time.monotonic()
    assert federation.privfed("certs", "rotate", "--out", "pki", check=False).returncode == 2  # no passphrase
    federation.privfed("certs", "rotate", "--out", "pki", *federation.passphrase)
    federation.privfed("coordinator", "proxy", "--reload", "--dir", "proxy", "--pki", "pki")
    federation.step("certificate rotation", t)
    deadline = time.monotonic() + 10
    while served_serial() == before:
        assert time.monotonic() < deadline, "the proxy still serves the old certificate"
        time.sleep(0.2)
    assert (federation.pki / "superlink.pem.prev").is_file()
    assert federation.privfed("certs", "status", "--out", "pki", check=False).returncode == 0
    time.sleep(4)  # a few Fleet polls through the reloaded proxy
    assert federation.nodes_online() == SITES


def test_a_revoked_site_is_shut_out(federation):
    """Issue 20, item 7: the coordinator unregisters a site's key; its running SuperNode is
    refused at its next call and stops, and the same key cannot join again."""
    site = f"clinic-{SITES - 1}"
    database = str(federation.root / "superlink" / "state.db")
    found = federation.privfed("certs", "node-id", str(federation.pki / f"{site}.pub"), "--database", database).stdout
    assert str(federation.node_ids[site]) in found
    r = federation.flwr("supernode", "unregister", str(federation.node_ids[site]), ADMIN, "--format", "json")
    assert json.loads(r.stdout)["success"], r.stdout
    federation.sites[site].wait(timeout=90)  # its SuperNode stops by itself
    assert federation.nodes_online() == SITES - 1
    rc, log = _refused(
        federation,
        "revoked-again",
        [str(BIN / "privfed"), "site", "join", str(federation.root / f"{site}.toml"), "--", "--host", "127.0.0.1"]
        + ["--port", str(_free_port()), "--max-retries", "0"],
    )
    assert rc != 0 and "Failed to activate SuperNode" in log, log[-2000:]


def test_no_process_is_left_behind(federation):
    federation.teardown()
    deadline = time.monotonic() + 15  # killed processes take a moment to go; a leftover stays
    while simulation_processes() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert simulation_processes() == []
    assert subprocess.run(["pgrep", "-f", str(federation.root / "proxy")], capture_output=True).returncode == 1
