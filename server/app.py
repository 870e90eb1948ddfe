"""The Flower ServerApp: workflow API (LegacyContext + a flwr.server.strategy strategy).

That shape is deliberate: Flower 1.41's SecAgg+ (``SecAggPlusWorkflow``) runs only
through the workflow API, so secure aggregation is a different *fit workflow* passed
to :class:`server.workflow.RoundLoop`, not a different server.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Context
from flwr.server import Grid, LegacyContext, ServerApp, ServerConfig
from rich.console import Console

from common.config import RunConfig, all_or_nothing_probability
from common.errors import ConfigError, PrivfedError, TrainingFailure
from common.pipeline import build_pipeline
from common.preflight import preflight
from common.runtime import config_from, resolve_device
from common.tasks.base import get_state, set_state
from server.ledger import Ledger
from server.privacy_audit import mia_for_run
from server.recorder import RunRecorder, default_run_dir
from server.report import Summary, write_summary
from server.resume import ResumePoint, check_same_config, resume_point
from server.secagg import PrivfedSecAgg
from server.strategy import DeltaFedAvg
from server.workflow import RoundLoop


def run_federation(grid: Grid, context: Context, cfg: RunConfig, console: Console | None = None) -> Summary:
    """Drive one run to the end and write its summary."""
    console = console or Console(highlight=False, soft_wrap=True)
    task = preflight(cfg)  # bad data / delta stop here, before the run dir exists
    random.seed(cfg.federation.seed)  # Flower samples clients with the global RNG
    torch.manual_seed(cfg.federation.seed)
    model = task.build_model()
    keys = task.shared_keys(model)
    fed = cfg.federation
    if fed.resume and not fed.run_dir:
        raise ConfigError("resume", "needs run-dir: the directory of the run to continue")
    run_dir = Path(fed.run_dir) if fed.run_dir else default_run_dir(cfg, datetime.now().strftime("%Y%m%d-%H%M%S"))
    point: ResumePoint | None = None
    if fed.resume:
        check_same_config(cfg, run_dir)
        with Ledger(run_dir / "ledger.sqlite", run_id=run_dir.name) as ledger:
            point = resume_point(run_dir, ledger, cfg.task)
        if point.next_round > fed.rounds:
            raise PrivfedError(f"{run_dir}: all {fed.rounds} rounds were already run; nothing to resume")
        if point.state is not None:
            model.load_state_dict(point.state)
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
        cfg, task, None, pipeline, initial_arrays=get_state(model, keys), central_eval=central_eval, run_id=run_dir.name
    )
    recorder: RunRecorder | None = None

    def start() -> None:
        # The run dir is created only once every site is there: a run that cannot
        # start leaves nothing behind.
        nonlocal recorder
        recorder = RunRecorder(cfg, task, run_dir, console, resume=fed.resume)
        strategy.ledger = recorder.ledger
        task.artifacts_dir = run_dir  # e.g. the GAN's evaluation classifier is cached there
        if point is not None:
            recorder.record_gap(point.missing_lines, point.checkpoint_round)
            console.print(f"resuming {run_dir} at round {point.next_round} (model of round {point.checkpoint_round})")

    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=fed.rounds), strategy=strategy)
    loop = RoundLoop(
        on_round_end=lambda rnd, secs: recorder.end_round(rnd, secs, strategy),
        num_sites=n,
        site_wait_seconds=cfg.federation.site_wait_seconds,
        on_start=start,
        fit_workflow=PrivfedSecAgg(cfg.secagg, strategy) if cfg.secagg.enabled else None,
        after_fit=strategy.end_fit,
        on_round_start=lambda rnd: recorder.ledger.start_round(rnd),
        first_round=point.next_round if point is not None else 1,
        round_timeout=fed.round_timeout,
    )
    failure: TrainingFailure | None = None
    try:
        loop(grid, legacy)
    except TrainingFailure as exc:
        failure = exc  # summarised below, then raised: the run ends as a failure
        kept = (
            "checkpoint.pt holds the last good round" if (run_dir / "checkpoint.pt").exists() else "no round completed"
        )
        console.print(f"[red]run failed: {exc}[/] ({kept})")
    finally:
        if recorder is not None:
            if any(r >= 1 and rec.aggregated for r, rec in strategy.records.items()):
                task.save_samples(recorder.model, run_dir / "samples" / "final.png")
            stop_reason = f"FAILED: {failure}" if failure else "budgets exhausted" if strategy.should_stop() else ""
            mia = None
            if (
                failure is None
                and cfg.audit.mia
                and test is not None
                and any(rec.aggregated for rec in strategy.records.values())
            ):
                mia = mia_for_run(task, recorder.model, recorder.ledger.rows(), cfg.federation.seed)
            summary = write_summary(
                run_dir,
                recorder.ledger,
                task.primary_metric,
                cfg.scenario,
                stop_reason,
                not cfg.dp.secure_rng,
                mia,
                test_source=task.test_description,
                plot_metrics=task.plot_metrics,
                central_extra_delta=all_or_nothing_probability(cfg) if cfg.central_dp.enabled else 0.0,
            )
            recorder.ledger.close()
    if failure is not None:
        raise failure
    return summary


def build_server_app(defaults: Mapping[str, Any] | None = None, console: Console | None = None) -> ServerApp:
    """A ServerApp whose config is ``defaults`` overlaid by Flower's run_config."""
    base = dict(defaults or {})
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = config_from(base, context.run_config)
        out = console or Console(highlight=False, soft_wrap=True)
        summary = run_federation(grid, context, cfg, out)
        for line in summary.headline():
            out.print(line)

    return app


app = build_server_app()
