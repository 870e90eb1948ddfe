"""The ``privfed`` command: the friendly front door.

privfed simulate <scenario> [key=value ...]   run a simulated federation
privfed resume RUN_DIR                        continue a stopped run from its checkpoint
privfed scenarios                             list the named scenarios
privfed config <scenario> [key=value ...]     print the resolved config (TOML)
privfed audit RUN_DIR [--verify] [--format table|csv|json]
                                              epsilon per round and site; verify the ledger
privfed report RUN_DIR [--out FILE]           self-contained HTML report with plots
privfed keys new PATH [--force]               create a federation key (mode 0600)
privfed certs ca|server|node --out DIR ...    CA, SuperLink TLS certificate, SuperNode auth keys
privfed site init --out FILE ...              write a partner site's config
privfed site join FILE [-- SUPERNODE FLAGS]   check it, then run the site's flower-supernode
"""

from __future__ import annotations

import argparse
import sys

from rich.console import Console
from rich.markup import escape

from common.errors import PrivfedError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="privfed", description="Privacy-preserving federated training.")
    sub = parser.add_subparsers(dest="command", required=True)

    sim = sub.add_parser("simulate", help="run a simulated federation on this machine")
    sim.add_argument("scenario", help="a scenario name (see `privfed scenarios`)")
    sim.add_argument("overrides", nargs="*", metavar="key=value", help="override any config key")
    sim.add_argument("-v", "--verbose", action="store_true", help="show Flower's and Ray's own logs")
    sim.add_argument(
        "--key-file",
        help="federation key for tasks that pseudonymise ids (default: $PRIVFED_KEY_FILE, else a fresh one)",
    )

    res = sub.add_parser("resume", help="continue a stopped simulated run from its last checkpoint")
    res.add_argument("run_dir", help="the run directory (runs/<timestamp>-<scenario>)")
    res.add_argument("-v", "--verbose", action="store_true", help="show Flower's and Ray's own logs")
    res.add_argument("--key-file", help="the run's federation key (tasks that pseudonymise ids)")

    sub.add_parser("scenarios", help="list the named scenarios")

    show = sub.add_parser("config", help="print the fully resolved config of a scenario")
    show.add_argument("scenario")
    show.add_argument("overrides", nargs="*", metavar="key=value")

    aud = sub.add_parser("audit", help="show (and verify) a run's privacy ledger")
    aud.add_argument("run_dir", help="a run directory (runs/<timestamp>-<scenario>)")
    aud.add_argument("--verify", action="store_true", help="check the hash chain and recompute every epsilon")
    aud.add_argument("--format", choices=("table", "csv", "json"), default="table")

    rep = sub.add_parser("report", help="write a self-contained HTML privacy report for a run")
    rep.add_argument("run_dir")
    rep.add_argument("--out", help="output file (default: RUN_DIR/report.html)")

    keys = sub.add_parser("keys", help="create secret keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    new = keys_sub.add_parser("new", help="create a federation key for keyed identifier hashing (HMAC-SHA256)")
    new.add_argument("path", help="where to write it (mode 0600); give every site a copy, never the server")
    new.add_argument("--force", action="store_true", help="replace an existing key file")

    certs = sub.add_parser("certs", help="deployment certificates and SuperNode keys (cryptography)")
    certs_sub = certs.add_subparsers(dest="certs_command", required=True)
    ca = certs_sub.add_parser("ca", help="create the federation's certificate authority (ca.pem, ca.key)")
    srv = certs_sub.add_parser("server", help="the SuperLink's TLS certificate, signed by the CA in --out")
    srv.add_argument("--host", action="append", required=True, help="a DNS name or IP sites dial (repeat)")
    node = certs_sub.add_parser("node", help="a SuperNode authentication key pair (NAME.key, NAME.pub)")
    node.add_argument("--name", required=True, help="e.g. the site id")
    for cp in (ca, srv, node):
        cp.add_argument("--out", required=True, help="folder for the files (the CA's folder for `server`)")
        cp.add_argument("--force", action="store_true", help="replace existing files")

    site = sub.add_parser("site", help="partner-site configuration and joining")
    site_sub = site.add_subparsers(dest="site_command", required=True)
    init = site_sub.add_parser("init", help="write a site config")
    init.add_argument("--out", required=True, help="the site config file to write")
    init.add_argument("--site-id", required=True, help="the site's pseudonym in the ledger")
    init.add_argument("--partition-id", type=int, required=True)
    init.add_argument("--superlink", required=True, help="HOST:PORT of the coordinator's Fleet API")
    init.add_argument("--ca-cert", required=True)
    init.add_argument(
        "--auth-key", required=True, help="the SuperNode private key; NAME.pub beside it is the public key"
    )
    init.add_argument("--key-file", default="", help="federation key (keyed tasks)")
    init.add_argument("--data-path", default="")
    init.add_argument("--data-format", default="", help="digits, npz, movielens or csv")
    init.add_argument("--users-path", default="")
    init.add_argument("--device", default="auto")
    init.add_argument(
        "--epsilon-budget", type=float, default=0.0, help="a stricter budget than the run's (0: the run's)"
    )
    init.add_argument(
        "--state-dir",
        default=None,
        help="where the site keeps its privacy history between rounds and restarts (default: privfed-state beside --out)",
    )
    init.add_argument("--force", action="store_true")
    joinp = site_sub.add_parser("join", help="check a site config, then run flower-supernode with it")
    joinp.add_argument("config")
    joinp.add_argument("--check", action="store_true", help="only check and print the command")

    # Overrides may follow options (`simulate S --key-file K rounds=3`); argparse alone
    # would stop collecting them at the first option.
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough: list[str] = []
    if argv[:2] == ["site", "join"] and "--" in argv:  # `site join FILE -- <flower-supernode flags>`
        cut = argv.index("--")
        argv, passthrough = argv[:cut], argv[cut + 1 :]
    args, extra = parser.parse_known_args(argv)
    stray = [e for e in extra if e.startswith("-") or "=" not in e or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    console = Console(highlight=False, soft_wrap=True)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        if args.command == "simulate":
            from simulations.launcher import simulate

            simulate(args.scenario, args.overrides, console=console, verbose=args.verbose, key_file=args.key_file)
        elif args.command == "resume":
            from simulations.launcher import resume

            resume(args.run_dir, console=console, verbose=args.verbose, key_file=args.key_file)
        elif args.command == "scenarios":
            from simulations.launcher import describe, scenario_names

            for name in scenario_names():
                console.print(f"[cyan]{name:<24}[/] {describe(name)}", soft_wrap=True)
        elif args.command == "config":
            import tomli_w

            from simulations.launcher import resolve

            sys.stdout.write(tomli_w.dumps(resolve(args.scenario, args.overrides).to_nested()))
        elif args.command == "audit":
            return _audit(args, console, err)
        elif args.command == "keys":
            from common.deploy.keys import write_key

            path = write_key(args.path, force=args.force)
            console.print(
                f"federation key written to {path} (mode 0600). Copy it to every site over a secure channel; never to the server."
            )
        elif args.command == "certs":
            _certs(args, console)
        elif args.command == "site":
            return _site(args, passthrough, console)
        elif args.command == "report":
            from pathlib import Path

            from server.html_report import write_report

            out = write_report(Path(args.run_dir), Path(args.out) if args.out else None)
            console.print(f"report: {out.resolve()}")
    except PrivfedError as exc:
        err.print(f"[red]error:[/] {escape(_one_line(str(exc)))}", soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130
    except BrokenPipeError:  # e.g. `privfed audit ... | head`: the reader left, not an error
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 0


def _one_line(message: str) -> str:
    """Error messages quote what the user typed (keys, values, file names) verbatim. Escape
    line breaks and other control characters there, as Python does in a string literal (a
    line break becomes backslash-n), so the error stays one line and cannot drive the terminal."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)


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


def _site(args: argparse.Namespace, passthrough: list[str], console: Console) -> int:
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
            key_file=str(Path(args.key_file).resolve()) if args.key_file else "",
            data_path=str(Path(args.data_path).resolve()) if args.data_path else "",
            data_format=args.data_format,
            users_path=str(Path(args.users_path).resolve()) if args.users_path else "",
            device=args.device,
            epsilon_budget=args.epsilon_budget,
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


def _audit(args: argparse.Namespace, console: Console, err: Console) -> int:
    """0: shown (and verified); 1: verification failed; 2: could not read the run."""
    from server.ledger_audit import audit_rows, describe_units, open_ledger, render, table, verify_run

    ledger = open_ledger(args.run_dir)
    if not console.is_terminal:
        console = Console(highlight=False, soft_wrap=True, width=120)  # whole table in logs and pipes
    try:
        rows = ledger.rows()
        data = audit_rows(rows)
        if args.format == "table":
            console.print(table(data, title=f"privacy ledger: {args.run_dir}"))
            if rows:
                console.print(describe_units(rows))
        else:
            sys.stdout.write(render(data, args.format))
            if args.format == "json":
                sys.stdout.write("\n")
        if not args.verify:
            return 0
        result = verify_run(args.run_dir, ledger)
    finally:
        ledger.close()
    if result.ok:
        err.print(
            f"verified: {result.rows} rows; hash chain intact, every ε recomputes from its inputs, head matches metrics.jsonl"
        )
        if result.unrecorded:
            err.print(
                f"note: the last {result.unrecorded} row(s) come after the last head in metrics.jsonl: the server stopped "
                "in that round before recording it (`privfed resume` records it); they add spend, none is hidden"
            )
        from server.privacy_audit import cross_check

        checks = cross_check(rows)
        for c in checks:
            mark = "ok" if c.ok else "[red]UNDER-STATED[/]"
            err.print(
                f"cross-check {escape(c.site_id)}: recorded ε={c.eps_recorded:.4f} ({c.accountant}), "
                f"{c.method} ε={c.eps_independent:.4f} ({-c.shortfall:+.2%}): {mark}"
            )
        if all(c.ok for c in checks):
            return 0
        err.print("[red]verification FAILED:[/] a recorded ε is below the independent accountant's (under-stated)")
        return 1
    where = f"row seq {result.first_bad_seq}" if result.first_bad_seq is not None else "ledger end"
    err.print(f"[red]verification FAILED at {where}:[/] {escape(result.reason)}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
