"""``privfed keys`` and ``privfed certs``: the secrets a deployment needs, made locally.

Every file is created with :mod:`common.deploy.fileio` (mode 0600 for secrets, no
silent overwrite without ``--force``). The federation key goes to the sites only, never
to the server: it is what keeps their pseudonyms unlinkable to raw identifiers.

Certificate lifecycle: ``certs rotate`` renews the SuperLink's certificate under the same
CA, ``certs status`` tells cron when one is due, ``certs protect-ca`` encrypts the CA key,
and ``certs node-id`` finds the Flower node id of a site's key so that Flower's own
``flwr supernode unregister`` can revoke it. A CA passphrase is read from a 0600 file or a
named environment variable, never from argv (visible to every user in ``ps``).
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from rich.console import Console

if TYPE_CHECKING:
    from common.deploy.pki import CertStatus


def add_arguments(command: str, parser: argparse.ArgumentParser) -> None:
    if command == "keys":
        keys_sub = parser.add_subparsers(dest="keys_command", required=True)
        new = keys_sub.add_parser("new", help="create a federation key for keyed identifier hashing (HMAC-SHA256)")
        new.add_argument("path", help="where to write it (mode 0600); give every site a copy, never the server")
        new.add_argument("--force", action="store_true", help="replace an existing key file")
        signing = keys_sub.add_parser(
            "signing", help="create an Ed25519 signing key (a site's or the server's) and print its public key"
        )
        signing.add_argument("path", help="where to write the private key (PEM, mode 0600); it never leaves its owner")
        signing.add_argument("--force", action="store_true", help="replace an existing key file")
        sim = keys_sub.add_parser(
            "simulation",
            help="every party's key and the registry for a local `flwr run .` (then export PRIVFED_SIMULATION_IDS=DIR)",
        )
        sim.add_argument("folder", metavar="DIR", help="the folder to make (0700): keys/, registry.toml")
        sim.add_argument("--app", default=".", help="the app folder `flwr run` bundles (default: .)")
        sim.add_argument("--key-file", help="the federation key, for a task that pseudonymises identifiers")
        sim.add_argument("--force", action="store_true", help="replace the keys already in DIR")
        sim.add_argument(
            "overrides", nargs="*", metavar="key=value", help="the run's settings, as given to flwr run's --run-config"
        )
        return
    certs_sub = parser.add_subparsers(dest="certs_command", required=True)
    ca = certs_sub.add_parser("ca", help="create the federation's certificate authority (ca.pem, ca.key)")
    ca.add_argument("--days", type=int, default=None, help="validity in days (default: 5 years)")
    srv = certs_sub.add_parser("server", help="the SuperLink's TLS certificate, signed by the CA in --out")
    srv.add_argument("--host", action="append", required=True, help="a DNS name or IP sites dial (repeat)")
    srv.add_argument("--days", type=int, default=None, help="validity in days (default: 90; renew with `rotate`)")
    rot = certs_sub.add_parser(
        "rotate", help="renew the SuperLink's certificate and key (same CA; the old pair is kept as *.prev)"
    )
    rot.add_argument("--host", action="append", help="a DNS name or IP sites dial (repeat; default: the current SANs)")
    rot.add_argument("--days", type=int, default=None, help="validity in days (default: 90)")
    rot.add_argument(
        "--proxy-dir", help="the proxy's folder (`privfed coordinator proxy --dir`), for the reload command"
    )
    status = certs_sub.add_parser(
        "status", help="subject, SANs and days left of ca.pem and superlink.pem; exit 1 if due, 2 if expired"
    )
    status.add_argument("--warn-days", type=int, default=None, help="exit 1 when one expires within this (default 30)")
    protect = certs_sub.add_parser("protect-ca", help="encrypt an existing unencrypted ca.key with a passphrase")
    node = certs_sub.add_parser("node", help="a SuperNode authentication key pair (NAME.key, NAME.pub)")
    node.add_argument("--name", required=True, help="e.g. the site id")
    node_id = certs_sub.add_parser(
        "node-id", help="the Flower node id registered for a site's .pub (to `flwr supernode unregister` it)"
    )
    node_id.add_argument("public_key", help="the site's NAME.pub")
    node_id.add_argument("--database", required=True, help="the SuperLink's state file (flower-superlink --database)")
    for cp in (ca, srv, rot, status, protect, node):
        cp.add_argument("--out", required=True, help="folder for the files (the CA's folder for the others)")
    for cp in (ca, srv, node):
        cp.add_argument("--force", action="store_true", help="replace existing files")
    for cp in (ca, srv, rot, protect):
        # Never the passphrase itself as an argument: argv is visible to every user in `ps`.
        pw = cp.add_mutually_exclusive_group()
        pw.add_argument("--passphrase-file", help="file holding the CA key's passphrase (mode 0600)")
        pw.add_argument("--passphrase-env", metavar="NAME", help="environment variable holding the CA passphrase")


def run(command: str, args: argparse.Namespace, console: Console, err: Console, passthrough: list[str]) -> int:
    if command == "keys" and args.keys_command == "signing":
        from common.deploy.signing import public_hex, write_signing_key

        key = write_signing_key(args.path, force=args.force)
        err.print(f"signing key written to {args.path} (mode 0600); its public key (register it):")
        console.print(public_hex(key))
        return 0
    if command == "keys" and args.keys_command == "simulation":
        return _simulation_keys(args, console)
    if command == "keys":
        from common.deploy.keys import write_key

        path = write_key(args.path, force=args.force)
        console.print(
            f"federation key written to {path} (mode 0600). Copy it to every site over a secure channel; "
            "never to the server."
        )
        return 0
    return _certs(args, console, err)


def _simulation_keys(args: argparse.Namespace, console: Console) -> int:
    """``privfed keys simulation DIR [key=value ...]`` (common.deploy.simulation_ids)."""
    from pathlib import Path

    from rich.markup import escape

    from common.deploy.keys import key_from_env, load_key
    from common.deploy.simulation_ids import ENV, app_config, make_for_app

    cfg = app_config(Path(args.app), args.overrides)
    key = load_key(args.key_file) if args.key_file else key_from_env()
    folder = Path(args.folder)
    ids = make_for_app(folder, cfg, key, force=args.force)
    console.print(
        f"{len(ids.sizes)} simulated sites and the server: keys in {escape(str(folder / 'keys'))} (mode 0600), "
        f"registry {escape(str(ids.registry_path))}, each site declared at its training-split size"
    )
    console.print(
        f"before the local SuperLink starts: export {ENV}={escape(str(folder.resolve()))}  "
        f'(flwr run . --federation-config "num-supernodes={len(ids.sizes)}" ...)'
    )
    return 0


def _certs(args: argparse.Namespace, console: Console, err: Console) -> int:
    from pathlib import Path

    from rich.markup import escape

    from common.deploy import pki

    cmd = args.certs_command
    if cmd == "node-id":
        found = pki.node_id_for_key(Path(args.database), Path(args.public_key))
        if found is None:
            err.print(f"{escape(args.public_key)}: no SuperNode registered with this key")
            return 1
        node, node_status = found
        console.print(f"{node} ({node_status})")
        return 0
    out = Path(args.out)
    if cmd == "status":
        return _status(pki.folder_status(out, pki.WARN_DAYS if args.warn_days is None else args.warn_days), console)
    passphrase = pki.read_passphrase(getattr(args, "passphrase_file", None), getattr(args, "passphrase_env", None))
    files: tuple[Path, ...]
    if cmd == "ca":
        days = pki.CA_DAYS if args.days is None else args.days
        files = pki.make_ca(out, force=args.force, days=days, passphrase=passphrase)
        if passphrase is None:
            err.print(
                "warning: ca.key is stored unencrypted; recommended: --passphrase-file FILE (mode 0600), "
                "or encrypt it later with `privfed certs protect-ca`"
            )
        note = f"valid {days} days; keep ca.key offline at the coordinator; give every site ca.pem"
    elif cmd == "server":
        days = pki.SERVER_DAYS if args.days is None else args.days
        files = pki.make_server_cert(out, args.host, force=args.force, days=days, passphrase=passphrase)
        note = f"SANs: {', '.join(args.host)}; valid {days} days (renew with `privfed certs rotate`)"
    elif cmd == "rotate":
        days = pki.SERVER_DAYS if args.days is None else args.days
        r = pki.rotate_server_cert(out, args.host, days=days, passphrase=passphrase)
        console.print(
            escape(
                f"wrote {r.cert}, {r.key} (SANs: {', '.join(r.hosts)}; valid until {r.not_after:%Y-%m-%d}); "
                f"previous pair kept as {r.prev_cert}, {r.prev_key} (mode 0600)"
            )
        )
        reload = f"privfed coordinator proxy --reload --dir {args.proxy_dir or '<the proxy dir>'} --pki {out}"
        console.print(
            escape(
                f"next: reload the proxy so it serves the new certificate: {reload}\n"
                "      the SuperLink behind it serves its copy until it restarts (the proxy checks it against ca.pem)\n"
                "      sites need nothing: their ca.pem is unchanged"
            )
        )
        return 0
    elif cmd == "protect-ca":
        if passphrase is None:
            raise pki.PassphraseError("protect-ca needs --passphrase-file FILE or --passphrase-env NAME")
        files = (pki.protect_ca_key(out, passphrase),)
        note = "ca.key is now encrypted; `certs server` and `certs rotate` need the same passphrase option"
    else:
        files = pki.make_node_keys(out, args.name, force=args.force)
        note = f"the site keeps {args.name}.key; the coordinator registers {args.name}.pub"
    console.print(escape(f"wrote {', '.join(str(f) for f in files)} ({note})"))
    return 0


def _status(rows: list[CertStatus], console: Console) -> int:
    """Print each certificate's state; the exit code is what cron acts on: 0 fine,
    1 one is due for renewal, 2 one is expired or not signed by ca.pem."""
    from rich.markup import escape

    code = 0
    for row in rows:
        state = row.problem or "ok"
        hosts = f"; SANs {', '.join(row.hosts)}" if row.hosts else ""
        console.print(
            escape(
                f"{row.path}: {row.subject}{hosts}; not after {row.not_after:%Y-%m-%d %H:%M} UTC "
                f"({row.days_left:.0f} days left): {state}"
            ),
            soft_wrap=True,
        )
        if row.problem is None:
            continue
        code = max(code, 1 if row.problem.startswith("expires within") else 2)
    return code
