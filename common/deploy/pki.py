"""Certificates and keys for a deployment, built on ``cryptography``.

* a certificate authority (the coordinator's): ``ca.pem`` + ``ca.key``;
* the SuperLink's TLS certificate, signed by that CA, with subject alternative names for
  every host name and IP address sites will dial: ``superlink.pem`` + ``superlink.key``;
* one SuperNode authentication key pair per site: ECDSA on NIST P-384 in OpenSSH format,
  which is what ``flower-supernode --auth-supernode-private-key/--auth-supernode-public-key``
  and ``flwr supernode register`` read: ``<site>.key`` + ``<site>.pub``.

Private keys are written with mode 0600 (created so, never chmod-ed after the fact), and
nothing is overwritten unless ``force``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.deploy.fileio import write_new_file
from common.errors import PrivfedError

CERT_DAYS = 365


class PkiError(PrivfedError):
    """A certificate or key file that cannot be written or read."""

    def __init__(self, path: object, message: str) -> None:
        super().__init__(f"certificate/key file '{path}': {message}")


def _write_all(files: list[tuple[Path, bytes, bool]], force: bool) -> list[Path]:
    """Write several files as one unit: refuse before writing any if one exists (no half-made CA)."""
    for path, _, _ in files:
        if not path.parent.is_dir():
            raise PkiError(path, f"directory {path.parent} does not exist")
        if path.exists() and not force:
            raise PkiError(path, "already exists (pass --force to replace it)")
    for path, data, private in files:
        try:
            write_new_file(path, data, 0o600 if private else 0o644, force)
        except FileExistsError:  # created by someone else since the check above
            raise PkiError(path, "already exists (pass --force to replace it)") from None
    return [p for p, _, _ in files]


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "privfed"), x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    )


def make_ca(folder: Path, name: str = "privfed federation CA", force: bool = False) -> tuple[Path, Path]:
    """A self-signed CA (P-384, 1 year): (certificate, private key)."""
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CERT_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    cert_path, key_path = _write_all(
        [
            (folder / "ca.pem", cert.public_bytes(serialization.Encoding.PEM), False),
            (folder / "ca.key", _pem_key(key), True),
        ],
        force,
    )
    return cert_path, key_path


def load_ca(folder: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path, key_path = folder / "ca.pem", folder / "ca.key"
    for p in (cert_path, key_path):
        if not p.is_file():
            raise PkiError(p, "not found (create the CA first: `privfed certs ca --out DIR`)")
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except ValueError as exc:
        raise PkiError(folder, f"not a readable CA certificate and key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(key_path, "is not an EC private key")
    return cert, key


def make_server_cert(folder: Path, hosts: list[str], name: str = "superlink", force: bool = False) -> tuple[Path, Path]:
    """The SuperLink's TLS certificate, signed by the CA in ``folder``, with SANs for ``hosts``.

    Each host is an IP address (IP SAN) or a DNS name (DNS SAN); gRPC checks the name a
    SuperNode dials against them.
    """
    if not hosts:
        raise PkiError(folder, "a server certificate needs at least one --host (a DNS name or an IP address)")
    ca_cert, ca_key = load_ca(folder)
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CERT_DAYS))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    cert_path, key_path = _write_all(
        [
            (folder / f"{name}.pem", cert.public_bytes(serialization.Encoding.PEM), False),
            (folder / f"{name}.key", _pem_key(key), True),
        ],
        force,
    )
    return cert_path, key_path


def make_node_keys(folder: Path, name: str, force: bool = False) -> tuple[Path, Path]:
    """A SuperNode authentication key pair (P-384, OpenSSH format): (private, public)."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    priv_path, pub_path = _write_all(
        [(folder / f"{name}.key", private, True), (folder / f"{name}.pub", public + b"\n", False)], force
    )
    return priv_path, pub_path


def check_certificate(path: str | Path, what: str) -> Path:
    """A readable PEM certificate, or one line saying what is wrong with ``what``."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise PkiError(p, f"{what} not found")
    try:
        cert = x509.load_pem_x509_certificate(p.read_bytes())
    except ValueError:
        raise PkiError(p, f"{what} is not a PEM certificate") from None
    if cert.not_valid_after_utc < dt.datetime.now(dt.UTC):
        raise PkiError(p, f"{what} expired on {cert.not_valid_after_utc:%Y-%m-%d}")
    return p


def check_private_key(path: str | Path, what: str) -> Path:
    """An existing private key file that only its owner can read."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise PkiError(p, f"{what} not found")
    mode = p.stat().st_mode & 0o777
    if mode & 0o077:
        raise PkiError(p, f"{what} is readable by group/others (mode {mode:04o}); run: chmod 600 {p}")
    return p
