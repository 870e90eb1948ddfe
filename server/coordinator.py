"""``privfed coordinator superlink|proxy|flwr-config``: the coordinator's processes, started as documented.

The deployment guide (docs/DEPLOYMENT.md) and the deployment test run these commands, so
the two cannot drift apart. Each checks its files first and reports one line, then
*becomes* the process it starts (same PID: stop it by that PID or its process group).

* ``superlink``: Flower's SuperLink with TLS, node authentication and no runtime installs
  of app dependencies, on a loopback address only: its port also serves the Control API
  (``flwr run``, ``flwr ls``, ``flwr supernode register``), which must never face the sites.
* ``proxy``: the sites' only door, nginx passing the Fleet API and nothing else
  (server.proxy).
* ``flwr-config``: the ``flwr`` CLI connection for the coordinator's own admin address.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from rich.console import Console

from common.deploy.pki import check_certificate, check_private_key
from common.errors import PrivfedError
from server import proxy

DEFAULT_ADMIN = "127.0.0.1:9093"
DEFAULT_LISTEN = "0.0.0.0:9092"
CONNECTION = "privfed"


def add_arguments(command: str, parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="coordinator_command", required=True)
    link = sub.add_parser("superlink", help="check, then become flower-superlink (loopback only, TLS, node auth)")
    link.add_argument("--database", required=True, help="the SuperLink's state file (its folder is made, mode 0700)")
    link.add_argument("--admin", default=DEFAULT_ADMIN, help=f"loopback host:port (default {DEFAULT_ADMIN})")
    px = sub.add_parser("proxy", help="write the sites' nginx proxy config, check it, then become nginx")
    px.add_argument("--listen", default=DEFAULT_LISTEN, help=f"host:port the sites dial (default {DEFAULT_LISTEN})")
    px.add_argument("--superlink", default=DEFAULT_ADMIN, help=f"the SuperLink's loopback address ({DEFAULT_ADMIN})")
    px.add_argument("--dir", required=True, help="the proxy's folder: nginx.conf, logs, pid (mode 0700)")
    px.add_argument("--force", action="store_true", help="replace an existing nginx.conf")
    px.add_argument("--reload", action="store_true", help="reload the running proxy (after `privfed certs rotate`)")
    cfg = sub.add_parser("flwr-config", help="print the flwr CLI connection (~/.flwr/config.toml) for --admin")
    cfg.add_argument("--admin", default=DEFAULT_ADMIN, help=f"the SuperLink's loopback address ({DEFAULT_ADMIN})")
    for p in (link, px, cfg):
        p.add_argument("--pki", required=True, help="the folder with ca.pem, superlink.pem, superlink.key")
    for p in (link, px):
        p.add_argument("--check", action="store_true", help="only check and print the command")


def _pki(folder: str) -> tuple[Path, Path, Path]:
    root = Path(folder).expanduser().resolve()
    ca = check_certificate(root / "ca.pem", "CA certificate (ca.pem)")
    cert = check_certificate(root / "superlink.pem", "SuperLink certificate (superlink.pem)")
    key = check_private_key(root / "superlink.key", "SuperLink private key (superlink.key)")
    return ca.resolve(), cert.resolve(), key.resolve()


def _loopback(address: str, flag: str) -> tuple[str, str]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise PrivfedError(f"{flag}: expected host:port, e.g. {DEFAULT_ADMIN}")
    if host.strip("[]") not in ("127.0.0.1", "::1", "localhost"):
        raise PrivfedError(
            f"{flag}: must be a loopback address: the SuperLink's port serves the Control API (flwr run, ls, "
            "supernode register); sites reach the Fleet API through `privfed coordinator proxy`"
        )
    return host.strip("[]"), port


def superlink_command(pki: str, database: str, admin: str = DEFAULT_ADMIN) -> list[str]:
    """Check the files, make the database's folder (0700), and return the flower-superlink command."""
    ca, cert, key = _pki(pki)
    host, port = _loopback(admin, "--admin")
    exe = shutil.which("flower-superlink") or str(Path(sys.executable).with_name("flower-superlink"))
    if not Path(exe).is_file():
        raise PrivfedError("flower-superlink not found: install privfed's environment (make install)")
    db = database
    if not database.startswith(":"):  # Flower's in-memory names (":flwr-in-memory:") have no folder
        path = Path(database).expanduser().resolve()
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        db = str(path)
    return [
        exe,
        "--ssl-ca-certfile",
        str(ca),
        "--ssl-certfile",
        str(cert),
        "--ssl-keyfile",
        str(key),
        "--enable-supernode-auth",
        # A flag, not FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION: the SuperLink reads that
        # variable when it starts, not when `flwr run` does, so setting it later does nothing.
        "--disable-runtime-dependency-installation",
        "--host",
        host,
        "--port",
        port,
        "--database",
        db,
    ]


def _exec(cmd: list[str]) -> None:
    # Flower's legacy gRPC switches (FLWR_INTERNAL_GRPC_CONTROL_API=1 and the like) would start
    # a second Control API on 0.0.0.0:9093, past the proxy: never inherited.
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLWR_INTERNAL_GRPC")}
    # The SuperLink starts flower-superexec and flwr-serverapp by name: the venv's bin first.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(cmd[0], cmd, env)


def flwr_config(pki: str, admin: str = DEFAULT_ADMIN) -> str:
    """The ``flwr`` CLI's connection to the SuperLink's admin address (TOML)."""
    ca, _, _ = _pki(pki)
    _loopback(admin, "--admin")
    return (
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "{admin}"\nroot-certificates = "{ca}"\n'
    )


def run(command: str, args: argparse.Namespace, console: Console, err: Console, passthrough: list[str]) -> int:
    if args.coordinator_command == "flwr-config":
        console.print(flwr_config(args.pki, args.admin), markup=False, highlight=False, end="")
        return 0
    if args.coordinator_command == "superlink":
        cmd = superlink_command(args.pki, args.database, args.admin)
        if args.check:
            console.print(shlex.join(cmd), markup=False, highlight=False)
            return 0
        _exec(cmd)
    folder = Path(args.dir).expanduser().resolve()
    if args.reload:
        done = subprocess.run(proxy.reload_command(folder), capture_output=True, text=True)
        if done.returncode != 0:
            raise PrivfedError(f"proxy '{folder}': nginx -s reload failed (is it running? see {folder}/error.log)")
        console.print(f"proxy reloaded: new connections get {Path(args.pki) / 'superlink.pem'}", markup=False)
        return 0
    ca, cert, key = _pki(args.pki)
    plan = proxy.ProxyPlan(listen=args.listen, superlink=args.superlink, cert=cert, key=key, ca=ca, folder=folder)
    path = proxy.write(plan, force=args.force)
    cmd = proxy.command(folder)
    if args.check:
        console.print(f"ok: {path} passes nginx -t", markup=False)
        console.print(shlex.join(cmd), markup=False, highlight=False)
        return 0
    _exec(cmd)
    return 0
