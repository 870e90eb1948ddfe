"""Certificates and keys for a deployment, built on ``cryptography``.

* a certificate authority (the coordinator's): ``ca.pem`` + ``ca.key``, the key
  optionally encrypted under a passphrase (``BestAvailableEncryption``);
* the SuperLink's TLS certificate, signed by that CA, with subject alternative names for
  every host name and IP address sites will dial: ``superlink.pem`` + ``superlink.key``;
* one SuperNode authentication key pair per site: ECDSA on NIST P-384 in OpenSSH format,
  which is what ``flower-supernode --auth-supernode-private-key/--auth-supernode-public-key``
  and ``flwr supernode register`` read: ``<site>.key`` + ``<site>.pub``.

Lifetimes: the CA lasts :data:`CA_DAYS` (5 years), because replacing it means a new
``ca.pem`` at every site. The server certificate lasts :data:`SERVER_DAYS` (90 days):
:func:`rotate_server_cert` replaces it without touching the CA, so sites need nothing new,
and the proxy in front of the SuperLink picks it up on a reload; a short life bounds how
long a leaked server key is useful (nothing checks revocation lists here).

Private keys are written with mode 0600 (created so, never chmod-ed after the fact), and
nothing is overwritten unless ``force`` (or by a rotation, which keeps the previous pair).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import sqlite3
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.deploy.fileio import write_new_file
from common.errors import PrivfedError

CA_DAYS = 5 * 365
SERVER_DAYS = 90
WARN_DAYS = 30
MIN_PASSPHRASE = 12
SERVER_NAME = "superlink"
PREV_SUFFIX = ".prev"


class PkiError(PrivfedError):
    """A certificate or key file that cannot be written or read."""

    def __init__(self, path: object, message: str) -> None:
        super().__init__(f"certificate/key file '{path}': {message}")


class PassphraseError(PrivfedError):
    """A CA passphrase that is missing, wrong, too short or over-exposed (one line, never the value)."""


def _write_all(
    files: list[tuple[Path, bytes, bool]], force: bool, hint: str = "pass --force to replace it"
) -> list[Path]:
    """Write several files as one unit: refuse before writing any if one exists (no half-made CA)."""
    for path, _, _ in files:
        if not path.parent.is_dir():
            raise PkiError(path, f"directory {path.parent} does not exist")
        if path.exists() and not force:
            raise PkiError(path, f"already exists ({hint})")
    for path, data, private in files:
        try:
            write_new_file(path, data, 0o600 if private else 0o644, force)
        except FileExistsError:  # created by someone else since the check above
            raise PkiError(path, f"already exists ({hint})") from None
    return [p for p, _, _ in files]


def _pem_key(key: ec.EllipticCurvePrivateKey, passphrase: bytes | None = None) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
    )
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "privfed"), x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    )


def _check_days(days: int, what: str) -> None:
    if not isinstance(days, int) or isinstance(days, bool) or days < 1:
        raise PkiError(what, "--days must be a whole number of days, at least 1")


# --------------------------------------------------------------------------- passphrase


def read_passphrase(file: str | Path | None = None, env: str | None = None) -> bytes | None:
    """The CA passphrase from a file (``--passphrase-file``) or an environment variable
    (``--passphrase-env NAME``), or None when neither is given.

    Never from the command line itself: argv is visible to every user in ``ps``. The file
    is refused when group or others may read it, like a key file; one trailing newline is
    dropped (``echo ... > file`` adds one). Errors never show the passphrase.
    """
    if file is not None and env is not None:
        raise PassphraseError("give --passphrase-file or --passphrase-env, not both")
    if file is not None:
        p = Path(file).expanduser()
        if not p.is_file():
            raise PassphraseError(f"--passphrase-file '{p}': not found")
        mode = stat.S_IMODE(p.stat().st_mode)
        if mode & 0o077:
            raise PassphraseError(
                f"--passphrase-file '{p}': is readable by group/others (mode {mode:04o}); run: chmod 600 {p}"
            )
        try:
            data = p.read_bytes()
        except OSError as exc:
            raise PassphraseError(f"--passphrase-file '{p}': cannot be read ({type(exc).__name__})") from None
        data = data[:-1] if data.endswith(b"\n") else data
        data = data[:-1] if data.endswith(b"\r") else data
        if not data:
            raise PassphraseError(f"--passphrase-file '{p}': is empty")
        return data
    if env is not None:
        value = os.environ.get(env)
        if not value:
            raise PassphraseError(f"--passphrase-env {env}: the environment variable is not set or empty")
        return value.encode("utf-8")
    return None


def _require_strong(passphrase: bytes) -> None:
    if len(passphrase) < MIN_PASSPHRASE:
        raise PassphraseError(
            f"CA passphrase: too short ({len(passphrase)} bytes; use at least {MIN_PASSPHRASE}, "
            "e.g. `openssl rand -base64 24`)"
        )


def is_encrypted_key(path: Path) -> bool:
    """Whether a PEM private key file is encrypted (PKCS#8 ``ENCRYPTED PRIVATE KEY``)."""
    return b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in path.read_bytes()


# --------------------------------------------------------------------------- CA


def make_ca(
    folder: Path,
    name: str = "privfed federation CA",
    force: bool = False,
    *,
    days: int = CA_DAYS,
    passphrase: bytes | None = None,
) -> tuple[Path, Path]:
    """A self-signed CA (P-384, ``days`` long): (certificate, private key).

    With ``passphrase`` the key is stored encrypted (``BestAvailableEncryption``), so a
    stolen ``ca.key`` (a backup, a copied laptop) cannot mint a server certificate.
    ``path_length=0``: it signs leaf certificates only, never another CA.
    """
    _check_days(days, "ca.pem")
    if passphrase is not None:
        _require_strong(passphrase)
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    cert_path, key_path = _write_all(
        [
            (folder / "ca.pem", cert.public_bytes(serialization.Encoding.PEM), False),
            (folder / "ca.key", _pem_key(key, passphrase), True),
        ],
        force,
    )
    return cert_path, key_path


def load_ca(folder: Path, passphrase: bytes | None = None) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The CA certificate and key in ``folder``; an encrypted key needs ``passphrase``.

    Every failure is one line naming the option to fix it; the passphrase is never shown.
    """
    cert_path, key_path = folder / "ca.pem", folder / "ca.key"
    for p in (cert_path, key_path):
        if not p.is_file():
            raise PkiError(p, "not found (create the CA first: `privfed certs ca --out DIR`)")
    mode = stat.S_IMODE(key_path.stat().st_mode)
    if mode & 0o077:
        raise PkiError(key_path, f"is readable by group/others (mode {mode:04o}); run: chmod 600 {key_path}")
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except ValueError:
        raise PkiError(cert_path, "is not a PEM certificate") from None
    encrypted = is_encrypted_key(key_path)
    if encrypted and passphrase is None:
        raise PassphraseError(
            f"CA key '{key_path}': is encrypted; "
            "give its passphrase with --passphrase-file FILE or --passphrase-env NAME"
        )
    if not encrypted and passphrase is not None:
        raise PassphraseError(
            f"CA key '{key_path}': is not encrypted, but a passphrase was given "
            "(drop the passphrase option, or encrypt it: `privfed certs protect-ca`)"
        )
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=passphrase)
    except ValueError as exc:
        if encrypted:
            raise PassphraseError(
                f"CA key '{key_path}': wrong passphrase (check --passphrase-file/--passphrase-env)"
            ) from None
        raise PkiError(key_path, f"is not a readable private key ({type(exc).__name__})") from None
    except (TypeError, UnsupportedAlgorithm):
        raise PkiError(key_path, "is not a readable private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(key_path, "is not an EC private key")
    if key.public_key() != cert.public_key():
        raise PkiError(key_path, "does not belong to ca.pem")
    return cert, key


def protect_ca_key(folder: Path, passphrase: bytes) -> Path:
    """Encrypt an existing, unencrypted ``ca.key`` in place (atomically, mode 0600), so a
    federation made before passphrases existed needs no new CA (and no new ``ca.pem`` at
    the sites)."""
    _require_strong(passphrase)
    _, key = load_ca(folder, None)
    key_path = folder / "ca.key"
    write_new_file(key_path, _pem_key(key, passphrase), 0o600, force=True)
    return key_path


# --------------------------------------------------------------------------- server certificate


def _sans(hosts: list[str]) -> list[x509.GeneralName]:
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    return sans


def build_server_cert(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    key: ec.EllipticCurvePrivateKey,
    hosts: list[str],
    not_before: dt.datetime,
    not_after: dt.datetime,
) -> x509.Certificate:
    """A leaf TLS certificate for ``hosts`` (SANs; gRPC/HTTPS clients check the dialled
    name against them), serverAuth only, signed by the CA."""
    return (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(_sans(hosts)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )


def _new_server_pair(folder: Path, hosts: list[str], days: int, passphrase: bytes | None) -> tuple[bytes, bytes]:
    if not hosts:
        raise PkiError(folder, "a server certificate needs at least one --host (a DNS name or an IP address)")
    _check_days(days, "server certificate")
    ca_cert, ca_key = load_ca(folder, passphrase)
    now = dt.datetime.now(dt.UTC)
    not_after = now + dt.timedelta(days=days)
    if not_after > ca_cert.not_valid_after_utc:
        raise PkiError(
            folder / "ca.pem",
            f"expires on {ca_cert.not_valid_after_utc:%Y-%m-%d}, before a {days}-day server certificate would; "
            "use a smaller --days or make a new CA",
        )
    key = ec.generate_private_key(ec.SECP384R1())
    cert = build_server_cert(ca_cert, ca_key, key, hosts, now - dt.timedelta(minutes=5), not_after)
    return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


def make_server_cert(
    folder: Path,
    hosts: list[str],
    name: str = SERVER_NAME,
    force: bool = False,
    *,
    days: int = SERVER_DAYS,
    passphrase: bytes | None = None,
) -> tuple[Path, Path]:
    """The SuperLink's TLS certificate, signed by the CA in ``folder``, with SANs for ``hosts``.

    Each host is an IP address (IP SAN) or a DNS name (DNS SAN). It lasts ``days``
    (default 90), never beyond the CA.
    """
    hint = "renew it with `privfed certs rotate`, or pass --force to replace it"
    for p in (folder / f"{name}.pem", folder / f"{name}.key"):
        if p.exists() and not force:  # before the CA is unlocked: say it first
            raise PkiError(p, f"already exists ({hint})")
    cert_pem, key_pem = _new_server_pair(folder, hosts, days, passphrase)
    cert_path, key_path = _write_all(
        [(folder / f"{name}.pem", cert_pem, False), (folder / f"{name}.key", key_pem, True)], force, hint
    )
    return cert_path, key_path


def cert_hosts(cert: x509.Certificate) -> list[str]:
    """The DNS names and IP addresses a certificate's SAN extension lists, in order."""
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(n.value) for n in ext if isinstance(n, (x509.DNSName, x509.IPAddress))]


@dataclass(frozen=True)
class Rotation:
    """What :func:`rotate_server_cert` did: the new pair, the kept previous pair, its SANs."""

    cert: Path
    key: Path
    prev_cert: Path
    prev_key: Path
    hosts: list[str]
    not_after: dt.datetime


def rotate_server_cert(
    folder: Path,
    hosts: list[str] | None = None,
    name: str = SERVER_NAME,
    *,
    days: int = SERVER_DAYS,
    passphrase: bytes | None = None,
) -> Rotation:
    """Replace the server key and certificate with new ones signed by the same CA.

    ``hosts`` defaults to the current certificate's SANs. The current pair is kept as
    ``NAME.pem.prev``/``NAME.key.prev`` (both 0600) so a bad rollout can be undone. Every
    file is written to a temp file, fsync'ed and renamed (then the folder fsync'ed): a crash
    leaves each file old or new, never torn. The new pair is built and checked against the
    CA before anything on disk changes. Sites need nothing: their ``ca.pem`` is unchanged.
    """
    cert_path, key_path = folder / f"{name}.pem", folder / f"{name}.key"
    for p in (cert_path, key_path):
        if not p.is_file():
            raise PkiError(p, "not found; nothing to rotate (create it with `privfed certs server`)")
    old_pem, old_key = cert_path.read_bytes(), key_path.read_bytes()
    if not hosts:
        try:
            hosts = cert_hosts(x509.load_pem_x509_certificate(old_pem))
        except ValueError:
            raise PkiError(cert_path, "is not a PEM certificate; give the hosts with --host") from None
    cert_pem, key_pem = _new_server_pair(folder, hosts, days, passphrase)
    new_cert = x509.load_pem_x509_certificate(cert_pem)
    verify_signed_by(new_cert, x509.load_pem_x509_certificate((folder / "ca.pem").read_bytes()), cert_path)
    prev_cert, prev_key = folder / f"{name}.pem{PREV_SUFFIX}", folder / f"{name}.key{PREV_SUFFIX}"
    write_new_file(prev_key, old_key, 0o600, force=True)
    write_new_file(prev_cert, old_pem, 0o600, force=True)
    # key first: a proxy reload between the two renames fails its key/cert check and keeps
    # serving the old pair (nginx validates before it switches), never a mismatched one.
    write_new_file(key_path, key_pem, 0o600, force=True)
    write_new_file(cert_path, cert_pem, 0o644, force=True)
    return Rotation(cert_path, key_path, prev_cert, prev_key, list(hosts), new_cert.not_valid_after_utc)


def verify_signed_by(cert: x509.Certificate, ca_cert: x509.Certificate, path: object) -> None:
    """Raise PkiError unless ``cert`` carries a valid signature by ``ca_cert``."""
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        raise PkiError(path, "is not signed by ca.pem") from None


# --------------------------------------------------------------------------- status


@dataclass(frozen=True)
class CertStatus:
    """One certificate's state for ``privfed certs status``."""

    path: Path
    subject: str
    hosts: list[str]
    not_after: dt.datetime
    days_left: float
    problem: str | None  # None: fine; else why it needs attention

    @property
    def expired(self) -> bool:
        return self.days_left <= 0


def cert_status(path: Path, warn_days: int = WARN_DAYS, ca_cert: x509.Certificate | None = None) -> CertStatus:
    """Read a certificate and say whether it is expired, due within ``warn_days``, or not
    signed by ``ca_cert`` (a server certificate left over from an older CA)."""
    if not path.is_file():
        raise PkiError(path, "not found")
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError:
        raise PkiError(path, "is not a PEM certificate") from None
    not_after = cert.not_valid_after_utc
    days_left = (not_after - dt.datetime.now(dt.UTC)).total_seconds() / 86400
    problem: str | None = None
    if days_left <= 0:
        problem = "expired"
    elif days_left <= warn_days:
        problem = f"expires within {warn_days} days"
    if ca_cert is not None and problem is None:
        try:
            verify_signed_by(cert, ca_cert, path)
        except PkiError:
            problem = "not signed by ca.pem"
    return CertStatus(path, cert.subject.rfc4514_string(), cert_hosts(cert), not_after, days_left, problem)


def folder_status(folder: Path, warn_days: int = WARN_DAYS, name: str = SERVER_NAME) -> list[CertStatus]:
    """The CA's and the server certificate's status (the server's only if it exists)."""
    ca = cert_status(folder / "ca.pem", warn_days)
    out = [ca]
    server = folder / f"{name}.pem"
    if server.exists():
        out.append(cert_status(server, warn_days, x509.load_pem_x509_certificate((folder / "ca.pem").read_bytes())))
    return out


# --------------------------------------------------------------------------- SuperNode keys


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


def node_id_for_key(database: Path, public_key_file: Path) -> tuple[int, str] | None:
    """The Flower node id (and status) registered for a site's ``.pub`` file, read from the
    SuperLink's SQLite state (``flower-superlink --database``), opened read-only.

    Flower 1.41 stores each node's key but ``flwr supernode list`` does not show it, and
    every node has the same owner without account auth, so this is how an operator who
    did not keep ``flwr supernode register --format json``'s output finds the id to pass to
    ``flwr supernode unregister``. The key is matched as Flower stores it (PEM
    SubjectPublicKeyInfo); the unit test builds the database with Flower's own
    ``SqlLinkState`` so a schema change upstream fails there, not in an incident.
    """
    if not public_key_file.is_file():
        raise PkiError(public_key_file, "SuperNode public key not found")
    try:
        pub = serialization.load_ssh_public_key(public_key_file.read_bytes())
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise PkiError(public_key_file, "is not an OpenSSH public key (the site's NAME.pub)") from None
    if not isinstance(pub, ec.EllipticCurvePublicKey):
        raise PkiError(public_key_file, "is not an EC public key")
    stored = pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    if not database.is_file():
        raise PrivfedError(f"SuperLink database '{database}': not found (the file given to --database)")
    try:
        con = sqlite3.connect(f"{database.resolve().as_uri()}?mode=ro", uri=True)
        try:
            row = con.execute(
                "SELECT node_id, status FROM node WHERE public_key = ? ORDER BY registered_at DESC LIMIT 1", (stored,)
            ).fetchone()
        finally:
            con.close()
    except sqlite3.Error as exc:
        raise PrivfedError(
            f"SuperLink database '{database}': cannot be read as a Flower state ({type(exc).__name__})"
        ) from None
    if row is None:
        return None
    return int(row[0]) % 2**64, str(row[1])  # Flower stores uint64 ids as signed int64


# --------------------------------------------------------------------------- checks used by `site join`


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
