"""``privfed schema propose``: a site operator's draft of a tabular schema, for review.

It reads the site's private CSV, so what it proposes (category lists, observed ranges) is
not public: the operator replaces each list and range by the public declaration before the
schema is used (README, "The tabular generator"). No run ever infers its schema from the data.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console


def add_arguments(command: str, parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="schema_command", required=True)
    p = sub.add_parser("propose", help="draft a schema from a CSV for the operator to review (never used by a run)")
    p.add_argument("csv", help="the site's CSV (header line first)")
    p.add_argument("--label", required=True, help="the binary label column")
    p.add_argument("--sensitive", nargs="*", default=[], help="sensitive attribute columns (e.g. sex race)")
    p.add_argument("--delimiter", default=",")
    p.add_argument("--out", default=None, help="write the draft here (mode 0600) instead of printing it")


def run(command: str, args: argparse.Namespace, console: Console, err: Console, passthrough: list[str]) -> int:
    from common.data.tabular_schema import propose_schema
    from common.deploy.fileio import write_text_atomically

    text = propose_schema(args.csv, args.label, tuple(args.sensitive), args.delimiter)
    if args.out is None:
        console.print(text, markup=False, highlight=False, end="")
    else:
        write_text_atomically(Path(args.out), text)  # 0600: the draft holds values from the private file
        err.print(f"draft schema written to {args.out}: replace every list and range by the public declaration")
    return 0
