"""``privfed site join``: check a site's config, then become its ``flower-supernode``.

Every check here is one an operator actually fails, each reported in one line before
anything connects: a certificate path that is wrong or not a certificate, an auth key
that is missing or readable by others, a federation key file that is missing or
world-readable, a data path that does not exist, a SuperLink that does not answer.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import sys
import tempfile
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key

from common.deploy.keys import load_key
from common.deploy.pki import PkiError, check_certificate, check_private_key
from common.deploy.signing import load_signing_key
from common.deploy.site_config import SiteConfig
from common.errors import DataError, PrivfedError


def preflight_site(site: SiteConfig, connect_timeout: float = 5.0) -> None:
    """Raise a one-line PrivfedError for the first thing that would make the site fail."""
    check_certificate(site.ca_cert, "CA certificate (ca-cert)")
    auth_key = check_private_key(site.auth_private_key, "SuperNode auth private key (auth-private-key)")
    try:
        parsed = load_ssh_private_key(auth_key.read_bytes(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        parsed = None
    if not isinstance(parsed, ec.EllipticCurvePrivateKey):
        raise PkiError(
            auth_key, "is not an OpenSSH EC private key, as flower-supernode needs (`privfed certs node` makes one)"
        )
    if not Path(site.auth_public_key).expanduser().is_file():
        raise PkiError(site.auth_public_key, "SuperNode auth public key (auth-public-key) not found")
    if site.key_file:
        load_key(Path(site.key_file).expanduser())
    load_signing_key(site.signing_key)  # present, Ed25519, readable by its owner only
    for label, value in (("data-path", site.data_path), ("users-path", site.users_path)):
        if value and not Path(value).expanduser().exists():
            raise DataError(value, f"not found (site config {label})")
    if site.state_dir:
        folder = Path(site.state_dir).expanduser()
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=folder):
                pass
        except OSError as exc:
            raise PrivfedError(
                f"state-dir {folder}: not writable ({exc.strerror or type(exc).__name__}); "
                "the site keeps its privacy history there"
            ) from None
    host, _, port = site.superlink.rpartition(":")
    host = host.strip("[]")
    try:
        sock = socket.create_connection((host, int(port)), timeout=connect_timeout)
    except OSError as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or type(exc).__name__)
        raise PrivfedError(
            f"SuperLink {site.superlink} is unreachable ({reason}); check the address and port, and that the "
            "coordinator's SuperLink is running and its port is open to this site"
        ) from None
    # The same check the SuperNode's TLS makes: the SuperLink's certificate must chain to
    # ca-cert and name the host this site dials.
    ctx = ssl.create_default_context(cafile=str(Path(site.ca_cert).expanduser()))
    try:
        with sock, ctx.wrap_socket(sock, server_hostname=host):
            pass
    except ssl.SSLCertVerificationError as exc:
        raise PrivfedError(
            f"SuperLink {site.superlink}: its TLS certificate does not verify against ca-cert {site.ca_cert} "
            f"({exc.verify_message}); use the coordinator's ca.pem, and dial a host name or IP that is in the "
            "SuperLink certificate's SANs"
        ) from None
    except (ssl.SSLError, OSError) as exc:
        raise PrivfedError(
            f"SuperLink {site.superlink}: TLS handshake failed ({type(exc).__name__}: {exc}); is it a TLS SuperLink?"
        ) from None


def supernode_command(site: SiteConfig, extra: list[str] | None = None) -> list[str]:
    """The ``flower-supernode`` command line for this site (TLS and node authentication on)."""
    exe = shutil.which("flower-supernode") or str(Path(sys.executable).with_name("flower-supernode"))
    if not Path(exe).is_file():
        raise PrivfedError(
            "flower-supernode not found: install privfed's environment (make install) and activate .venv"
        )
    return [
        exe,
        "--superlink",
        site.superlink,
        "--root-certificates",
        str(Path(site.ca_cert).expanduser()),
        # flwr 1.41 derives the public key from the private one (--auth-supernode-public-key
        # is deprecated and ignored); the .pub file is what the coordinator registers.
        "--auth-supernode-private-key",
        str(Path(site.auth_private_key).expanduser()),
        "--node-config",
        site.node_config(),
        *(extra or []),
    ]


def join(config_path: str | Path, extra: list[str] | None = None, dry_run: bool = False) -> list[str]:
    """Check everything, then replace this process with the site's SuperNode."""
    site = SiteConfig.load(config_path)
    preflight_site(site)
    cmd = supernode_command(site, extra)
    if not dry_run:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(cmd[0], cmd)  # the SuperNode keeps this PID: stop it as you would this command
    return cmd
