"""The Flower ServerApp: workflow API (LegacyContext + a flwr.server.strategy strategy).

That shape is deliberate: Flower 1.41's SecAgg+ (``SecAggPlusWorkflow``) runs only
through the workflow API, so secure aggregation is a different *fit workflow* passed
to :class:`server.workflow.RoundLoop`, not a different server.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Context
from flwr.server import Grid, LegacyContext, ServerApp, ServerConfig
from rich.console import Console

from common.config import RunConfig
from common.config.rules import check_deployment
from common.deploy.registry import Registry
from common.deploy.signing import Ed25519PrivateKey, load_signing_key, public_hex
from common.deploy.simulation_ids import ENV, MAKE_COMMAND, check_sizes, folder_from_env, load_for_server
from common.errors import ConfigError, PrivfedError, TrainingFailure
from common.identifiers import run_id_problem
from common.pipeline import build_pipeline
from common.preflight import preflight
from common.privacy.client_level import all_or_nothing_probability
from common.progress import SILENT, Stages
from common.runtime import config_from, resolve_device, single_threaded_blas
from common.tasks import get_task
from common.tasks.base import get_state, set_state
from common.textsafe import console_text
from server.callbacks import RoundOutcome
from server.callbacks.budget_stop import BudgetStop
from server.callbacks.divergence import Divergence
from server.callbacks.membership_inference import MembershipInference
from server.ledger import Ledger
from server.ledger_audit import verify_against_keys
from server.recorder import RunRecorder
from server.report import Summary, write_summary
from server.resume import ResumePoint, check_same_config, resume_point
from server.run_dir import REGISTRY_FILE, default_run_dir
from server.secagg import PrivfedSecAgg
from server.strategy import DeltaFedAvg
from server.workflow import RoundLoop, RunInterrupted, StopRequest


def run_federation(
    grid: Grid,
    context: Context,
    cfg: RunConfig,
    console: Console | None = None,
    *,
    progress: Stages = SILENT,
    stop: StopRequest | None = None,
) -> Summary:
    """Drive one run to the end and write its summary.

    ``progress`` hears of each round and of the final checks (the status line);
    ``stop`` (the simulation launcher's Ctrl-C) makes it raise :class:`RunInterrupted`
    at the next wait, with the ledger closed and no summary written (``privfed resume``
    finishes the run and writes it).
    """
    try:
        return _run_federation(grid, context, cfg, console or Console(highlight=False, soft_wrap=True), progress, stop)
    finally:
        if stop is not None:
            stop.server_done.set()


def _run_federation(
    grid: Grid, context: Context, cfg: RunConfig, console: Console, progress: Stages, stop: StopRequest | None
) -> Summary:
    task = preflight(cfg)  # bad data / delta stop here, before the run dir exists
    random.seed(cfg.federation.seed)  # Flower samples clients with the global RNG
    torch.manual_seed(cfg.federation.seed)
    model = task.build_model()
    keys = task.shared_keys(model)
    fed = cfg.federation
    if fed.resume and not fed.run_dir:
        raise ConfigError("resume", "needs run-dir: the directory of the run to continue")
    run_dir = Path(fed.run_dir) if fed.run_dir else default_run_dir(cfg)
    if run_id_problem(run_dir.name):  # the run id is the folder's name, and names a folder at every site
        raise ConfigError("run-dir", f"its last component is the run id: {run_id_problem(run_dir.name)}")
    point: ResumePoint | None = None
    registry, server_key = load_identities(cfg)
    if fed.resume:
        check_same_config(cfg, run_dir)
        with Ledger(run_dir / "ledger.sqlite", run_id=run_dir.name) as ledger:
            point = resume_point(run_dir, ledger, cfg.task, server_key=server_key)
        if point.next_round > fed.rounds:
            raise PrivfedError(f"{run_dir}: all {fed.rounds} rounds were already run; nothing to resume")
        if point.state is not None:
            model.load_state_dict(point.state)
    served_arrays = None
    if point is not None and point.served is not None and fed.ema_decay > 0:
        average = task.build_model()
        average.load_state_dict(point.served)
        served_arrays = get_state(average, keys)
    test = task.server_test_data() if cfg.federation.central_eval else None
    central_eval = None
    if test is not None:
        device = resolve_device(cfg.federation.device)
        eval_model = task.build_model().to(device)

        def central_eval(rnd: int, arrays: list[np.ndarray]) -> dict[str, float]:
            set_state(eval_model, keys, arrays)
            return task.evaluate(eval_model, test)

    n = cfg.federation.num_sites
    # The update's journey (clip, guard, evaluation sums, weighting, masking), the sites' too.
    pipeline = build_pipeline(cfg, task)
    strategy = DeltaFedAvg(
        cfg,
        task,
        None,
        pipeline,
        initial_arrays=get_state(model, keys),
        served_arrays=served_arrays,
        central_eval=central_eval,
        run_id=run_dir.name,
        registry=registry,
        server_key=server_key,
    )
    recorder: RunRecorder | None = None

    def start() -> None:
        # The run dir is created only once every site is there: a run that cannot
        # start leaves nothing behind.
        nonlocal recorder
        recorder = RunRecorder(cfg, task, run_dir, console, resume=fed.resume, server_key=server_key)
        if not (run_dir / REGISTRY_FILE).exists():  # the auditor's copy (simulation: already there)
            registry.write(run_dir / REGISTRY_FILE)
        strategy.ledger = recorder.ledger
        task.artifacts_dir = run_dir  # e.g. the GAN's evaluation classifier is cached there
        if point is not None:
            recorder.record_gap(point.missing_lines, point.checkpoint_round)
            console.print(f"resuming {run_dir} at round {point.next_round} (model of round {point.checkpoint_round})")

    def outcome(rnd: int) -> RoundOutcome:
        assert recorder is not None  # rounds begin after start()
        model = recorder.load_global(strategy.global_arrays, strategy.served.started())
        return RoundOutcome(rnd, strategy.record(rnd), model, recorder.ledger)

    def record(out: RoundOutcome, seconds: float, extra: dict[str, Any], ok: bool) -> None:
        assert recorder is not None
        recorder.write_round(out.rnd, out.record, seconds, extra, ok)

    def round_start(rnd: int) -> None:
        assert recorder is not None  # rounds begin after start()
        recorder.ledger.start_round(rnd)
        if rnd == first_round:
            # In a simulation the sites' workers are still starting: the launcher's line said so.
            progress.detail(f"round {rnd}/{fed.rounds}: the sites' workers start, then train")
        else:
            progress.stage(f"round {rnd}/{fed.rounds}: {n} sites training", line=False)

    def after_fit(rnd: int) -> list[np.ndarray] | None:
        progress.detail(f"round {rnd}/{fed.rounds}: evaluating")
        return strategy.end_fit(rnd)

    def aggregated_any() -> bool:
        return any(rec.aggregated for rec in strategy.records.values())

    callbacks = [
        MembershipInference(cfg, task, at_end=test is not None, aggregated_any=aggregated_any),
        Divergence(),
        BudgetStop(cfg, strategy),
    ]
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=fed.rounds), strategy=strategy)
    first_round = point.next_round if point is not None else 1
    loop = RoundLoop(
        round_outcome=outcome,
        record_round=record,
        callbacks=callbacks,
        on_stop=lambda rnd, why: console.print(f"[yellow]stopping after round {rnd}: {console_text(why)}[/]"),
        num_sites=n,
        site_wait_seconds=cfg.federation.site_wait_seconds,
        on_start=start,
        fit_workflow=PrivfedSecAgg(cfg.secagg, strategy) if cfg.secagg.enabled else None,
        after_fit=after_fit,
        on_round_start=round_start,
        first_round=first_round,
        round_timeout=fed.round_timeout,
        stop=stop,
    )
    failure: TrainingFailure | None = None
    try:
        loop(grid, legacy)
        fresh = first_round == 1 and not cfg.central_dp.enabled
        if fresh and strategy.records and not aggregated_any() and not any(cb.run_stop_reason() for cb in callbacks):
            # Every round ran, and no update entered the model: its metrics are those of the
            # untrained initial model. Not a result; before, such a run exited 0. (Not after a
            # resume, whose checkpoint holds earlier rounds' training, nor under client-level DP,
            # whose rounds move the model by their noise even when no site was sampled.)
            raise TrainingFailure(
                "no round aggregated an update: every site failed, was rejected or sent nothing in every "
                "round (metrics.jsonl and summary.md say why per round)"
            )
    except RunInterrupted:
        assert stop is not None  # only a StopRequest raises it
        stop.interrupted = True
        # Every committed round is on disk (ledger rows, checkpoint, metrics line); the round in
        # progress is abandoned. No final checks and no summary: they take seconds, and resume writes them.
        if recorder is not None:
            recorder.ledger.close()
        raise
    except TrainingFailure as exc:
        failure = exc  # summarised below, then raised: the run ends as a failure
        kept = (
            "checkpoint.pt holds the last good round" if (run_dir / "checkpoint.pt").exists() else "no round completed"
        )
        console.print(f"[red]run failed: {console_text(exc)}[/] ({kept})")
    finally:
        if recorder is not None and not (stop is not None and stop.interrupted):
            progress.stage(final_checks_label(cfg, test is not None))
            if any(r >= 1 and rec.aggregated for r, rec in strategy.records.items()):
                last = max(r for r, rec in strategy.records.items() if rec.aggregated)
                task.save_samples(recorder.released, run_dir / "samples" / "final.png", recorder.sample_caption(last))
            stop_reason = (
                f"FAILED: {failure}"
                if failure
                else next((why for cb in callbacks if (why := cb.run_stop_reason())), "")
            )
            mia: dict[str, float] = {}
            for cb in callbacks:
                mia.update(cb.run_metrics(recorder.model, recorder.ledger, failure))
            progress.detail("final checks: ε cross-check, plots, summary.md")
            summary = write_summary(
                run_dir,
                recorder.ledger,
                task.primary_metric,
                cfg.scenario,
                stop_reason,
                not cfg.dp.secure_rng,
                mia or None,
                test_source=task.test_description,
                plot_metrics=task.plot_metrics,
                central_extra_delta=all_or_nothing_probability(cfg) if cfg.central_dp.enabled else 0.0,
                metrics_private=cfg.metrics.dp,
                keys_check=keys_verdict(recorder.ledger, registry),
                max_sites_per_person=cfg.federation.max_sites_per_person,
            )
            recorder.ledger.close()
            # Shown under the summary's lines while Flower stops Ray (a terminal only).
            progress.stage("stopping the sites' workers (Ray)", line=False)
    if failure is not None:
        raise failure
    return summary


def final_checks_label(cfg: RunConfig, central_eval: bool) -> str:
    """The status line of the checks after the last round, naming those this run does."""
    checks = ["membership inference"] if cfg.audit.mia and central_eval else []
    checks += ["ε cross-check", "plots", "summary"]
    return f"final checks: {', '.join(checks)}"


def keys_verdict(ledger: Ledger, registry: Registry) -> str:
    """The summary's line on the ledger checked against the registry's keys (the auditor's check)."""
    check = verify_against_keys(ledger, registry)
    if check.ok:
        return "every row signed by its site's registered key, every head by the server's"
    return f"FAILED verification against keys at row {check.first_bad_seq}: {check.reason}"


def load_identities(cfg: RunConfig) -> tuple[Registry, Ed25519PrivateKey]:
    """The federation registry and the coordinator's signing key, named by the run config."""
    fed = cfg.federation
    if not fed.registry:
        raise ConfigError(
            "registry",
            "is empty: the server needs the federation registry (each site's public key and declared size; "
            "docs/DEPLOYMENT.md) to know whose reply is whose",
        )
    if not fed.server_key:
        raise ConfigError("server-key", "is empty: the server signs ledger heads and receipts with its own key")
    registry = Registry.load(fed.registry)
    server_key = load_signing_key(fed.server_key)
    if public_hex(server_key) != registry.server_key:
        raise ConfigError("server-key", "is not the key the registry's [server] public-key names")
    if len(registry.sites) < fed.num_sites:
        raise ConfigError("registry", f"registers {len(registry.sites)} site(s), but num-sites is {fed.num_sites}")
    return registry, server_key


def is_simulation(grid: Grid) -> bool:
    """Whether this ServerApp runs in a Flower simulation, told by the grid Flower gave it.

    Flower itself picks the grid: its simulation engine (``privfed simulate``, and
    ``flwr run`` against a simulation runtime) drives the ServerApp through an
    ``InMemoryGrid``; a SuperLink's ServerApp process talks to the sites through an
    ``HttpGrid``. No setting the run config could carry decides it, so a deployment
    cannot pass for a simulation, and anything not known to be a simulation is checked
    as a deployment.
    """
    from flwr.superlink.grid import InMemoryGrid

    return isinstance(grid, InMemoryGrid)


def with_simulation_identities(cfg: RunConfig) -> RunConfig:
    """``cfg`` with the registry and server key of ``$PRIVFED_SIMULATION_IDS`` when Flower's
    simulation engine runs this ServerApp (a local ``flwr run .``) and the run config names
    neither; ``cfg`` itself otherwise.

    Only :func:`is_simulation` (Flower's grid, not a setting) leads here, so a deployed
    ServerApp never reads the variable and still refuses to run without a registry
    (:func:`load_identities`). Refused in one line, naming the variable: a folder made for
    another ``num-sites``, or (for a task the server can split without the federation key)
    for another data split, since the server weights each site by its registered n-hat and
    refuses a reply that declares another.
    """
    fed = cfg.federation
    if fed.registry or fed.server_key:
        return cfg  # the run config's own; load_identities checks them
    folder = folder_from_env()
    if folder is None:
        raise ConfigError(
            "registry",
            f"is empty: under a local `flwr run` (Flower's simulation engine), make the parties' keys with "
            f"`{MAKE_COMMAND} DIR ...` and set {ENV}=DIR in the environment the local SuperLink starts with",
        )
    ids = load_for_server(folder, fed.num_sites)
    if not get_task(cfg.task).needs_key:  # a keyed task's sites check their own size (client.app.make_site)
        check_sizes(folder, ids.sizes, get_task(cfg.task)(cfg, None).site_sizes())
    return cfg.replace(registry=str(ids.registry_path), server_key=str(ids.server_key_path))


def build_server_app(
    defaults: Mapping[str, Any] | None = None,
    console: Console | None = None,
    *,
    flower_runs_it: bool = False,
    progress: Stages = SILENT,
    stop: StopRequest | None = None,
) -> ServerApp:
    """A ServerApp whose config is ``defaults`` overlaid by Flower's run_config.

    ``flower_runs_it``: Flower's own runtime runs this app (``flwr run``, a SuperLink), with
    no privfed launcher before it to quiet Flower's logging; the app does it while it runs
    (:mod:`server.flower_logging`: each line once, privfed's round line instead of Flower's
    per-round INFO lines unless ``FLWR_LOG_LEVEL`` asks for them). Only the module-level
    ``app`` sets it: ``privfed simulate`` quiets Flower itself, and a test's log capture
    needs Flower's records to reach the root logger.

    ``progress``, ``stop``: the simulation launcher's status line and Ctrl-C (run_federation)."""
    base = dict(defaults or {})
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        if not flower_runs_it:
            return _main(grid, context)
        from server.flower_logging import flower_logging

        with flower_logging():
            return _main(grid, context)

    def _main(grid: Grid, context: Context) -> None:
        if not is_simulation(grid):
            return _run_main(grid, context)
        # In a simulation (privfed simulate, flwr run) Flower starts Ray (fork) in another thread
        # of this process while this one evaluates, and a fork amid a multi-threaded OpenBLAS
        # call hangs (common/runtime.py). The one place that limits it: undone after the run.
        with single_threaded_blas():
            return _run_main(grid, context)

    def _run_main(grid: Grid, context: Context) -> None:
        cfg = config_from(base, context.run_config)
        if is_simulation(grid):
            cfg = with_simulation_identities(cfg)  # a local `flwr run`: $PRIVFED_SIMULATION_IDS
        else:
            check_deployment(cfg)  # every wait for the sites has a limit
        out = console or Console(highlight=False, soft_wrap=True)
        try:
            summary = run_federation(grid, context, cfg, out, progress=progress, stop=stop)
        except RunInterrupted:
            return  # Ctrl-C: the launcher says what was kept and how to resume
        for line in summary.headline():
            out.print(console_text(line))  # it carries failure strings and site ids

    return app


# What `flwr run .` and a SuperLink load ([tool.flwr.app.components] in pyproject.toml).
app = build_server_app(flower_runs_it=True)
