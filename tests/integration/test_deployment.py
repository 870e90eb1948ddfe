"""A real deployment on loopback: SuperLink + 3 SuperNodes as processes, TLS and node auth.

Everything goes through the documented operator path: ``privfed certs`` for the CA, the
SuperLink certificate and the SuperNode keys; ``flwr supernode register`` for each site's
public key; ``privfed site init`` + ``privfed site join`` for each site; ``flwr run`` to
submit. Every process is started in its own process group and stopped by that group
(the SuperLink's flower-superexec runs in a session of its own, so it is collected too).
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
import urllib.request
from pathlib import Path

import pytest

from client.verify import verify_site
from common.deploy import pki
from common.deploy.registry import Registry
from server.ledger import Ledger
from server.ledger_audit import verify_against_keys
from tests.conftest import simulation_processes

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
CONN = "privfed-test"
SITES = 3


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


class Federation:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.pki = root / "pki"
        self.logs = root / "logs"
        self.pki.mkdir()
        self.logs.mkdir()
        self.port = _free_port()
        self.procs: list[subprocess.Popen] = []
        self.env = {
            **os.environ,
            "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
            "FLWR_HOME": str(root / "flwr-home"),  # the CLI's connection config and installed apps
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_TELEMETRY_ENABLED": "0",
        }
        (root / "flwr-home").mkdir()
        (root / "flwr-home" / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONN}"\n\n[superlink.{CONN}]\n'
            f'address = "127.0.0.1:{self.port}"\nroot-certificates = "{self.pki / "ca.pem"}"\n'
        )

    def spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
        # Output to a file, not a pipe: the SuperNode's flower-superexec child inherits it.
        log = open(self.logs / f"{name}.log", "wb")
        p = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.root, start_new_session=True
        )
        self.procs.append(p)
        return p

    def flwr(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "flwr"), *args], env=self.env, cwd=self.root, capture_output=True, text=True, timeout=timeout
        )

    def privfed(self, *args: str) -> list[str]:
        return [str(BIN / "privfed"), *args]

    def start_superlink(self) -> None:
        self.spawn(
            "superlink",
            [
                str(BIN / "flower-superlink"),
                "--ssl-ca-certfile",
                str(self.pki / "ca.pem"),
                "--ssl-certfile",
                str(self.pki / "superlink.pem"),
                "--ssl-keyfile",
                str(self.pki / "superlink.key"),
                "--enable-supernode-auth",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--database",
                ":flwr-in-memory:",
            ],
        )
        ctx = ssl.create_default_context(cafile=str(self.pki / "ca.pem"))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"https://127.0.0.1:{self.port}/health", context=ctx, timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        raise TimeoutError((self.logs / "superlink.log").read_text()[-2000:])

    def coordinator_key(self) -> None:
        """`privfed keys signing`: the coordinator's Ed25519 key; it prints the public key."""
        self.server_key = self.root / "coordinator.key"
        r = subprocess.run(
            self.privfed("keys", "signing", str(self.server_key)),
            check=True,
            env=self.env,
            capture_output=True,
            text=True,
        )
        self.server_public = next(line for line in r.stdout.split() if len(line) == 64)
        self.registry_entries: list[str] = []

    def write_registry(self) -> Path:
        """The coordinator's registry: its own public key and the entry each site's `site init` printed."""
        path = self.root / "registry.toml"
        path.write_text(f'[server]\npublic-key = "{self.server_public}"\n\n' + "\n\n".join(self.registry_entries))
        return path

    def site_config(self, name: str, partition: int, ca: Path | None = None, key: str | None = None) -> Path:
        out = self.root / f"{name}.toml"
        r = subprocess.run(
            self.privfed(
                "site",
                "init",
                "--out",
                str(out),
                "--site-id",
                name,
                "--partition-id",
                str(partition),
                "--superlink",
                f"127.0.0.1:{self.port}",
                "--ca-cert",
                str(ca or self.pki / "ca.pem"),
                "--auth-key",
                str(self.pki / f"{key or name}.key"),
                "--declared-size",  # the site's public size n-hat (docs/PRIVACY.md)
                "300",
                "--server-key",  # the coordinator's public key: receipts are checked against it
                self.server_public,
                "--state-dir",
                str(self.root / f"state-{name}"),
                "--device",
                "cpu",
            ),
            check=True,
            env=self.env,
            capture_output=True,
            text=True,
        )
        # The entry the site sends the coordinator over a trusted channel.
        self.registry_entries.append(r.stdout[r.stdout.index("[[site]]") :].strip())
        return out

    def run_config(self, overrides: str) -> str:
        return f'{overrides} registry="{self.root / "registry.toml"}" server-key="{self.server_key}"'

    def nodes_online(self) -> int:
        r = self.flwr("supernode", "list", CONN, "--format", "json", timeout=60)
        return [n["status"] for n in json.loads(r.stdout)["nodes"]].count("online")

    def teardown(self) -> None:
        groups: set[int] = set()
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
    fed = Federation(tmp_path_factory.mktemp("deploy"))
    try:
        pki.make_ca(fed.pki)
        pki.make_server_cert(fed.pki, ["localhost", "127.0.0.1"])
        for i in range(SITES):
            pki.make_node_keys(fed.pki, f"clinic-{i}")
        pki.make_node_keys(fed.pki, "rogue")  # never registered
        fed.coordinator_key()
        fed.start_superlink()
        for i in range(SITES):
            r = fed.flwr("supernode", "register", str(fed.pki / f"clinic-{i}.pub"), CONN, "--format", "json")
            assert json.loads(r.stdout)["success"], r.stdout + r.stderr
        configs = [fed.site_config(f"clinic-{i}", i) for i in range(SITES)]
        fed.write_registry()
        for i, cfg in enumerate(configs):
            fed.spawn(
                f"clinic-{i}",
                fed.privfed("site", "join", str(cfg), "--", "--host", "127.0.0.1", "--port", str(_free_port())),
            )
        deadline = time.monotonic() + 90
        while fed.nodes_online() < SITES:
            assert time.monotonic() < deadline, "SuperNodes did not come online"
            time.sleep(0.5)
        yield fed
    finally:
        fed.teardown()


def test_tls_federation_with_node_auth_runs_two_rounds(federation):
    run_dir = federation.root / "run"
    overrides = (
        f'num-sites={SITES} rounds=2 run-dir="{run_dir}" vae.hidden-dim=16 vae.latent-dim=2 '
        # as docs/DEPLOYMENT.md advises: the coordinator holds no test split, sites evaluate
        "dp.target-epsilon=0.0 dp.noise-multiplier=1.0 audit.mia=false central-eval=false"
    )
    r = federation.flwr(
        "run", str(REPO), CONN, "--stream", "--run-config", federation.run_config(overrides), timeout=400
    )
    (federation.logs / "flwr-run.log").write_text(r.stdout + r.stderr)
    runs = json.loads(federation.flwr("ls", CONN, "--format", "json").stdout)["runs"]
    # `flwr run` exits 0 even when the ServerApp fails: the run's status is the verdict
    assert r.returncode == 0 and runs[-1]["status"] == "finished:completed", r.stdout[-3000:] + r.stderr[-2000:]

    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    sites = [f"clinic-{i}" for i in range(SITES)]
    assert [m["round"] for m in lines] == [1, 2]
    assert all(sorted(m["sites_trained"]) == sites and m["aggregated"] for m in lines)
    # "test" is combined from the sites' noisy validation sums (metrics.dp, the deployment
    # default): a finite estimate with its error bar, not a bounded value.
    assert all(math.isfinite(m["test"]["neg_elbo"]) and set(m["site_val"]) == set(sites) for m in lines)
    assert all(m["test_std"]["neg_elbo"] > 0 for m in lines)
    ledger = Ledger(run_dir / "ledger.sqlite")
    every = ledger.rows()
    rows = [r for r in every if r.mechanism == "dp-sgd"]
    assert sorted((r.round, r.site_id) for r in rows) == [(rnd, s) for rnd in (1, 2) for s in sites]
    assert all(r.unit == "image" and r.noise_multiplier == 1.0 and r.used for r in rows)
    # metrics.dp is the deployment default: each site's noisy evaluation release is its own ledger row.
    released = [r for r in every if r.mechanism == "gaussian-metrics"]
    assert {r.site_id for r in released} == set(sites) and all(r.rng == "os" for r in released)
    assert all(r.rng == "os" for r in rows)  # dp.secure-rng is the default outside the simulation launcher
    assert ledger.verify(expected_head=lines[-1]["ledger_head"]).ok
    assert "rounds completed: 2" in r.stdout
    # Issue 19: the auditor checks every row against the registered keys, and each site checks
    # the coordinator's ledger against its own records and the receipt it kept. (In process:
    # the same functions `privfed audit --verify` and `privfed site verify` run, whose command
    # lines test_ledger_keys.py and test_site_verify.py exercise.)
    registry = Registry.load(federation.root / "registry.toml")
    check = verify_against_keys(ledger, registry)
    assert check.ok, check.reason
    for site in sites:
        findings, summary = verify_site(federation.root / f"state-{site}", run_dir)
        assert findings == [] and summary.startswith("ok:") and "receipt up to round 1 holds" in summary, findings


def test_sites_refuse_a_run_config_that_asks_for_seeded_noise(federation):
    """Issue 18, finding 5: the coordinator's run config alone cannot seed a site's noise."""
    run_dir = federation.root / "run-seeded"
    overrides = (
        f'num-sites={SITES} rounds=1 run-dir="{run_dir}" vae.hidden-dim=16 vae.latent-dim=2 '
        "dp.target-epsilon=0.0 dp.noise-multiplier=1.0 audit.mia=false central-eval=false dp.secure-rng=false"
    )
    r = federation.flwr(
        "run", str(REPO), CONN, "--stream", "--run-config", federation.run_config(overrides), timeout=400
    )
    (federation.logs / "flwr-run-seeded.log").write_text(r.stdout + r.stderr)
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert lines and not any(m["sites_trained"] for m in lines), lines
    assert any("dp.secure-rng" in f for m in lines for f in m["failures"]), lines[-1]["failures"]
    rows = Ledger(run_dir / "ledger.sqlite").rows()
    assert all(r.steps == 0 for r in rows)
    # Issue 19: each site's refusal reached the ledger as a row it signed (nothing charged),
    # and the auditor can check it against the site's key.
    refusals = {r.site_id for r in rows if r.mechanism == "refusal" and r.status == "refused"}
    assert refusals == {f"clinic-{i}" for i in range(SITES)}, rows
    check = verify_against_keys(Ledger(run_dir / "ledger.sqlite"), Registry.load(federation.root / "registry.toml"))
    assert check.ok, check.reason


def _refused(federation, name: str, cmd: list[str]) -> tuple[int, str]:
    p = federation.spawn(name, cmd)
    rc = p.wait(timeout=90)
    return rc, (federation.logs / f"{name}.log").read_text()


def test_a_supernode_with_an_unregistered_key_or_a_wrong_ca_is_refused(federation, tmp_path):
    # An unregistered key: the SuperLink refuses to activate the node.
    rogue = federation.site_config("rogue", 0)
    rc, log = _refused(
        federation,
        "rogue",
        federation.privfed(
            "site", "join", str(rogue), "--", "--host", "127.0.0.1", "--port", str(_free_port()), "--max-retries", "0"
        ),
    )
    assert rc != 0 and "Failed to activate SuperNode" in log, log[-2000:]

    # A wrong CA: `site join` refuses before connecting, in one line ...
    other = tmp_path / "other-ca"
    other.mkdir()
    pki.make_ca(other)
    wrong = federation.site_config("clinic-wrong-ca", 0, ca=other / "ca.pem", key="clinic-0")
    rc, log = _refused(federation, "wrong-ca-join", federation.privfed("site", "join", str(wrong)))
    assert rc == 2 and "does not verify against ca-cert" in log and len(log.strip().splitlines()) == 1
    # ... and flower-supernode itself, given that CA, fails its TLS handshake.
    rc, log = _refused(
        federation,
        "wrong-ca-supernode",
        [
            str(BIN / "flower-supernode"),
            "--superlink",
            f"127.0.0.1:{federation.port}",
            "--root-certificates",
            str(other / "ca.pem"),
            "--auth-supernode-private-key",
            str(federation.pki / "clinic-0.key"),
            "--host",
            "127.0.0.1",
            "--port",
            str(_free_port()),
            "--max-retries",
            "0",
        ],
    )
    assert rc != 0 and "CERTIFICATE_VERIFY_FAILED" in log, log[-2000:]
    # Neither joined: still exactly the three registered sites online.
    assert federation.nodes_online() == SITES


def test_no_process_is_left_behind(federation):
    federation.teardown()
    time.sleep(1)
    assert simulation_processes() == []
