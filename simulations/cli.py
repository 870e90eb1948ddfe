"""The ``privfed`` command: the friendly front door, and only a dispatcher.

privfed simulate <scenario> [key=value ...]   run a simulated federation
privfed resume RUN_DIR                        continue a stopped run from its checkpoint
privfed scenarios                             list the named scenarios
privfed config <scenario> [key=value ...]     print the resolved config (TOML)
privfed audit RUN_DIR [--verify] [--format table|csv|json]
                                              epsilon per round and site; verify the ledger
privfed report RUN_DIR [--out FILE]           self-contained HTML report with plots
privfed keys new|signing PATH [--force]       create a federation key / an Ed25519 signing key
privfed keys simulation DIR [key=value ...]   every party's key for a local `flwr run .` (PRIVFED_SIMULATION_IDS)
privfed certs ca|server|node|rotate|status|protect-ca|node-id --out DIR ...
                                              CA, SuperLink TLS certificate, SuperNode auth keys
privfed coordinator superlink|proxy|flwr-config --pki DIR ...
                                              the SuperLink (loopback), the sites' nginx proxy
privfed app hash|sign [--app DIR]             the app's hash; the coordinator's signature of it
privfed site init --out FILE ...              write a partner site's config
privfed site approve FILE --signature SIG     approve the coordinator's signed app
privfed site join FILE [-- SUPERNODE FLAGS]   check it, then run the site's SuperNode and SuperExec
privfed site verify --state-dir DIR --ledger RUN_DIR
                                              check the coordinator's ledger against the site's records
privfed schema propose CSV --label L [--sensitive S ...] [--out FILE]
                                              draft a tabular schema for the operator to review

Each command's flags and handler live with what it drives (see ``COMMANDS``); a module
is imported only when its command runs, so ``privfed --help`` imports none of them.
Every command module has ``add_arguments(command, parser)`` and
``run(command, args, console, err, passthrough) -> exit code``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from rich.console import Console
from rich.markup import escape

from common.errors import PrivfedError

# command -> (module with its flags and handler, one-line help), in `privfed --help` order
COMMANDS: dict[str, tuple[str, str]] = {
    "simulate": ("simulations.commands", "run a simulated federation on this machine"),
    "resume": ("simulations.commands", "continue a stopped simulated run from its last checkpoint"),
    "scenarios": ("simulations.commands", "list the named scenarios"),
    "config": ("simulations.commands", "print the fully resolved config of a scenario"),
    "audit": ("server.cli", "show (and verify) a run's privacy ledger"),
    "report": ("server.cli", "write a self-contained HTML privacy report for a run"),
    "keys": ("common.deploy.cli", "create secret keys"),
    "certs": ("common.deploy.cli", "deployment certificates and SuperNode keys (cryptography)"),
    "site": ("client.cli", "partner-site configuration, app approval and joining"),
    "app": ("common.deploy.app_cli", "hash and sign the app the sites will run (coordinator)"),
    "coordinator": ("server.coordinator", "start the SuperLink and the sites' proxy (coordinator)"),
    "schema": ("common.data.schema_cli", "draft a tabular schema from a site's CSV, for review"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="privfed", description="Privacy-preserving federated training.")
    sub = parser.add_subparsers(dest="command", required=True)
    argv = list(sys.argv[1:] if argv is None else argv)
    # The top-level parser has no options that take a value: the first word is the command.
    chosen = next((a for a in argv if not a.startswith("-")), None)
    module = None
    for name, (module_name, help_text) in COMMANDS.items():
        command_parser = sub.add_parser(name, help=help_text)
        if name == chosen:
            module = importlib.import_module(module_name)
            module.add_arguments(name, command_parser)

    # Overrides may follow options (`simulate S --key-file K rounds=3`); argparse alone
    # would stop collecting them at the first option.
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
    assert module is not None  # parse_known_args exits on an unknown command
    try:
        return int(module.run(args.command, args, console, err, passthrough))
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


def _one_line(message: str) -> str:
    """Error messages quote what the user typed (keys, values, file names) verbatim. Escape
    line breaks and other control characters there, as Python does in a string literal (a
    line break becomes backslash-n), so the error stays one line and cannot drive the terminal."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)


if __name__ == "__main__":
    sys.exit(main())
