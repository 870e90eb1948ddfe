"""``privfed site init|join``: a partner site's config, and joining the federation with it.

``init`` writes the site config (its data, device, federation key and a stricter ε budget
stay at the site: they reach the ClientApp only as the SuperNode's node config);
``join`` checks it (:mod:`client.join`) and then runs the site's flower-supernode.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

from common.deploy.fileio import write_text_atomically
from common.errors import PrivfedError

if TYPE_CHECKING:
    from common.deploy.signing import Ed25519PrivateKey
    from common.deploy.site_config import SiteConfig


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
        help="the site's public training-set size n-hat, declared before the run, in the run's unit of privacy: "
        "records, or persons under dp.unit = user; q, steps, delta, sigma and the update's weight derive from it, "
        "so the real size never leaves the site (docs/PRIVACY.md)",
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
    init.add_argument(
        "--server-key",
        required=True,
        help="the coordinator's Ed25519 public key (64 hex digits): the site checks its ledger receipts against it",
    )
    init.add_argument(
        "--signing-key",
        default="",
        help="this site's Ed25519 signing key (PEM); made if absent (default: NAME.signing.pem beside --out)",
    )
    init.add_argument(
        "--allowed-tasks", default="", help="policy: comma-separated tasks this site trains (default any)"
    )
    init.add_argument("--min-noise-multiplier", type=float, default=0.0, help="policy: the smallest sigma accepted")
    init.add_argument(
        "--max-epsilon-per-round", type=float, default=0.0, help="policy: the largest epsilon one round may spend"
    )
    init.add_argument("--max-delta", type=float, default=0.0, help="policy: the largest delta accepted")
    init.add_argument(
        "--min-group-size", type=int, default=0, help="policy: floor on the task's min-group-size (0: none)"
    )
    init.add_argument(
        "--privacy-unit",
        choices=("record", "user"),
        default="record",
        help="policy: user trains only under user-level DP (dp.unit = user); record accepts either",
    )
    init.add_argument("--force", action="store_true")
    verify = site_sub.add_parser(
        "verify", help="compare this site's own history and kept receipt with the coordinator's ledger"
    )
    verify.add_argument("--state-dir", required=True, help="the site's state-dir")
    verify.add_argument("--ledger", required=True, help="the ledger (ledger.sqlite) or the run folder holding it")
    verify.add_argument("--run-id", default=None, help="the run to check (default: the ledger's)")
    verify.add_argument("--site-id", default=None, help="the site to check (default: the only one in state-dir)")
    verify.add_argument("--server-key", default="", help="the coordinator's public key: re-check the kept receipt")
    verify.add_argument(
        "--dataset-id",
        dest="verify_dataset_id",
        default="",
        help="the dataset whose lifetime history to compare (default: the only one in state-dir)",
    )
    approve = site_sub.add_parser(
        "approve", help="approve the coordinator's signed app: add its hash to the site config's approved-apps"
    )
    approve.add_argument("config", help="the site config to update")
    approve.add_argument("--signature", required=True, help="the coordinator's signature (`privfed app sign`)")
    approve.add_argument(
        "--fab-hash", default="", help="the app's SHA-256 (default: this site's own build of --app, which must match)"
    )
    approve.add_argument(
        "--app", default="", help="the privfed checkout this site runs (default: the one installed here)"
    )
    joinp = site_sub.add_parser("join", help="check a site config, then run flower-supernode with it")
    joinp.add_argument("config")
    joinp.add_argument("--check", action="store_true", help="only check and print the command")


def _site_signing_key(path: Path) -> Ed25519PrivateKey:
    """The site's signing key at ``path``: loaded if it exists, else made (0600)."""
    from common.deploy.signing import load_signing_key, write_signing_key

    return load_signing_key(path) if path.exists() else write_signing_key(path)


def registry_entry(site: SiteConfig, public_key: str) -> str:
    """The site's ``[[site]]`` entry for the coordinator's registry (common.deploy.registry), as TOML."""
    import tomli_w

    entry = {"site-id": site.site_id, "public-key": public_key, "declared-size": site.declared_size}
    return tomli_w.dumps({"site": [entry]}).strip()


def _approve(args: argparse.Namespace, console: Console) -> int:
    """Check the coordinator's signature over the app hash, and that this site's own install
    builds to that hash; then pin it in the site config (common.deploy.app_approval)."""
    import dataclasses

    from client.supervisor import INSTALLED_ROOT
    from common.deploy.app_approval import add_approved, build_fab, check_hash, check_signature, fab_hash_of
    from common.deploy.site_config import SiteConfig

    site = SiteConfig.load(args.config)
    app = Path(args.app) if args.app else INSTALLED_ROOT
    local = fab_hash_of(build_fab(app))
    fab_hash = check_hash(args.fab_hash, "--fab-hash") if args.fab_hash else local
    if fab_hash != local:
        raise PrivfedError(
            f"--fab-hash: the signed app is not the one installed here ({app} builds to {local[:16]}): check out the "
            "coordinator's commit, or pass --app with the checkout you reviewed"
        )
    check_signature(site.server_key, fab_hash, args.signature)
    updated = dataclasses.replace(site, approved_apps=add_approved(site.approved_apps, fab_hash))
    path = Path(args.config)
    write_text_atomically(path, updated.to_toml())  # 0600, as `site init` writes it
    console.print(f"approved app {fab_hash} in {path}; this site runs only its approved apps", markup=False)
    return 0


def run(command: str, args: argparse.Namespace, console: Console, err: Console, passthrough: list[str]) -> int:
    from common.deploy.signing import public_hex
    from common.deploy.site_config import SiteConfig

    if args.site_command == "verify":
        from client.verify import verify_site

        findings, summary = verify_site(
            args.state_dir,
            args.ledger,
            run_id=args.run_id,
            site_id=args.site_id,
            server_key=args.server_key,
            dataset_id=args.verify_dataset_id,
        )
        for line in findings:
            err.print(line, markup=False, highlight=False)
        console.print(summary, markup=False, highlight=False)
        return 1 if findings else 0
    if args.site_command == "approve":
        return _approve(args, console)
    if args.site_command == "init":
        out = Path(args.out)
        if out.exists() and not args.force:
            raise PrivfedError(f"site config '{out}': already exists (pass --force to replace it)")
        signer_path = Path(args.signing_key) if args.signing_key else out.with_suffix(".signing.pem")
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
            signing_key=str(signer_path.resolve()),
            server_key=args.server_key.strip().lower(),
            allowed_tasks=args.allowed_tasks,
            min_noise_multiplier=args.min_noise_multiplier,
            max_epsilon_per_round=args.max_epsilon_per_round,
            max_delta=args.max_delta,
            min_group_size=args.min_group_size,
            privacy_unit="" if args.privacy_unit == "record" else args.privacy_unit,
        )
        site.validate()
        signer = _site_signing_key(signer_path)
        write_text_atomically(out, site.to_toml())  # 0600: it names the site's key files and data
        console.print(f"site config written to {out}; check it with `privfed site join {out} --check`")
        console.print("The coordinator adds this entry to its federation registry (registry.toml):")
        console.print(registry_entry(site, public_hex(signer)), markup=False, highlight=False)
        return 0
    import shlex

    from client.join import join

    supernode, supervisor = join(args.config, passthrough, dry_run=args.check)
    # Quoted as a shell would need them (the node config holds spaces and quotes): pasteable.
    console.print("ok: certificates, keys, approved apps, data and SuperLink reachable", markup=False)
    console.print("# the site's SuperNode (this process becomes it):", markup=False, highlight=False)
    console.print(shlex.join(supernode), markup=False, highlight=False)
    console.print("# the site's SuperExec, started beside it (approved apps only):", markup=False, highlight=False)
    console.print(shlex.join(supervisor), markup=False, highlight=False)
    return 0
