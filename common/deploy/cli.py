"""``privfed keys`` and ``privfed certs``: the secrets a deployment needs, made locally.

Every file is created with :mod:`common.deploy.fileio` (mode 0600 for secrets, no
silent overwrite without ``--force``). The federation key goes to the sites only, never
to the server: it is what keeps their pseudonyms unlinkable to raw identifiers.
"""

from __future__ import annotations

import argparse

from rich.console import Console


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
        return
    certs_sub = parser.add_subparsers(dest="certs_command", required=True)
    ca = certs_sub.add_parser("ca", help="create the federation's certificate authority (ca.pem, ca.key)")
    srv = certs_sub.add_parser("server", help="the SuperLink's TLS certificate, signed by the CA in --out")
    srv.add_argument("--host", action="append", required=True, help="a DNS name or IP sites dial (repeat)")
    node = certs_sub.add_parser("node", help="a SuperNode authentication key pair (NAME.key, NAME.pub)")
    node.add_argument("--name", required=True, help="e.g. the site id")
    for cp in (ca, srv, node):
        cp.add_argument("--out", required=True, help="folder for the files (the CA's folder for `server`)")
        cp.add_argument("--force", action="store_true", help="replace existing files")


def run(command: str, args: argparse.Namespace, console: Console, err: Console, passthrough: list[str]) -> int:
    if command == "keys" and args.keys_command == "signing":
        from common.deploy.signing import public_hex, write_signing_key

        key = write_signing_key(args.path, force=args.force)
        err.print(f"signing key written to {args.path} (mode 0600); its public key (register it):")
        console.print(public_hex(key))
        return 0
    if command == "keys":
        from common.deploy.keys import write_key

        path = write_key(args.path, force=args.force)
        console.print(
            f"federation key written to {path} (mode 0600). Copy it to every site over a secure channel; "
            "never to the server."
        )
        return 0
    _certs(args, console)
    return 0


def _certs(args: argparse.Namespace, console: Console) -> None:
    from pathlib import Path

    from common.deploy import pki

    out = Path(args.out)
    if args.certs_command == "ca":
        files = pki.make_ca(out, force=args.force)
        note = "keep ca.key offline at the coordinator; give every site ca.pem"
    elif args.certs_command == "server":
        files = pki.make_server_cert(out, args.host, force=args.force)
        note = f"SANs: {', '.join(args.host)}; start flower-superlink with it (README: Deployment)"
    else:
        files = pki.make_node_keys(out, args.name, force=args.force)
        note = f"the site keeps {args.name}.key; the coordinator registers {args.name}.pub"
    console.print(f"wrote {', '.join(str(f) for f in files)} ({note})")
