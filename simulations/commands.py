"""``privfed simulate|resume|scenarios|config``: the in-process simulation's commands.

``resume`` lives here, not with the server's commands: continuing a *simulated* run
starts its virtual sites too (the ClientApp), which the server side must not import.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from rich.console import Console


def add_arguments(command: str, parser: argparse.ArgumentParser) -> None:
    if command == "simulate":
        parser.add_argument("scenario", help="a scenario name (see `privfed scenarios`)")
        parser.add_argument("overrides", nargs="*", metavar="key=value", help="override any config key")
        parser.add_argument("-v", "--verbose", action="store_true", help="show Flower's and Ray's own logs")
        parser.add_argument(
            "--key-file",
            help="federation key for tasks that pseudonymise ids (default: $PRIVFED_KEY_FILE, else a fresh one)",
        )
    elif command == "resume":
        parser.add_argument("run_dir", help="the run directory (runs/<timestamp>-<scenario>)")
        parser.add_argument("-v", "--verbose", action="store_true", help="show Flower's and Ray's own logs")
        parser.add_argument("--key-file", help="the run's federation key (tasks that pseudonymise ids)")
    elif command == "config":
        parser.add_argument("scenario")
        parser.add_argument("overrides", nargs="*", metavar="key=value")


def run(command: str, args: argparse.Namespace, console: Console, err: Console, passthrough: list[str]) -> int:
    if command == "simulate":
        from simulations.launcher import simulate

        run_dir = simulate(args.scenario, args.overrides, console=console, verbose=args.verbose, key_file=args.key_file)
        _next_steps(console, run_dir)
    elif command == "resume":
        from simulations.launcher import resume

        run_dir = resume(args.run_dir, console=console, verbose=args.verbose, key_file=args.key_file)
        _next_steps(console, run_dir)
    elif command == "scenarios":
        from simulations.launcher import describe, scenario_names

        for name in scenario_names():
            console.print(f"[cyan]{name:<24}[/] {describe(name)}", soft_wrap=True)
    else:  # config
        import tomli_w

        from simulations.launcher import resolve

        sys.stdout.write(tomli_w.dumps(resolve(args.scenario, args.overrides).to_nested()))
    return 0


def _next_steps(console: Console, run_dir: Path) -> None:
    """The run's last line: the auditor's two commands for what it left behind."""
    from rich.markup import escape

    d = escape(shlex.quote(str(run_dir)))
    console.print(f"next: privfed audit {d} --verify (the ledger against the keys); privfed report {d} (report.html)")
