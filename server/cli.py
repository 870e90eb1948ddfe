"""``privfed audit`` and ``privfed report``: read a finished (or stopped) run's directory.

Both only read: the ledger, metrics.jsonl and the config. ``audit --verify`` recomputes
every ε from its recorded inputs and cross-checks each site's total with an independent
accountant (:mod:`server.eps_crosscheck`); neither touches any site's data.

Those checks are self-consistency: whoever writes the run directory can make them pass
(issue 19, finding 1). With a registry (``--registry PATH``, by default RUN/registry.toml
when it exists), ``--verify`` also checks every site row against the site's registered
key and every signed head against the server's (:func:`server.ledger_audit.verify_against_keys`),
and fails, exit 1, naming the first bad row. Without a registry the exit stays 0 when the
ledger agrees with itself, because a run without keys (an older run, a bare simulation)
has nothing else to check; the last line then says ``not verified against keys: no
registry``, so that a log or a script never mistakes it for the stronger check.
"""

from __future__ import annotations

import argparse
import sys

from rich.console import Console

from common.textsafe import console_text, csv_cell


def add_arguments(command: str, parser: argparse.ArgumentParser) -> None:
    if command == "audit":
        parser.add_argument("run_dir", help="a run directory (runs/<timestamp>-<scenario>)")
        parser.add_argument(
            "--verify",
            action="store_true",
            help="check the hash chain, recompute every epsilon; with a registry, check rows and heads against keys",
        )
        parser.add_argument(
            "--registry",
            help="the federation registry (TOML) holding the sites' and the server's public keys "
            "(default: RUN_DIR/registry.toml when it exists)",
        )
        parser.add_argument(
            "--receipts",
            metavar="DIR",
            help="with --verify: receipts the sites kept (*.json under DIR); fail if the ledger contradicts one",
        )
        parser.add_argument("--format", choices=("table", "csv", "json"), default="table")
    else:  # report
        parser.add_argument("run_dir")
        parser.add_argument("--out", help="output file (default: RUN_DIR/report.html)")


def run(command: str, args: argparse.Namespace, console: Console, err: Console, passthrough: list[str]) -> int:
    if command == "audit":
        return _audit(args, console, err)
    from pathlib import Path

    from server.html_report import write_report

    out = write_report(Path(args.run_dir), Path(args.out) if args.out else None)
    console.print(f"report: {out.resolve()}")
    return 0


def _audit(args: argparse.Namespace, console: Console, err: Console) -> int:
    """0: shown (and verified); 1: verification failed; 2: could not read the run."""
    from common.errors import PrivfedError
    from server.ledger_audit import (
        audit_rows,
        check_receipts_against_ledger,
        describe_units,
        load_receipts,
        load_registry,
        open_ledger,
        render,
        table,
        verify_against_keys,
        verify_run,
    )

    ledger = open_ledger(args.run_dir)
    if not console.is_terminal:
        console = Console(highlight=False, soft_wrap=True, width=120)  # whole table in logs and pipes
    try:
        rows = ledger.rows()
        data = audit_rows(rows)
        if args.format == "table":
            console.print(table(data, title=f"privacy ledger: {args.run_dir}"))
            if rows:
                console.print(console_text(describe_units(rows)))
        elif args.format == "csv":
            # A cell starting with = + - @ would run as a formula in a spreadsheet (OWASP guard).
            sys.stdout.write(render([{k: csv_cell(v) for k, v in row.items()} for row in data], "csv"))
        else:
            sys.stdout.write(render(data, args.format))
            if args.format == "json":
                sys.stdout.write("\n")
        if not args.verify:
            return 0
        result = verify_run(args.run_dir, ledger)
        heads = ledger.heads()
        registry = load_registry(args.run_dir, getattr(args, "registry", None))
        keyed = verify_against_keys(ledger, registry, rows) if registry is not None and result.ok else None
        contradicted = ""
        if getattr(args, "receipts", None) and result.ok:
            if registry is None:
                raise PrivfedError("--receipts needs a registry: the server's key checks each receipt")
            kept = load_receipts(args.receipts, registry, ledger.run_id)
            contradicted = check_receipts_against_ledger(ledger, kept)
    finally:
        ledger.close()
    if keyed is not None and not keyed.ok:
        where = f"row seq {keyed.first_bad_seq}" if keyed.first_bad_seq is not None else "ledger heads"
        err.print(f"[red]verification against keys FAILED at {where}:[/] {console_text(keyed.reason)}")
        return 1
    if contradicted:
        err.print(f"[red]verification against the sites' receipts FAILED:[/] {console_text(contradicted)}")
        return 1
    if result.ok:
        err.print(
            f"verified: {result.rows} rows; hash chain intact, every ε recomputes from its inputs, "
            "head matches metrics.jsonl"
        )
        if result.unrecorded:
            err.print(
                f"note: the last {result.unrecorded} row(s) come after the last head in metrics.jsonl: "
                "the server stopped in that round before recording it (`privfed resume` records it); "
                "they add spend, none is hidden"
            )
        from server.eps_crosscheck import cross_check

        checks = cross_check(rows)
        for c in checks:
            mark = "ok" if c.ok else "[red]UNDER-STATED[/]"
            err.print(
                f"cross-check {console_text(c.site_id)}: recorded ε={c.eps_recorded:.4f} "
                f"({console_text(c.accountant)}), "
                f"{c.method} ε={c.eps_independent:.4f} ({-c.shortfall:+.2%}): {mark}"
            )
        if all(c.ok for c in checks):
            if keyed is not None:
                err.print(
                    f"verified against keys: every site row follows from a claim signed by its registered key, "
                    f"{len(heads)} signed head(s) verify under the server's key"
                )
                if getattr(args, "receipts", None):
                    err.print("verified against the sites' receipts: every row and head they hold is in the ledger")
            else:
                err.print("[yellow]not verified against keys: no registry[/] (self-consistency only)")
            return 0
        err.print("[red]verification FAILED:[/] a recorded ε is below the independent accountant's (under-stated)")
        return 1
    where = f"row seq {result.first_bad_seq}" if result.first_bad_seq is not None else "ledger end"
    err.print(f"[red]verification FAILED at {where}:[/] {console_text(result.reason)}")
    return 1
