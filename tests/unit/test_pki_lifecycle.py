"""Certificate lifecycle (issue 20, finding 6): CA passphrase, validity, rotation, expiry
checks, and finding a site's Flower node id so Flower's own `unregister` can revoke it."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store

from common.deploy import pki
from simulations.cli import main

PASS = b"correct horse battery staple"


def _pwfile(tmp_path: Path, data: bytes = PASS + b"\n", mode: int = 0o600) -> Path:
    p = tmp_path / "ca.pass"
    p.write_bytes(data)
    os.chmod(p, mode)
    return p


@pytest.fixture()
def locked(tmp_path: Path) -> Path:
    """A CA whose key is encrypted, and a server certificate signed with it."""
    d = tmp_path / "pki"
    d.mkdir()
    pki.make_ca(d, passphrase=PASS)
    pki.make_server_cert(d, ["localhost", "127.0.0.1"], passphrase=PASS)
    return d


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _verifies(d: Path, name: x509.GeneralName) -> None:
    verifier = PolicyBuilder().store(Store([_cert(d / "ca.pem")])).time(dt.datetime.now(dt.UTC))
    verifier.build_server_verifier(name).verify(_cert(d / "superlink.pem"), [])


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    assert PASS.decode() not in err  # the passphrase is never echoed
    return err


# --------------------------------------------------------------------------- passphrase


def test_an_encrypted_ca_key_cannot_be_loaded_without_its_passphrase(locked):
    raw = (locked / "ca.key").read_bytes()
    assert raw.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    with pytest.raises(TypeError):
        serialization.load_pem_private_key(raw, password=None)
    with pytest.raises(ValueError):
        serialization.load_pem_private_key(raw, password=b"not the passphrase")
    assert isinstance(serialization.load_pem_private_key(raw, password=PASS), ec.EllipticCurvePrivateKey)
    assert (locked / "ca.key").stat().st_mode & 0o777 == 0o600


def test_a_missing_or_wrong_passphrase_is_one_line_naming_the_option(locked, tmp_path, capsys, monkeypatch):
    before = (locked / "superlink.pem").read_bytes()
    assert main(["certs", "rotate", "--out", str(locked)]) == 2
    assert "--passphrase-file" in _one_line_error(capsys)
    wrong = tmp_path / "wrong"
    wrong.write_bytes(b"not the passphrase at all")
    os.chmod(wrong, 0o600)
    assert main(["certs", "rotate", "--out", str(locked), "--passphrase-file", str(wrong)]) == 2
    assert "wrong passphrase" in _one_line_error(capsys)
    monkeypatch.delenv("PRIVFED_CA_PASSPHRASE", raising=False)
    assert main(["certs", "rotate", "--out", str(locked), "--passphrase-env", "PRIVFED_CA_PASSPHRASE"]) == 2
    assert "--passphrase-env PRIVFED_CA_PASSPHRASE" in _one_line_error(capsys)
    assert (locked / "superlink.pem").read_bytes() == before  # nothing changed on disk
    assert not (locked / "superlink.pem.prev").exists()
    # the right passphrase, from a file or from a named variable, works
    assert main(["certs", "rotate", "--out", str(locked), "--passphrase-file", str(_pwfile(tmp_path))]) == 0
    monkeypatch.setenv("PRIVFED_CA_PASSPHRASE", PASS.decode())
    assert main(["certs", "rotate", "--out", str(locked), "--passphrase-env", "PRIVFED_CA_PASSPHRASE"]) == 0


def test_a_passphrase_file_others_can_read_is_refused_with_a_chmod_hint(tmp_path, capsys):
    (tmp_path / "pki").mkdir()
    pw = _pwfile(tmp_path, mode=0o644)
    assert main(["certs", "ca", "--out", str(tmp_path / "pki"), "--passphrase-file", str(pw)]) == 2
    err = _one_line_error(capsys)
    assert "readable by group/others" in err and "chmod 600" in err
    assert not (tmp_path / "pki" / "ca.key").exists()


@pytest.mark.parametrize(
    ("data", "reason"),
    [(b"\n", "is empty"), (b"short\n", "too short")],
)
def test_an_empty_or_short_passphrase_is_refused(tmp_path, capsys, data, reason):
    (tmp_path / "pki").mkdir()
    pw = _pwfile(tmp_path, data)
    assert main(["certs", "ca", "--out", str(tmp_path / "pki"), "--passphrase-file", str(pw)]) == 2
    assert reason in _one_line_error(capsys)
    assert not (tmp_path / "pki" / "ca.key").exists()


def test_the_passphrase_is_never_an_argument_and_one_source_only(tmp_path):
    with pytest.raises(SystemExit):  # argparse: not allowed with
        main(["certs", "ca", "--out", str(tmp_path), "--passphrase-file", "f", "--passphrase-env", "V"])
    with pytest.raises(SystemExit):
        main(["certs", "ca", "--out", str(tmp_path), "--passphrase", "secret"])
    with pytest.raises(pki.PassphraseError, match="not both"):
        pki.read_passphrase("f", "V")


def test_an_unencrypted_ca_still_works_but_is_warned_about(tmp_path, capsys):
    d = tmp_path / "pki"
    d.mkdir()
    assert main(["certs", "ca", "--out", str(d)]) == 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unencrypted" in err and "--passphrase-file" in err
    assert main(["certs", "server", "--out", str(d), "--host", "localhost"]) == 0
    # a passphrase for a key that has none is a mistake worth stopping at
    assert main(["certs", "rotate", "--out", str(d), "--passphrase-file", str(_pwfile(tmp_path))]) == 2
    assert "is not encrypted" in _one_line_error(capsys)


def test_protect_ca_encrypts_an_existing_key_in_place(tmp_path, capsys):
    d = tmp_path / "pki"
    d.mkdir()
    pki.make_ca(d)
    pem = (d / "ca.pem").read_bytes()
    assert main(["certs", "protect-ca", "--out", str(d), "--passphrase-file", str(_pwfile(tmp_path))]) == 0
    assert pki.is_encrypted_key(d / "ca.key") and (d / "ca.key").stat().st_mode & 0o777 == 0o600
    assert (d / "ca.pem").read_bytes() == pem  # sites keep their ca.pem
    capsys.readouterr()
    assert main(["certs", "server", "--out", str(d), "--host", "localhost"]) == 2
    assert "is encrypted" in _one_line_error(capsys)
    pki.make_server_cert(d, ["localhost"], passphrase=PASS)


def test_a_ca_key_others_can_read_is_refused(locked):
    os.chmod(locked / "ca.key", 0o644)
    with pytest.raises(pki.PkiError, match="chmod 600"):
        pki.load_ca(locked, PASS)


# --------------------------------------------------------------------------- validity


def _days(cert: x509.Certificate) -> float:
    return (cert.not_valid_after_utc - dt.datetime.now(dt.UTC)).total_seconds() / 86400


def test_default_lifetimes_and_constraints(locked):
    ca, leaf = _cert(locked / "ca.pem"), _cert(locked / "superlink.pem")
    assert pki.CA_DAYS - 1 < _days(ca) <= pki.CA_DAYS and pki.CA_DAYS == 1825
    assert pki.SERVER_DAYS - 1 < _days(leaf) <= pki.SERVER_DAYS and pki.SERVER_DAYS == 90
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    leaf_bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints)
    assert leaf_bc.critical and not leaf_bc.value.ca
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert pki.cert_hosts(leaf) == ["localhost", "127.0.0.1"]


def test_days_option_and_its_limits(tmp_path, capsys):
    d = tmp_path / "pki"
    d.mkdir()
    assert main(["certs", "ca", "--out", str(d), "--days", "400"]) == 0
    assert 399 < _days(_cert(d / "ca.pem")) <= 400
    assert main(["certs", "server", "--out", str(d), "--host", "h", "--days", "30"]) == 0
    assert 29 < _days(_cert(d / "superlink.pem")) <= 30
    capsys.readouterr()
    # a server certificate never outlives its CA
    assert main(["certs", "rotate", "--out", str(d), "--days", "500"]) == 2
    assert "smaller --days" in _one_line_error(capsys)
    assert main(["certs", "rotate", "--out", str(d), "--days", "0"]) == 2
    assert "--days" in _one_line_error(capsys)


# --------------------------------------------------------------------------- rotation


def test_rotation_keeps_the_ca_and_the_sans_and_the_previous_pair(locked, tmp_path, capsys):
    old_pem, old_key = (locked / "superlink.pem").read_bytes(), (locked / "superlink.key").read_bytes()
    ca_pem = (locked / "ca.pem").read_bytes()
    args = ["certs", "rotate", "--out", str(locked), "--passphrase-file", str(_pwfile(tmp_path))]
    assert main([*args, "--proxy-dir", "/var/lib/privfed/proxy"]) == 0
    out = capsys.readouterr().out
    assert "privfed coordinator proxy --reload --dir /var/lib/privfed/proxy" in out and "ca.pem is unchanged" in out
    assert (locked / "ca.pem").read_bytes() == ca_pem
    new = _cert(locked / "superlink.pem")
    assert new.serial_number != _cert(locked / "superlink.pem.prev").serial_number
    assert (locked / "superlink.key").read_bytes() != old_key
    _verifies(locked, x509.DNSName("localhost"))  # same SANs, by default taken from the old one
    _verifies(locked, x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    assert (locked / "superlink.pem.prev").read_bytes() == old_pem
    assert (locked / "superlink.key.prev").read_bytes() == old_key
    for name in ("superlink.key", "superlink.key.prev", "superlink.pem.prev"):
        assert (locked / name).stat().st_mode & 0o777 == 0o600, name
    # the new key belongs to the new certificate
    key = serialization.load_pem_private_key((locked / "superlink.key").read_bytes(), password=None)
    assert key.public_key() == new.public_key()
    # new hosts replace the SANs
    assert main([*args, "--host", "superlink.example.org"]) == 0
    assert pki.cert_hosts(_cert(locked / "superlink.pem")) == ["superlink.example.org"]
    assert not list(locked.glob(".*tmp*"))  # no temp files left behind


def test_rotating_nothing_is_one_line(tmp_path, capsys):
    d = tmp_path / "pki"
    d.mkdir()
    pki.make_ca(d)
    assert main(["certs", "rotate", "--out", str(d)]) == 2
    assert "nothing to rotate" in _one_line_error(capsys)


def test_server_over_an_existing_certificate_points_to_rotate(locked, capsys):
    assert main(["certs", "server", "--out", str(locked), "--host", "localhost"]) == 2
    assert "privfed certs rotate" in _one_line_error(capsys)


# --------------------------------------------------------------------------- status


def _write_leaf(d: Path, not_after: dt.datetime) -> None:
    """Replace superlink.pem with one signed by the CA that ends at ``not_after``."""
    ca_cert, ca_key = pki.load_ca(d, PASS)
    key = ec.generate_private_key(ec.SECP384R1())
    start = min(not_after, dt.datetime.now(dt.UTC)) - dt.timedelta(days=10)
    cert = pki.build_server_cert(ca_cert, ca_key, key, ["localhost"], start, not_after)
    (d / "superlink.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def test_status_exit_codes_for_cron(locked, tmp_path, capsys):
    now = dt.datetime.now(dt.UTC)
    assert main(["certs", "status", "--out", str(locked)]) == 0
    out = capsys.readouterr().out
    assert "SANs localhost, 127.0.0.1" in out and "days left" in out and "not after" in out
    assert main(["certs", "status", "--out", str(locked), "--warn-days", "120"]) == 1  # 90 < 120
    _write_leaf(locked, now + dt.timedelta(days=3))
    assert main(["certs", "status", "--out", str(locked)]) == 1
    assert "expires within 30 days" in capsys.readouterr().out
    _write_leaf(locked, now - dt.timedelta(days=1))
    assert main(["certs", "status", "--out", str(locked)]) == 2
    assert "expired" in capsys.readouterr().out
    # a server certificate from another CA (a CA remade but the server not) is flagged
    other = tmp_path / "other"
    other.mkdir()
    pki.make_ca(other)
    pki.make_server_cert(other, ["localhost"])
    (locked / "superlink.pem").write_bytes((other / "superlink.pem").read_bytes())
    assert main(["certs", "status", "--out", str(locked)]) == 2
    assert "not signed by ca.pem" in capsys.readouterr().out


def test_status_of_an_unreadable_certificate_is_one_line(locked, capsys):
    (locked / "superlink.pem").write_text("not a certificate")
    assert main(["certs", "status", "--out", str(locked)]) == 2
    assert "not a PEM certificate" in _one_line_error(capsys)


# --------------------------------------------------------------------------- revocation helper


def _flower_state(db: Path):  # noqa: ANN202 - Flower's SqlLinkState
    from flwr.server.superlink.linkstate.sql_linkstate import SqlLinkState
    from flwr.supercore.object_store.object_store_factory import ObjectStoreFactory
    from flwr.superlink.federation.noop_federation_manager import NoOpFederationManager

    state = SqlLinkState(str(db), NoOpFederationManager(), ObjectStoreFactory().store())
    state.initialize()
    return state


def test_node_keys_from_the_cli_need_no_ca_passphrase(locked, capsys):
    assert main(["certs", "node", "--out", str(locked), "--name", "clinic-a"]) == 0
    assert "registers clinic-a.pub" in capsys.readouterr().out
    assert (locked / "clinic-a.key").stat().st_mode & 0o777 == 0o600


def test_node_id_of_a_sites_key_as_flower_stored_it(tmp_path, capsys):
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    pki.make_node_keys(tmp_path, "clinic-a")
    pki.make_node_keys(tmp_path, "clinic-b")
    db = tmp_path / "superlink.db"
    state = _flower_state(db)
    # what `flwr supernode register clinic-a.pub` stores (flwr/cli/supernode/register.py)
    pub = serialization.load_ssh_public_key((tmp_path / "clinic-a.pub").read_bytes())
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    node_id = state.create_node("aid", "owner", public_key_to_bytes(pub), 30.0)
    assert pki.node_id_for_key(db, tmp_path / "clinic-a.pub") == (node_id, "registered")
    assert main(["certs", "node-id", str(tmp_path / "clinic-a.pub"), "--database", str(db)]) == 0
    assert capsys.readouterr().out.strip() == f"{node_id} (registered)"
    state.delete_node("aid", node_id)  # what `flwr supernode unregister NODE_ID` does
    assert pki.node_id_for_key(db, tmp_path / "clinic-a.pub") == (node_id, "unregistered")
    assert main(["certs", "node-id", str(tmp_path / "clinic-b.pub"), "--database", str(db)]) == 1
    assert "no SuperNode registered" in capsys.readouterr().err


def test_node_id_hostile_inputs_are_one_line(tmp_path, capsys):
    pki.make_node_keys(tmp_path, "site")
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not sqlite at all" * 100)
    for argv, reason in [
        ([str(tmp_path / "site.pub"), "--database", str(junk)], "cannot be read as a Flower state"),
        ([str(tmp_path / "site.pub"), "--database", str(tmp_path / "none.db")], "not found"),
        ([str(tmp_path / "site.key"), "--database", str(junk)], "not an OpenSSH public key"),
    ]:
        assert main(["certs", "node-id", *argv]) == 2
        assert reason in _one_line_error(capsys)
