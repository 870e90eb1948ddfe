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
import sys
from pathlib import Path

from common.errors import DataError, PrivfedError
from common.keys import load_key
from common.pki import check_certificate, check_private_key, PkiError
from common.site import SiteConfig


def preflight_site(site: SiteConfig, connect_timeout: float = 5.0) -> None:
    """Raise a one-line PrivfedError for the first thing that would make the site fail."""
    check_certificate(site.ca_cert, "CA certificate (ca-cert)")
    check_private_key(site.auth_private_key, "SuperNode auth private key (auth-private-key)")
    if not Path(site.auth_public_key).expanduser().is_file():
        raise PkiError(site.auth_public_key, "SuperNode auth public key (auth-public-key) not found")
    if site.key_file:
        load_key(Path(site.key_file).expanduser())
    for label, value in (("data-path", site.data_path), ("users-path", site.users_path)):
        if value and not Path(value).expanduser().exists():
            raise DataError(value, f"not found (site config {label})")
    host, _, port = site.superlink.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=connect_timeout):
            pass
    except OSError as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or type(exc).__name__)
        raise PrivfedError(
            f"SuperLink {site.superlink} is unreachable ({reason}); check the address and port, and that the "
            "coordinator's SuperLink is running and its Fleet API port is open to this site"
        ) from None


def supernode_command(site: SiteConfig, extra: list[str] | None = None) -> list[str]:
    """The ``flower-supernode`` command line for this site (TLS and node authentication on)."""
    exe = shutil.which("flower-supernode") or str(Path(sys.executable).with_name("flower-supernode"))
    return [
        exe,
        "--superlink", site.superlink,
        "--root-certificates", str(Path(site.ca_cert).expanduser()),
        "--auth-supernode-private-key", str(Path(site.auth_private_key).expanduser()),
        "--auth-supernode-public-key", str(Path(site.auth_public_key).expanduser()),
        "--node-config", site.node_config(),
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
