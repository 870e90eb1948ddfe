"""``privfed app hash|sign``: the coordinator names and signs the app every site will run.

``flwr run APP_DIR`` submits the FAB Flower builds from ``APP_DIR``; the build is
deterministic, so the hash printed here is the hash of what ``flwr run`` sends, as long
as the checkout does not change in between. Sites approve it with ``privfed site
approve`` (common.deploy.app_approval).
"""

from __future__ import annotations

import argparse

from rich.console import Console


def add_arguments(command: str, parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="app_command", required=True)
    hash_p = sub.add_parser("hash", help="print the SHA-256 of the FAB `flwr run APP` submits")
    sign = sub.add_parser("sign", help="sign the app's hash with the coordinator's Ed25519 key")
    sign.add_argument("--server-key", required=True, help="the coordinator's signing key (`privfed keys signing`)")
    for p in (hash_p, sign):
        p.add_argument("--app", default=".", help="the privfed checkout `flwr run` will submit (default: .)")


def run(command: str, args: argparse.Namespace, console: Console, err: Console, passthrough: list[str]) -> int:
    from common.deploy.app_approval import build_fab, fab_hash_of, sign_app
    from common.deploy.signing import load_signing_key

    fab_hash = fab_hash_of(build_fab(args.app))
    if args.app_command == "hash":
        console.print(fab_hash, markup=False, highlight=False)
        return 0
    signature = sign_app(load_signing_key(args.server_key), fab_hash)
    console.print(f"fab-hash {fab_hash}", markup=False, highlight=False)
    console.print(f"signature {signature}", markup=False, highlight=False)
    err.print(
        "Each site approves it (after checking out the same commit):\n"
        f"  privfed site approve SITE_CONFIG --signature {signature}",
        markup=False,
        highlight=False,
    )
    return 0
