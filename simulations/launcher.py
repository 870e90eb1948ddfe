"""Run a named scenario as an in-process Flower simulation (``privfed simulate``).

A scenario is a TOML file in ``simulations/scenarios/``: an optional ``description``,
an optional ``extends = "<other scenario>"``, top-level run keys under
``[federation]`` and one table per section (``[data]``, ``[train]``, ``[dp]``, ``[vae]``).
Command-line overrides (``rounds=3 dp.noise-multiplier=1.5``) win over the file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from common.config import RunConfig, flatten, parse_override
from common.deploy.keys import KEY_BYTES, key_from_env, load_key
from common.errors import ConfigError, DataError
from server.flower_logging import LOGGER_NAME, WarningsOnly
from server.run_dir import check_new_run_dir, default_run_dir

# Nothing here imports torch, Flower, Ray or Opacus: `privfed scenarios`, `privfed config` and a
# config's one-line error use this module and answer in well under a second. The preflight
# (Opacus, torch) and the simulation (Flower, Ray) are imported where a run needs them.
if TYPE_CHECKING:
    from common.progress import StatusLine

SCENARIO_DIR = Path(__file__).parent / "scenarios"
# The one place seeded noise is the default: a simulation repeats exactly. dp.secure-rng
# defaults to true everywhere else; the run report and the ledger's rng column say "seeded",
# and the launcher's virtual sites are the only sites that accept it without their own
# allow-seeded-noise (client.app.build_client_app). A scenario or an override may still set it.
# Simulations repeat exactly (seeded noise) and show exact metrics (metrics.dp off); the
# run report says both. Deployments get neither default (common/config/schema.py).
SIMULATION_DEFAULTS: dict[str, Any] = {"dp.secure-rng": False, "metrics.dp": False}
_META_KEYS = ("description", "extends")


def scenario_names() -> list[str]:
    return sorted(p.stem for p in SCENARIO_DIR.glob("*.toml"))


def load_scenario(name: str, _seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """The scenario's flat keys (``extends`` resolved), with ``scenario`` set to its name."""
    path = SCENARIO_DIR / f"{name}.toml"
    if not path.is_file():
        raise ConfigError("scenario", f"unknown scenario {name!r} (known: {', '.join(scenario_names())})")
    if name in _seen:
        raise ConfigError("extends", f"scenario {name!r} extends itself via {' -> '.join(_seen)}")
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise DataError(path, "is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise DataError(path, f"invalid TOML ({exc})") from None
    if not isinstance(doc.get("federation", {}), dict):
        raise DataError(path, "'federation' must be a table ([federation])")
    base = load_scenario(doc["extends"], _seen + (name,)) if "extends" in doc else {}
    body = {k: v for k, v in doc.items() if k not in _META_KEYS}
    flat = flatten(body.pop("federation", {}))
    flat.update(flatten(body))
    return {**base, **flat, "scenario": name}


def describe(name: str) -> str:
    doc = tomllib.loads((SCENARIO_DIR / f"{name}.toml").read_text())
    return str(doc.get("description", ""))


# Simulations turn private metrics off unless a scenario or an override sets metrics.dp:
# their metrics are the experiment's measurements, and the report then says "metrics not
# private". Everything else (flwr run, a deployment) gets the schema's default, on.
def resolve(scenario: str, overrides: Iterable[str] = ()) -> RunConfig:
    flat = {**SIMULATION_DEFAULTS, **load_scenario(scenario)}
    for text in overrides:
        key, value = parse_override(text)
        flat[key] = value
    return RunConfig.from_flat(flat)


def simulation_key(cfg: RunConfig, key_file: str | None, console: Console) -> bytes | None:
    """The federation key the virtual sites share, for tasks that pseudonymise identifiers.

    ``--key-file``, else ``$PRIVFED_KEY_FILE``, else a fresh random key held in memory for
    this run only (item buckets and, since users are ordered by pseudonym, the held-out
    split then differ between runs, so results can differ slightly).
    The key goes to the sites only; the ServerApp never receives it.
    """
    from common.tasks import get_task

    if not get_task(cfg.task).needs_key:
        if key_file:
            console.print(f"[dim]--key-file ignored: task {cfg.task!r} does not pseudonymise identifiers[/]")
        return None
    if key_file:
        return load_key(key_file)
    key = key_from_env()
    if key is None:
        console.print(
            "[dim]federation key: a fresh random key for this run only (pass --key-file to reuse one; "
            "`privfed keys new PATH` creates it)[/]"
        )
        key = secrets.token_bytes(KEY_BYTES)
    return key


def simulate(
    scenario: str,
    overrides: Iterable[str] = (),
    *,
    console: Console | None = None,
    verbose: bool = False,
    key_file: str | None = None,
) -> Path:
    """Validate everything, then run the federation; returns the run directory."""
    from common.progress import StatusLine

    console = console or Console(highlight=False, soft_wrap=True)
    cfg = resolve(scenario, overrides)
    if not cfg.federation.run_dir:
        cfg = cfg.replace(run_dir=str(default_run_dir(cfg)))
    check_new_run_dir(Path(cfg.federation.run_dir))  # first: it costs nothing, the preflight seconds
    with StatusLine(console) as status:
        _header(cfg, console)
        key = simulation_key(cfg, key_file, console)
        from common.preflight import preflight

        task = preflight(cfg, key, status)  # data and delta checks: fail before Ray or a run dir exists
        return _run(cfg, key, console, verbose, task.site_sizes(), status)


def resume(
    run_dir: str | Path, *, console: Console | None = None, verbose: bool = False, key_file: str | None = None
) -> Path:
    """Continue a stopped simulated run from its last checkpoint (``privfed resume RUN_DIR``).

    The run's own config.toml is used unchanged; the virtual sites find their durable
    state (accounting history, site-local model) in RUN_DIR/site-state. A task that
    pseudonymises identifiers needs the same federation key as the first run.
    """
    from common.progress import StatusLine
    from server.resume import stored_config

    console = console or Console(highlight=False, soft_wrap=True)
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError("run-dir", f"{run_dir} is not a directory")
    cfg = stored_config(run_dir).replace(run_dir=str(run_dir), resume=True)
    key = simulation_key(cfg, key_file, console)
    if key is not None and not key_file and key_from_env() is None:
        raise ConfigError("key-file", f"task {cfg.task!r} needs the run's federation key to resume: pass --key-file")
    with StatusLine(console) as status:
        _header(cfg, console)
        from common.preflight import preflight

        task = preflight(cfg, key, status)
        return _run(cfg, key, console, verbose, task.site_sizes(), status)


def _header(cfg: RunConfig, console: Console) -> None:
    """The run's first line: what runs, from the config alone (before the data's seconds)."""
    dp = cfg.dp
    privacy = (
        f"DP-SGD σ={dp.noise_multiplier:g}"
        if dp.enabled and not dp.target_epsilon
        else f"DP-SGD target ε={dp.target_epsilon:g}"
        if dp.enabled
        else "no sample-level DP"
    )
    if cfg.central_dp.enabled:
        privacy += f", client-level DP C={cfg.central_dp.clip_norm:g}"
    if cfg.secagg.enabled:
        privacy += ", SecAgg+"
    console.print(
        f"[bold]privfed[/] scenario [cyan]{cfg.scenario}[/]: task {cfg.task}, {cfg.federation.num_sites} sites, "
        f"{cfg.federation.rounds} rounds, {privacy}, C={dp.max_grad_norm:g}, budget ε={dp.epsilon_budget:g}"
    )


def _run(
    cfg: RunConfig, key: bytes | None, console: Console, verbose: bool, sizes: list[int], status: StatusLine
) -> Path:
    """Run the federation. ``sizes``: each virtual site's declared public size n-hat.

    In a simulation the coordinator made the partition and knows every site's size, so the
    launcher declares n-hat = the site's training-split size before the run; a deployed site
    declares its own (docs/PRIVACY.md, "Dataset sizes are public by declaration").
    """
    run_dir = Path(cfg.federation.run_dir)
    cores = os.cpu_count() or 1
    if cfg.federation.client_cpus > cores:
        raise ConfigError("client-cpus", f"is {cfg.federation.client_cpus} but this machine has {cores} cores")
    if cfg.federation.client_gpus > 0:
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("client-gpus", f"is {cfg.federation.client_gpus:g} but no CUDA device is available")

    console.print(f"run dir: {run_dir}")
    console.print(
        "[dim]site sizes: public by declaration (simulation: the launcher declares each site's training-split size)[/]"
    )
    # Said before the imports below (Flower, Ray: seconds of their own). Ray starts inside
    # run_simulation, and the first round's line is the first sign it is up.
    # Flower starts one worker (Ray actor) per client-cpus share of the cores, whatever num-sites.
    workers = max(1, cores // cfg.federation.client_cpus)
    in_process = cfg.federation.backend == "in-process"
    status.stage(
        "the sites run in this process, one message at a time (backend = in-process, no Ray)"
        if in_process
        else f"starting Ray and {workers} site worker{'s' if workers > 1 else ''} "
        f"(usually {RAY_START_SECONDS}, part of round 1)"
    )
    _quiet_flower(verbose)
    _skip_final_gc()
    from flwr.simulation import run_simulation  # heavy import (Ray): only when running

    from client.app import build_client_app
    from common.deploy.simulation_ids import simulation_identities
    from common.privacy.plan import known_noise
    from server.app import build_server_app
    from server.run_dir import PREPARED
    from server.workflow import StopRequest
    from simulations.in_process import sites_in_process
    from simulations.interrupt import ctrl_c_stops, interrupted_text

    # Every party's Ed25519 key and the registry (common/deploy/simulation_ids.py): the server
    # trusts a reply's site id only when that site's key signed it, and weights it by the
    # registered n-hat.
    ids = simulation_identities(run_dir, sizes, resume=cfg.federation.resume)
    if not (cfg.federation.resume and cfg.federation.registry):  # a resumed run keeps its config
        cfg = cfg.replace(registry=str(ids.registry_path), server_key=str(ids.server_key_path))
    flat = cfg.to_flat()

    def forget_unstarted() -> None:
        # A run that never started leaves nothing behind: not even the keys made for it.
        if not cfg.federation.resume and run_dir.is_dir() and all(p.name in PREPARED for p in run_dir.iterdir()):
            shutil.rmtree(run_dir)

    stop = StopRequest()
    try:
        with (
            ctrl_c_stops(stop, console, status, run_dir, forget_unstarted),
            sites_in_process() if in_process else contextlib.nullcontext(),
        ):
            run_simulation(
                server_app=build_server_app(flat, console, progress=status, stop=stop),
                # The virtual sites' durable state (client.state) lives beside the run.
                # The preflight's noise search travels with the app, so Ray workers skip it.
                # Virtual sites accept seeded noise (a deployed site refuses it unless its node config allows it).
                client_app=build_client_app(
                    flat,
                    key=key,
                    state_dir=run_dir.resolve() / "site-state",
                    noise=known_noise(),
                    allow_seeded_noise=True,
                    declared_sizes=sizes,
                    signing_keys=ids.site_keys,
                    server_public_key=ids.server_public_key,
                ),
                num_supernodes=cfg.federation.num_sites,
                backend_config={
                    "client_resources": {
                        "num_cpus": cfg.federation.client_cpus,
                        "num_gpus": cfg.federation.client_gpus,
                    },
                    "init_args": {"num_cpus": cores, "log_to_driver": verbose, "include_dashboard": False},
                },
                verbose_logging=verbose,
            )
        if stop.interrupted:
            raise KeyboardInterrupt
    except BaseException as exc:
        status.close()
        forget_unstarted()
        if isinstance(exc, KeyboardInterrupt):
            console.print(interrupted_text(run_dir))
        raise
    return run_dir


# What the status line says Ray's start costs: measured 10-30 s on a 2-core machine (Ray
# itself, then each worker importing torch and loading its site's data in round 1).
RAY_START_SECONDS = "10-30 s"


def _skip_final_gc() -> None:
    """At exit, skip the interpreter's last garbage collections (atexit runs before them).

    After a run the heap holds torch, Ray, Flower and their data: half a million objects that
    Python's finalisation traverses in full collections, 3-5 s on 2 busy cores, after the
    last line is printed (and after Ctrl-C). ``gc.freeze`` at exit makes those collections skip
    them; memory goes back to the OS all the same. Every file of the run is closed (ledger)
    or fsynced (metrics, checkpoint) by then, so no finaliser is waited for.
    Registered at exit only, so a process that goes on (a test session) is not affected.
    """
    import atexit
    import gc

    atexit.unregister(gc.freeze)  # once per process, however many runs it starts
    atexit.register(gc.freeze)


def _quiet_flower(verbose: bool) -> None:
    """Flower logs every message exchange at INFO; our per-round line replaces that."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    if not verbose:
        os.environ.setdefault("FLWR_LOG_LEVEL", "WARNING")
        # run_simulation resets the console handler's level, so filter on the logger itself.
        flwr_logger = logging.getLogger(LOGGER_NAME)
        if not any(isinstance(f, _WarningsOnly) for f in flwr_logger.filters):
            flwr_logger.addFilter(_WarningsOnly())
        # Flower's logger has its own console handler; Ray gives the root logger another,
        # which would print every line twice.
        flwr_logger.propagate = False


class _WarningsOnly(WarningsOnly):
    """Flower's own level rule (:class:`server.flower_logging.WarningsOnly`), plus what only a
    simulation prints: a site's Ray traceback shortened to its reason, once."""

    last_failure = ""

    def filter(self, record: logging.LogRecord) -> bool:
        # run_simulation is deprecated in favour of `flwr run`, but it is the documented
        # way to run in-process and leave no SuperLink behind; we use it on purpose.
        message = record.getMessage()
        if "`run_simulation` function is deprecated" in message:
            return False
        if "An exception was raised when processing a message" in message:
            return False  # the next record says which
        if "ClientAppActor" in message:
            # A site's failure arrives as a Ray traceback; its last line is the reason, and
            # the round's metrics line records it too (-v shows the whole traceback).
            last = next((ln.strip() for ln in reversed(message.splitlines()) if ln.strip()), "")
            last = last.replace("Exception ClientAppException occurred. Message: ", "")
            record.msg, record.args = f"a site failed: {last}", ()
            if record.msg == self.last_failure:  # Flower logs each failure twice
                return False
            self.last_failure = record.msg
        return super().filter(record)
