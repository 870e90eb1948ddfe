"""``privfed site join``: check a site's config, then become its ``flower-supernode``.

Every check here is one an operator actually fails, each reported in one line before
anything connects: a certificate path that is wrong or not a certificate, an auth key
that is missing or readable by others, a federation key file that is missing or
world-readable, a data path that does not exist, a SuperLink that does not answer.
"""

from __future__ import annotations

import argparse
import contextlib
import io
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

from client.supervisor import INSTALLED_ROOT, installed_app_hash
from common.deploy.app_approval import parse_approved
from common.deploy.keys import load_key
from common.deploy.pki import PkiError, check_certificate, check_private_key
from common.deploy.signing import load_signing_key
from common.deploy.site_config import SiteConfig
from common.errors import ConfigError, DataError, PrivfedError


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
    if not site.approved_apps:
        raise ConfigError(
            "approved-apps",
            "empty: this site would run no app; approve the coordinator's signed app first "
            "(`privfed site approve SITE_CONFIG --signature SIG`, docs/DEPLOYMENT.md)",
        )
    installed = installed_app_hash()
    if installed not in parse_approved(site.approved_apps):
        raise ConfigError(
            "approved-apps",
            f"the privfed installed here ({INSTALLED_ROOT}) builds to app {installed[:16]}, which this site has not "
            "approved: it runs only approved code (check out the approved commit, or approve this one)",
        )
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


# The flower-supernode settings a site may pass after `--`: how it retries and where its
# local runtime API and health check listen. Everything else is set by `privfed site join`
# from the site config (or must stay Flower's default): changing it would undo the
# approved-app guard (`--isolation`, `--allow-runtime-dependency-installation`), weaken TLS
# (`--insecure`, `--root-certificates`), swap the node config and its policy (`--node-config`)
# or Flower's FAB check that cannot work with an open-source SuperLink (`--trusted-entities`).
_SITE_MAY_SET = ("max_retries", "max_wait_time", "host", "port", "health_server_address")


def _supernode_flags(extra: list[str]) -> argparse.Namespace:
    """``extra`` as flower-supernode itself parses it (its own parser: abbreviations such as
    ``--isol`` count as what they abbreviate); a setting outside :data:`_SITE_MAY_SET` is refused."""
    from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

    parser = _parse_args_run_supernode()
    unset = object()  # tells a flag given (even at Flower's default value) from one left out
    defaults = {a.dest: a.default for a in parser._actions}
    parser.set_defaults(**{dest: unset for dest in defaults if dest not in ("help", "version")})
    try:
        with contextlib.redirect_stderr(io.StringIO()) as errors:
            parsed = parser.parse_args(extra)
    except SystemExit:
        last = (errors.getvalue().strip().splitlines() or ["not valid"])[-1]
        raise PrivfedError(f"flower-supernode flags after `--`: {last.split(': error: ')[-1]}") from None
    given = {dest for dest, value in vars(parsed).items() if value is not unset}
    for action in parser._actions:
        if action.dest in given and action.dest not in _SITE_MAY_SET:
            raise PrivfedError(
                f"flower-supernode flag {action.option_strings[-1]}: set by `privfed site join` from the site config "
                "(it keeps the site on its approved apps, its TLS and its node config); remove it after `--`"
            )
    for dest in set(defaults) - given:
        setattr(parsed, dest, defaults[dest])  # left out: Flower's default
    return parsed


def runtime_address(extra: list[str]) -> str:
    """The SuperNode's local runtime API, where the site's SuperExec connects (``--host``/``--port``,
    as flower-supernode parses them)."""
    flags = _supernode_flags(extra)
    host, port = str(flags.host), int(flags.port)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def supernode_command(site: SiteConfig, extra: list[str] | None = None) -> list[str]:
    """The ``flower-supernode`` command line for this site (TLS and node authentication on).

    ``--isolation process``: the SuperNode starts no SuperExec of its own; the site's
    (client.supervisor) starts ClientApps, for approved apps only.
    """
    extra = list(extra or [])
    _supernode_flags(extra)  # refuses any setting the site may not change
    exe = shutil.which("flower-supernode") or str(Path(sys.executable).with_name("flower-supernode"))
    if not Path(exe).is_file():
        raise PrivfedError(
            "flower-supernode not found: install privfed's environment (make install) and activate .venv"
        )
    return [
        exe,
        *extra,  # first: argparse keeps the last value, so none of the settings below can be overridden
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
        "--isolation",
        "process",
    ]


def supervisor_command(site: SiteConfig, extra: list[str] | None = None, parent_pid: int | None = None) -> list[str]:
    """The site's SuperExec (client.supervisor): it starts ClientApps for ``approved-apps`` only."""
    cmd = [
        sys.executable,
        "-m",
        "client.supervisor",
        "--runtime-api-address",
        runtime_address(list(extra or [])),
        "--approved-apps",
        site.approved_apps,
    ]
    return [*cmd, "--parent-pid", str(parent_pid)] if parent_pid is not None else cmd


def join(config_path: str | Path, extra: list[str] | None = None, dry_run: bool = False) -> list[list[str]]:
    """Check everything, then start the site's SuperExec and replace this process with its SuperNode.

    Returns the two command lines (SuperNode, SuperExec); with ``dry_run`` nothing starts.
    """
    site = SiteConfig.load(config_path)
    preflight_site(site)
    cmd = supernode_command(site, extra)
    if dry_run:
        return [cmd, supervisor_command(site, extra)]
    sys.stdout.flush()
    sys.stderr.flush()
    me = os.getpid()
    supervisor = supervisor_command(site, extra, parent_pid=me)
    if os.fork() == 0:  # the SuperExec: a child of the SuperNode-to-be, in its process group
        try:
            os.execv(supervisor[0], supervisor)
        finally:
            os._exit(127)
    os.execv(cmd[0], cmd)  # the SuperNode keeps this PID: stop it (and its group) as you would this command
    raise AssertionError("unreachable")
