"""Deployment tooling without processes: certificates, site configs, operator errors."""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import shlex
import socket
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError
from flwr.common.config import parse_config_args

from client.join import preflight_site, supernode_command
from client.supervisor import installed_app_hash
from common.deploy import pki
from common.deploy.app_approval import build_fab, fab_hash_of, sign_app
from common.deploy.keys import KeyFileError, write_key
from common.deploy.signing import new_signing_key, write_signing_key
from common.deploy.site_config import SiteConfig, apply_site_overrides
from common.errors import ConfigError, DataError, PrivfedError
from simulations.cli import main
from tests.conftest import make_cfg
from tests.site_keys import SERVER_KEY, SERVER_PUBLIC

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def pki_dir(tmp_path):
    d = tmp_path / "pki"
    d.mkdir()
    pki.make_ca(d)
    pki.make_server_cert(d, ["localhost", "127.0.0.1"])
    pki.make_node_keys(d, "site-0")
    return d


def _verify(d, name):
    ca = x509.load_pem_x509_certificate((d / "ca.pem").read_bytes())
    leaf = x509.load_pem_x509_certificate((d / "superlink.pem").read_bytes())
    verifier = PolicyBuilder().store(Store([ca])).time(dt.datetime.now(dt.UTC)).build_server_verifier(name)
    return verifier.verify(leaf, [])


def test_server_certificate_chains_to_the_ca_for_its_sans_only(pki_dir):
    _verify(pki_dir, x509.DNSName("localhost"))
    import ipaddress

    _verify(pki_dir, x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    with pytest.raises(VerificationError):
        _verify(pki_dir, x509.DNSName("superlink.evil.example"))


def test_private_files_are_0600_and_nothing_is_overwritten(pki_dir):
    for name in ("ca.key", "superlink.key", "site-0.key"):
        assert (pki_dir / name).stat().st_mode & 0o777 == 0o600
    before = (pki_dir / "ca.key").read_bytes()
    with pytest.raises(pki.PkiError, match="already exists"):
        pki.make_ca(pki_dir)
    assert (pki_dir / "ca.key").read_bytes() == before
    pki.make_ca(pki_dir, force=True)
    assert (pki_dir / "ca.key").read_bytes() != before


def test_node_keys_are_what_flower_loads(pki_dir):
    # flower-supernode: load_ssh_private_key, an EC key on a NIST curve; flwr supernode register: load_ssh_public_key
    priv = load_ssh_private_key((pki_dir / "site-0.key").read_bytes(), password=None)
    pub = load_ssh_public_key((pki_dir / "site-0.pub").read_bytes())
    assert isinstance(priv, ec.EllipticCurvePrivateKey) and priv.curve.name == "secp384r1"
    assert priv.public_key().public_numbers() == pub.public_numbers()


def _site(pki_dir, tmp_path, **kw) -> SiteConfig:
    values = dict(
        site_id="clinic-a",
        partition_id=1,
        superlink="127.0.0.1:1",
        ca_cert=str(pki_dir / "ca.pem"),
        auth_private_key=str(pki_dir / "site-0.key"),
        auth_public_key=str(pki_dir / "site-0.pub"),
        declared_size=200,
        signing_key=str(tmp_path / "clinic-a.signing.pem"),
        server_key=SERVER_PUBLIC,
        approved_apps=installed_app_hash(),  # the privfed installed here, approved
    )
    values.update(kw)
    if not Path(values["signing_key"]).exists():
        write_signing_key(values["signing_key"])
    return SiteConfig(**values)


def test_site_config_round_trips_and_becomes_flowers_node_config(pki_dir, tmp_path):
    key = write_key(tmp_path / "fed.key")
    site = _site(pki_dir, tmp_path, key_file=str(key), data_path=str(tmp_path), data_format="csv", epsilon_budget=4.0)
    path = tmp_path / "site.toml"
    path.write_text(site.to_toml())
    assert SiteConfig.load(path) == site
    parsed = parse_config_args([site.node_config()])
    assert parsed == {
        "partition-id": 1,
        "declared-size": 200,
        "site-id": "clinic-a",
        "device": "auto",
        "key-file": str(key),
        "data-path": str(tmp_path),
        "data-format": "csv",
        "epsilon-budget": 4.0,
        "signing-key": str(tmp_path / "clinic-a.signing.pem"),
        "server-key": SERVER_PUBLIC,
    }
    # The site's own policies travel the same way: its dataset's name and its consent to seeded noise.
    policy = dataclasses.replace(site, dataset_id="clinic-a-ratings", allow_seeded_noise=True, allow_exact_metrics=True)
    path.write_text(policy.to_toml())
    assert SiteConfig.load(path) == policy
    parsed = parse_config_args([policy.node_config()])
    assert parsed["dataset-id"] == "clinic-a-ratings" and parsed["allow-seeded-noise"] is True
    assert parsed["allow-exact-metrics"] is True
    cmd = supernode_command(site, ["--max-retries", "0"])
    assert cmd[cmd.index("--root-certificates") + 1] == str(pki_dir / "ca.pem")
    assert cmd[cmd.index("--auth-supernode-private-key") + 1] == str(pki_dir / "site-0.key")
    assert cmd[1:3] == ["--max-retries", "0"] and "--insecure" not in cmd  # the site's flags first: ours win


@pytest.mark.parametrize(
    "text, match",
    [
        ("site-id = 'a'\n", "partition-id.*missing"),
        ("site-id = 'a'\npartition-id = 'x'\n", "partition-id.*must be int"),
        ("bogus = 1\n", "bogus.*unknown key"),
        ("site-id = [\n", "not valid TOML"),
    ],
)
def test_bad_site_config_is_one_line(tmp_path, text, match):
    p = tmp_path / "site.toml"
    p.write_text(text)
    with pytest.raises(PrivfedError, match=match) as exc:
        SiteConfig.load(p)
    assert "\n" not in str(exc.value)


def test_site_overrides_apply_its_data_device_and_a_stricter_budget():
    cfg = make_cfg(**{"dp.epsilon-budget": 10.0})
    assert apply_site_overrides(cfg, {"partition-id": 0}) is cfg
    site = apply_site_overrides(
        cfg, {"data-path": "/d/x.npz", "data-format": "npz", "device": "cpu", "epsilon-budget": 4.0}
    )
    assert (site.data.path, site.data.source, site.data.partition, site.federation.device) == (
        "/d/x.npz",
        "npz",
        "site",
        "cpu",
    )
    assert site.dp.epsilon_budget == 4.0
    # a site cannot loosen the run's budget
    assert apply_site_overrides(cfg, {"epsilon-budget": 50.0}).dp.epsilon_budget == 10.0
    # below the run's target epsilon: allowed, the site just stops earlier
    target = make_cfg(**{"dp.target-epsilon": 8.0, "dp.epsilon-budget": 8.0})
    assert apply_site_overrides(target, {"epsilon-budget": 4.0}).dp.epsilon_budget == 4.0
    with pytest.raises(ConfigError, match="dp.enabled=false: refusing to train"):
        apply_site_overrides(make_cfg(**{"dp.enabled": False}), {"epsilon-budget": 4.0})
    with pytest.raises(ConfigError, match="site config \\(data.source\\)"):
        apply_site_overrides(cfg, {"data-path": "/d", "data-format": "movielens"})  # not an image source


class TlsListener:
    """A loopback TLS server presenting the SuperLink certificate (handshakes only)."""

    def __init__(self, d):
        import ssl
        import threading

        self.ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ctx.load_cert_chain(d / "superlink.pem", d / "superlink.key")
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            try:
                with self.ctx.wrap_socket(conn, server_side=True):
                    pass
            except OSError:
                pass

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() in the thread (Linux)
        except OSError:
            pass
        self.sock.close()
        self.thread.join(timeout=5)


@pytest.fixture()
def superlink(pki_dir):
    listener = TlsListener(pki_dir)
    yield listener.address
    listener.close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_operator_errors_are_one_line_each(pki_dir, tmp_path, superlink):
    preflight_site(_site(pki_dir, tmp_path, superlink=superlink))  # everything fine
    other = tmp_path / "other-ca"
    other.mkdir()
    pki.make_ca(other)
    cases = [
        (dict(ca_cert=str(tmp_path / "nope.pem")), PrivfedError, "CA certificate \\(ca-cert\\) not found"),
        (dict(ca_cert=str(pki_dir / "site-0.pub")), PrivfedError, "is not a PEM certificate"),
        (
            dict(ca_cert=str(other / "ca.pem")),
            PrivfedError,
            "does not verify against ca-cert.*unable to get local issuer",
        ),
        (dict(superlink=superlink.replace("127.0.0.1", "127.0.0.2")), PrivfedError, "unreachable|does not verify"),
        (dict(auth_private_key=str(pki_dir / "ca.key")), PrivfedError, "not an OpenSSH EC private key"),
        (dict(data_path=str(tmp_path / "missing")), DataError, "not found \\(site config data-path\\)"),
        (dict(key_file=str(tmp_path / "none.key")), KeyFileError, "not found"),
        (dict(superlink=f"127.0.0.1:{_closed_port()}"), PrivfedError, "unreachable"),
        (dict(approved_apps=""), ConfigError, "approved-apps': empty: this site would run no app"),
        (dict(approved_apps="ab" * 32), ConfigError, "builds to app [0-9a-f]{16}, which this site has not approved"),
    ]
    for change, exc_type, match in cases:
        kw = {"superlink": superlink, **change}
        with pytest.raises(exc_type, match=match) as exc:
            preflight_site(_site(pki_dir, tmp_path, **kw))
        assert "\n" not in str(exc.value)
    world = write_key(tmp_path / "fed.key")
    os.chmod(world, 0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        preflight_site(_site(pki_dir, tmp_path, superlink=superlink, key_file=str(world)))
    os.chmod(pki_dir / "site-0.key", 0o644)
    with pytest.raises(PrivfedError, match="auth private key.*chmod 600"):
        preflight_site(_site(pki_dir, tmp_path, superlink=superlink))


def test_cli_init_then_check(pki_dir, tmp_path, capsys):
    listener = TlsListener(pki_dir)
    out = tmp_path / "site.toml"
    args = [
        "site",
        "init",
        "--out",
        str(out),
        "--site-id",
        "clinic-a",
        "--partition-id",
        "0",
        "--superlink",
        listener.address,
        "--ca-cert",
        str(pki_dir / "ca.pem"),
        "--auth-key",
        str(pki_dir / "site-0.key"),
        "--declared-size",
        "200",
        "--server-key",
        SERVER_PUBLIC,
    ]
    assert main(args) == 0
    assert main(args) == 2 and "already exists" in capsys.readouterr().err
    assert (out.stat().st_mode & 0o777) == 0o600  # it names the site's key files and data
    # Not joinable before the site approves an app (issue 20, item 2).
    assert main(["site", "join", str(out), "--check"]) == 2
    assert "approved-apps" in capsys.readouterr().err
    # The coordinator's signature over this checkout's FAB: approved once, and only that.
    fab_hash = fab_hash_of(build_fab(REPO))
    good = sign_app(SERVER_KEY, fab_hash)
    forged = sign_app(new_signing_key(), fab_hash)
    assert main(["site", "approve", str(out), "--signature", forged]) == 2
    assert "not the coordinator's signature" in capsys.readouterr().err
    other = "cd" * 32  # a hash this checkout does not build to, even if signed
    assert main(["site", "approve", str(out), "--signature", sign_app(SERVER_KEY, other), "--fab-hash", other]) == 2
    assert "not the one installed here" in capsys.readouterr().err
    assert SiteConfig.load(out).approved_apps == ""  # nothing was approved by the refusals
    assert main(["site", "approve", str(out), "--signature", good]) == 0
    assert main(["site", "approve", str(out), "--signature", good, "--fab-hash", fab_hash]) == 0  # idempotent
    capsys.readouterr()
    assert SiteConfig.load(out).approved_apps == fab_hash
    assert main(["site", "join", str(out), "--check", "--", "--max-retries", "0"]) == 0
    printed = capsys.readouterr().out
    commands = [shlex.split(line) for line in printed.splitlines() if line.startswith("/")]
    supernode, supervisor = commands  # each pasteable: shlex gives back the exact argv
    assert supernode[0].endswith("flower-supernode") and supernode[1:3] == ["--max-retries", "0"]
    assert supernode[supernode.index("--isolation") + 1] == "process"
    assert parse_config_args([supernode[supernode.index("--node-config") + 1]])["site-id"] == "clinic-a"
    assert supervisor[1:3] == ["-m", "client.supervisor"] and fab_hash in supervisor
    # A flag after `--` that would undo the guard is refused, in one line.
    assert main(["site", "join", str(out), "--check", "--", "--isolation", "subprocess"]) == 2
    assert "--isolation" in capsys.readouterr().err
    listener.close()
    assert main(["site", "join", str(out), "--check"]) == 2  # the SuperLink is gone
    assert "unreachable" in capsys.readouterr().err


def test_a_site_with_its_own_file_uses_all_of_it(tmp_path):
    import numpy as np

    from common.runtime import cached_task

    x = np.random.default_rng(0).integers(0, 256, size=(50, 16), dtype=np.uint8)
    np.savez(tmp_path / "mine.npz", x=x)
    cfg = apply_site_overrides(
        make_cfg(**{"num-sites": 3}), {"data-path": str(tmp_path / "mine.npz"), "data-format": "npz"}
    )
    train, val = cached_task(cfg).site_data(2)
    assert len(train) + len(val) == 50 and len(val) >= 1
    assert cached_task(cfg).input_dim == 16


def test_a_half_made_ca_folder_is_refused_before_anything_is_written(tmp_path):
    pki.make_ca(tmp_path)
    (tmp_path / "ca.key").unlink()
    pem = (tmp_path / "ca.pem").read_bytes()
    with pytest.raises(pki.PkiError, match="ca.pem.*already exists"):
        pki.make_ca(tmp_path)
    assert not (tmp_path / "ca.key").exists() and (tmp_path / "ca.pem").read_bytes() == pem
    # a symlink planted where a key will go is not followed or replaced
    (tmp_path / "n.key").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(pki.PkiError, match="already exists"):
        pki.make_node_keys(tmp_path, "n")
    assert not (tmp_path / "elsewhere").exists() and not (tmp_path / "n.pub").exists()


def test_node_config_survives_quotes_and_tilde(pki_dir, tmp_path):
    site = _site(pki_dir, tmp_path, data_path="/data/my odd dir\\x", key_file="~/fed.key")
    parsed = parse_config_args([site.node_config()])
    assert parsed["data-path"] == "/data/my odd dir\\x"
    assert parsed["key-file"] == os.path.expanduser("~/fed.key")
    with pytest.raises(ConfigError, match="data-path.*double quote"):
        _site(pki_dir, tmp_path, data_path='/data/"x"').validate()


def test_double_dash_is_only_a_passthrough_for_site_join(capsys):
    assert main(["config", "vae-digits", "--", "rounds=3"]) == 0
    assert "rounds = 3" in capsys.readouterr().out
