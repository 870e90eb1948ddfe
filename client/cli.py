"""``privfed site init|join``: a partner site's config, and joining the federation with it.

``init`` writes the site config (its data, device, federation key and a stricter ε budget
stay at the site: they reach the ClientApp only as the SuperNode's node config);
``join`` checks it (:mod:`client.join`) and then runs the site's flower-supernode.
"""

from __future__ import annotations

import argparse

from rich.console import Console

from common.errors import PrivfedError


def add_arguments(command: str, parser: argparse.ArgumentParser) -> None:
    site_sub = parser.add_subparsers(dest="site_command", required=True)
    init = site_sub.add_parser("init", help="write a site config")
    init.add_argument("--out", required=True, help="the site config file to write")
    init.add_argument("--site-id", required=True, help="the site's pseudonym in the ledger")
    init.add_argument("--partition-id", type=int, required=True)
    init.add_argument("--superlink", required=True, help="HOST:PORT of the coordinator's Fleet API")
    init.add_argument("--ca-cert", required=True)
    init.add_argument(
        "--auth-key", required=True, help="the SuperNode private key; NAME.pub beside it is the public key"
    )
    init.add_argument(
        "--declared-size",
        type=int,
        required=True,
        help="the site's public training-set size n-hat, declared before the run: q, steps, delta, sigma and the "
        "update's weight derive from it, so the real size never leaves the site (docs/PRIVACY.md)",
    )
    init.add_argument("--key-file", default="", help="federation key (keyed tasks)")
    init.add_argument("--data-path", default="")
    init.add_argument("--data-format", default="", help="digits, npz, movielens or csv")
    init.add_argument("--users-path", default="")
    init.add_argument("--device", default="auto")
    init.add_argument(
        "--epsilon-budget",
        type=float,
        default=0.0,
        help="a stricter budget than the run's, for the dataset's whole life over every run (0: the run's)",
    )
    init.add_argument(
        "--dataset-id", default="", help="names the dataset whose lifetime budget this is (default: from its path)"
    )
    init.add_argument(
        "--allow-seeded-noise",
        action="store_true",
        help="accept runs with dp.secure-rng=false (test federations only: the seed would reveal the noise)",
    )
    init.add_argument(
        "--allow-exact-metrics",
        action="store_true",
        help="accept private runs with metrics.dp=false (evaluation statistics sent without noise, outside epsilon)",
    )
    init.add_argument(
        "--state-dir",
        default=None,
        help="where the site keeps its privacy history between rounds and restarts "
        "(default: privfed-state beside --out)",
    )
    init.add_argument("--force", action="store_true")
    joinp = site_sub.add_parser("join", help="check a site config, then run flower-supernode with it")
    joinp.add_argument("config")
    joinp.add_argument("--check", action="store_true", help="only check and print the command")


def run(command: str, args: argparse.Namespace, console: Console, err: Console, passthrough: list[str]) -> int:
    from pathlib import Path

    from common.deploy.site_config import SiteConfig

    if args.site_command == "init":
        out = Path(args.out)
        if out.exists() and not args.force:
            raise PrivfedError(f"site config '{out}': already exists (pass --force to replace it)")
        key = Path(args.auth_key)
        site = SiteConfig(
            site_id=args.site_id,
            partition_id=args.partition_id,
            superlink=args.superlink,
            ca_cert=str(Path(args.ca_cert).resolve()),
            auth_private_key=str(key.resolve()),
            auth_public_key=str(key.with_suffix(".pub").resolve()),
            declared_size=args.declared_size,
            key_file=str(Path(args.key_file).resolve()) if args.key_file else "",
            data_path=str(Path(args.data_path).resolve()) if args.data_path else "",
            data_format=args.data_format,
            users_path=str(Path(args.users_path).resolve()) if args.users_path else "",
            device=args.device,
            epsilon_budget=args.epsilon_budget,
            dataset_id=args.dataset_id,
            allow_seeded_noise=args.allow_seeded_noise,
            allow_exact_metrics=args.allow_exact_metrics,
            state_dir=str(Path(args.state_dir).resolve() if args.state_dir else out.resolve().parent / "privfed-state"),
        )
        site.validate()
        out.write_text(site.to_toml())
        console.print(f"site config written to {out}; check it with `privfed site join {out} --check`")
        return 0
    from client.join import join

    cmd = join(args.config, passthrough, dry_run=args.check)
    console.print("ok: certificates, keys, data and SuperLink reachable\n" + " ".join(cmd))
    return 0
