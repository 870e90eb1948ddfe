"""The ``privfed`` command: the friendly front door.

    privfed simulate <scenario> [key=value ...]   run a simulated federation
    privfed scenarios                             list the named scenarios
    privfed config <scenario> [key=value ...]     print the resolved config (TOML)
"""

from __future__ import annotations

import argparse
import sys

from rich.console import Console

from common.errors import PrivfedError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="privfed", description="Privacy-preserving federated training.")
    sub = parser.add_subparsers(dest="command", required=True)

    sim = sub.add_parser("simulate", help="run a simulated federation on this machine")
    sim.add_argument("scenario", help="a scenario name (see `privfed scenarios`)")
    sim.add_argument("overrides", nargs="*", metavar="key=value", help="override any config key")
    sim.add_argument("-v", "--verbose", action="store_true", help="show Flower's and Ray's own logs")

    sub.add_parser("scenarios", help="list the named scenarios")

    show = sub.add_parser("config", help="print the fully resolved config of a scenario")
    show.add_argument("scenario")
    show.add_argument("overrides", nargs="*", metavar="key=value")

    args = parser.parse_args(argv)
    console = Console(highlight=False, soft_wrap=True)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        if args.command == "simulate":
            from simulations.launcher import simulate

            simulate(args.scenario, args.overrides, console=console, verbose=args.verbose)
        elif args.command == "scenarios":
            from simulations.launcher import describe, scenario_names

            for name in scenario_names():
                console.print(f"[cyan]{name:<24}[/] {describe(name)}", soft_wrap=True)
        elif args.command == "config":
            import tomli_w

            from simulations.launcher import resolve

            sys.stdout.write(tomli_w.dumps(resolve(args.scenario, args.overrides).to_nested()))
    except PrivfedError as exc:
        err.print(f"[red]error:[/] {exc}", markup=True, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
