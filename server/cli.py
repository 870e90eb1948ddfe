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

What it prints (issue 23): by default one line per site (final ε, δ, unit, rounds it spent
in, budget, budget left); ``--rows`` prints every ledger row. With ``--verify`` the checks
follow the table on stdout and the verdict is the last line (``verdict: ...``), so
``privfed audit RUN --verify > audit.txt`` keeps it; a failed verdict is also written to
stderr when stdout is not a terminal, so whoever redirected it still sees the failure.
``--format csv|json`` are for machines and stay as they were: every row, always (``--rows``
changes only the table), and stdout holds nothing but the data, so the checks and the
verdict go to stderr there and the exit status carries the verdict.
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
        parser.add_argument(
            "--rows",
            action="store_true",
            help="list every ledger row (round x site), not one line per site (csv and json always list every row)",
        )
        parser.add_argument(
            "--format",
            choices=("table", "csv", "json"),
            default="table",
            help="table (default) for people; csv and json export every row, with the checks on stderr",
        )
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
        site_summary,
        summary_table,
        table,
        verify_against_keys,
        verify_run,
    )

    ledger = open_ledger(args.run_dir)
    stdout_is_terminal = console.is_terminal
    if not stdout_is_terminal:
        console = Console(highlight=False, soft_wrap=True, width=120)  # whole table in logs and pipes
    # Where the checks and the verdict go: after the table on stdout; for csv and json,
    # stderr, so that stdout stays parseable data.
    report = console if args.format == "table" else err
    try:
        rows = ledger.rows()
        if args.format == "table":
            if getattr(args, "rows", False):
                console.print(table(audit_rows(rows), title=f"privacy ledger: {args.run_dir}"))
            else:
                sites = site_summary(rows)
                console.print(summary_table(sites, title=f"privacy spend per site: {args.run_dir}"))
            if rows:
                console.print(console_text(describe_units(rows)))
            if rows and not getattr(args, "rows", False):
                rounds = len({r.round for r in rows})
                console.print(f"ledger: {len(rows)} rows over {rounds} round(s); --rows lists every row")
        elif args.format == "csv":
            # A cell starting with = + - @ would run as a formula in a spreadsheet (OWASP guard).
            data = audit_rows(rows)
            sys.stdout.write(render([{k: csv_cell(v) for k, v in row.items()} for row in data], "csv"))
        else:
            sys.stdout.write(render(audit_rows(rows), args.format))
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

    def fail(verdict: str) -> int:
        report.print(f"verdict: {verdict}")
        if report is console and not stdout_is_terminal:  # stdout went to a file or a pipe
            err.print(f"verdict: {verdict}")
        return 1

    if keyed is not None and not keyed.ok:
        where = f"row seq {keyed.first_bad_seq}" if keyed.first_bad_seq is not None else "ledger heads"
        return fail(f"[red]verification against keys FAILED at {where}:[/] {console_text(keyed.reason)}")
    if contradicted:
        return fail(f"[red]verification against the sites' receipts FAILED:[/] {console_text(contradicted)}")
    if not result.ok:
        where = f"row seq {result.first_bad_seq}" if result.first_bad_seq is not None else "ledger end"
        return fail(f"[red]verification FAILED at {where}:[/] {console_text(result.reason)}")
    if result.rows == 0:  # a wiped ledger is self-consistent: it must still never read as a pass
        return fail("[red]verification FAILED:[/] the ledger has no rows, so there is nothing to verify")
    report.print(
        f"verified: {result.rows} rows; hash chain intact, every ε recomputes from its inputs, "
        "head matches metrics.jsonl"
    )
    if result.unrecorded:
        report.print(
            f"note: the last {result.unrecorded} row(s) come after the last head in metrics.jsonl: "
            "the server stopped in that round before recording it (`privfed resume` records it); "
            "they add spend, none is hidden"
        )
    from server.eps_crosscheck import cross_check

    checks = cross_check(rows)
    for c in checks:
        mark = "ok" if c.ok else "[red]UNDER-STATED[/]"
        report.print(
            f"cross-check {console_text(c.site_id)}: recorded ε={c.eps_recorded:.4f} "
            f"({console_text(c.accountant)}), "
            f"{c.method} ε={c.eps_independent:.4f} ({-c.shortfall:+.2%}): {mark}"
        )
    if not all(c.ok for c in checks):
        return fail("[red]verification FAILED:[/] a recorded ε is below the independent accountant's (under-stated)")
    if keyed is None:
        # Not "PASS": a script that accepts `^verdict: PASS` must not accept a check no key took part in.
        report.print(
            f"verdict: SELF-CONSISTENT ONLY for {result.rows} rows, [yellow]not verified against keys: "
            "no registry (pass --registry)[/]"
        )
        return 0
    report.print(
        f"verified against keys: every site row follows from a claim signed by its registered key, "
        f"{len(heads)} signed head(s) verify under the server's key"
    )
    receipts = getattr(args, "receipts", None)
    if receipts:
        report.print("verified against the sites' receipts: every row and head they hold is in the ledger")
    against = (
        "keys and the sites' receipts"
        if receipts
        else "keys (a tail cut from the ledger and metrics.jsonl together shows only against the sites' "
        "receipts: --receipts)"
    )
    report.print(
        f"verdict: PASS for {result.rows} rows: chain, recomputed ε, independent accountant, verified against {against}"
    )
    return 0
