"""Benchmark: a full privfed round against a bare Flower FedAvg round, side by side.

    .venv/bin/python -m simulations.bench --sections round     (part of `make bench`)

**Bare round.** Stock ``flwr.server.strategy.FedAvg`` (``ServerApp(server_fn=...)``, the
legacy-compatible shape Flower documents) and a minimal ``NumPyClient``: the same task
model, the same site data split, batch size, optimiser and number of local steps as a
privfed site, trained without DP; the client evaluates the task's loss on its
validation split and the server evaluates the same loss on the server test split
(``evaluate_fn``). Nothing else: no ledger, no accounting, no fairness metrics, no run
directory.

**Full privfed round.** ``privfed simulate <scenario>`` through the same
``flwr.simulation.run_simulation`` path and Ray backend settings: DP-SGD with accounting
at every site, deltas, the hash-chained ledger (SQLite, fsync), the round's metrics
line with site-level fairness and the task's group/fairness metrics (per-class
reconstruction disparity, class TV of generated samples), and an atomic checkpoint.
Measured with SecAgg+ off and on. Sample grids and the end-of-run membership-inference
audit are off: they are not per-round work.

**Timing.** A round ends when the server has finished everything it does for it: for
privfed when the recorder prints the round's line (after ledger, metrics line and
checkpoint), for the bare run when FedAvg aggregates the round's evaluation metrics (the
last step of a Flower round). Round r lasts from the end of round r-1 to the end of round
r. The first rounds of each run are warm-up and not timed (default 3): Ray actors start,
and each Ray worker process runs Opacus's noise-multiplier search (about 1 s) the first
time it hosts a site (``dp.target-epsilon``), which spills into rounds 2 and 3. The table
shows the median over the timed rounds of all repeats; runs alternate (bare, off, on,
then on, off, bare).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Context
from flwr.client import ClientApp, NumPyClient
from flwr.common import ndarrays_to_parameters
from flwr.server import ServerApp, ServerAppComponents, ServerConfig
from flwr.server.strategy import FedAvg
from rich.console import Console

from common.config import RunConfig
from common.data.arrays import ArrayData
from common.privacy.training import task_optimizer
from common.runtime import cached_task, config_from
from common.tasks.base import Task, get_state, set_state
from simulations.bench_util import RoundStamps, median, round_seconds
from simulations.launcher import _quiet_flower, resolve, simulate

# Per-round work only: sample grids and the end-of-run MIA are not part of a round.
PRIVFED_FIXED = ("sample-every=0", "audit.mia=false")
MODES = ("bare", "privfed", "privfed+secagg")


@dataclass
class RunTiming:
    """One federated run: seconds of each timed round, and (privfed) its own view of them."""

    mode: str
    round_s: list[float]
    wall_s: float
    # privfed only: RoundLoop's per-round seconds (fit + evaluation, without the recorder).
    loop_s: list[float] = field(default_factory=list)
    secagg_stages_s: dict[str, list[float]] = field(default_factory=dict)
    # Rounds that did not do the full work (a site missing, nothing aggregated): such a
    # round is quicker, so its time would flatter the ratio.
    problems: list[str] = field(default_factory=list)


# ------------------------------------------------------------------ the bare Flower run


class BareClient(NumPyClient):
    """A plain Flower site: same model, data split, optimiser and step count; no DP."""

    def __init__(self, task: Task, site_index: int) -> None:
        self.task, self.site = task, site_index
        self.train_data, self.val_data = task.site_data(site_index)

    def _model(self, parameters: list[np.ndarray]) -> tuple[torch.nn.Module, list[str]]:
        model = self.task.build_model(self.site)
        keys = self.task.shared_keys(model)
        set_state(model, keys, parameters)
        return model, keys

    def fit(self, parameters: list[np.ndarray], config: Mapping[str, Any]):
        model, keys = self._model(parameters)
        cfg = self.task.cfg
        opt = task_optimizer(self.task, model, cfg.train.lr)
        n, b = len(self.train_data), cfg.train.batch_size
        # privfed's plan: steps = ceil(local_epochs / q) with q = min(1, b / n).
        steps = max(1, math.ceil(cfg.train.local_epochs / min(1.0, b / n)))
        model.train()
        done = 0
        while done < steps:
            for idx in torch.randperm(n).split(b):
                if done == steps:
                    break
                batch = ArrayData(self.train_data.x[idx], None if self.train_data.y is None else self.train_data.y[idx])
                loss = self.task.per_sample_loss(model, batch).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                done += 1
        return get_state(model, keys), n, {}

    def evaluate(self, parameters: list[np.ndarray], config: Mapping[str, Any]):
        model, _ = self._model(parameters)
        model.eval()
        with torch.no_grad():
            loss = float(self.task.per_sample_loss(model, self.val_data).mean())
        return loss, len(self.val_data), {}


def bare_client_app(flat: Mapping[str, Any]) -> ClientApp:
    base = dict(flat)

    def client_fn(context: Context):
        cfg = config_from(base, {})
        return BareClient(cached_task(cfg), int(context.node_config["partition-id"])).to_client()

    return ClientApp(client_fn=client_fn)


def bare_server_app(cfg: RunConfig, stamps: list[float], replies: list[tuple[str, int]] | None = None) -> ServerApp:
    """Stock FedAvg over every site; ``stamps`` gets the time each round's evaluation is
    aggregated, ``replies`` the number of fit and evaluate replies of each round."""
    replies = [] if replies is None else replies
    task = cached_task(cfg)
    torch.manual_seed(cfg.federation.seed)  # the same initial model as privfed's server
    model = task.build_model()
    keys = task.shared_keys(model)
    init = get_state(model, keys)
    test = task.server_test_data()
    assert test is not None, "the round benchmark's scenarios have a server test split"
    eval_model = task.build_model()

    def central(rnd: int, arrays: list[np.ndarray], config: Mapping[str, Any]) -> tuple[float, dict]:
        set_state(eval_model, keys, arrays)
        eval_model.eval()
        with torch.no_grad():
            return float(task.per_sample_loss(eval_model, test).mean()), {}

    def end_of_round(metrics: list) -> dict:
        stamps.append(time.perf_counter())
        replies.append(("evaluate", len(metrics)))
        return {}

    def fit_done(metrics: list) -> dict:
        replies.append(("fit", len(metrics)))
        return {}

    n = cfg.federation.num_sites

    def server_fn(context: Context) -> ServerAppComponents:
        strategy = FedAvg(
            fraction_fit=1.0,
            fraction_evaluate=1.0,
            min_fit_clients=n,
            min_evaluate_clients=n,
            min_available_clients=n,
            initial_parameters=ndarrays_to_parameters(init),
            evaluate_fn=central if test is not None else None,
            fit_metrics_aggregation_fn=fit_done,
            evaluate_metrics_aggregation_fn=end_of_round,
        )
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=cfg.federation.rounds))

    return ServerApp(server_fn=server_fn)


def backend_config(cfg: RunConfig) -> dict:
    """The launcher's Ray settings (simulations.launcher.simulate), for a like-for-like run."""
    return {
        "client_resources": {"num_cpus": cfg.federation.client_cpus, "num_gpus": cfg.federation.client_gpus},
        "init_args": {"num_cpus": os.cpu_count() or 1, "log_to_driver": False, "include_dashboard": False},
    }


def run_bare(scenario: str, overrides: Iterable[str], warmup: int = 1) -> RunTiming:
    from flwr.simulation import run_simulation

    cfg = resolve(scenario, list(overrides) + ["dp.enabled=false"])
    _quiet_flower(False)
    stamps: list[float] = []
    replies: list[tuple[str, int]] = []
    t0 = time.perf_counter()
    run_simulation(
        server_app=bare_server_app(cfg, stamps, replies),
        client_app=bare_client_app(cfg.to_flat()),
        num_supernodes=cfg.federation.num_sites,
        backend_config=backend_config(cfg),
    )
    wall = time.perf_counter() - t0
    if len(stamps) != cfg.federation.rounds:
        raise RuntimeError(f"bare Flower run: {len(stamps)} of {cfg.federation.rounds} rounds completed")
    n = cfg.federation.num_sites
    problems = [f"a {kind} step had {k} of {n} replies" for kind, k in replies if k != n]
    return RunTiming("bare", round_seconds(dict(enumerate(stamps, start=1)), warmup), wall, problems=problems)


# ------------------------------------------------------------------ the privfed run


def run_privfed(scenario: str, overrides: Iterable[str], secure: bool, warmup: int = 1) -> RunTiming:
    stamps = RoundStamps()
    console = Console(file=stamps, highlight=False, soft_wrap=True, width=240)
    extra = list(PRIVFED_FIXED) + (["secagg.enabled=true"] if secure else [])
    with tempfile.TemporaryDirectory(prefix="privfed-bench-") as tmp:
        run_dir = Path(tmp) / "run"
        t0 = time.perf_counter()
        simulate(scenario, list(overrides) + extra + [f"run-dir={run_dir}"], console=console)
        wall = time.perf_counter() - t0
        lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rounds = resolve(scenario, overrides).federation.rounds
    if len(stamps.stamps) != rounds:
        raise RuntimeError(
            f"privfed run: {len(stamps.stamps)} of {rounds} rounds completed:\n" + "\n".join(stamps.lines[-5:])
        )
    stages: dict[str, list[float]] = {}
    for line in lines[warmup:]:
        for k, v in line.get("secagg_seconds", {}).items():
            stages.setdefault(k, []).append(v)
    sites = resolve(scenario, overrides).federation.num_sites
    problems = [
        f"round {line['round']}: {len(line['sites_trained'])}/{sites} trained, aggregated={line['aggregated']}, "
        f"failures={line['failures'][:2]}, rejected={list(line['rejected'])[:3]}"
        for line in lines
        if not line["aggregated"]
        or line["failures"]
        or line["rejected"]
        or len(line["sites_trained"]) != sites
        or len(line["site_val"]) != sites
    ]
    return RunTiming(
        "privfed+secagg" if secure else "privfed",
        round_seconds(stamps.stamps, warmup),
        wall,
        loop_s=[line["seconds"] for line in lines[warmup:]],
        secagg_stages_s=stages,
        problems=problems,
    )


# ------------------------------------------------------------------ the section


def run_mode(mode: str, scenario: str, overrides: list[str], warmup: int = 1) -> RunTiming:
    if mode == "bare":
        return run_bare(scenario, overrides, warmup)
    return run_privfed(scenario, overrides, secure=mode == "privfed+secagg", warmup=warmup)


def round_section(
    scenario: str = "vae-digits",
    rounds: int = 12,
    repeats: int = 2,
    overrides: Iterable[str] = (),
    progress: Callable[[str], None] = print,
    runner: Callable[..., RunTiming] = run_mode,
    warmup: int = 3,
) -> dict[str, Any]:
    """Median seconds per round of each mode, and privfed ÷ bare with SecAgg+ off and on.

    ``ratio_secagg_off`` = full privfed round (DP, ledger, fairness metrics) ÷ bare Flower
    FedAvg round; ``ratio_secagg_on`` = the same privfed round with SecAgg+ ÷ the same
    bare round. Both bare and privfed runs use the scenario's model, data and sites.
    The first ``warmup`` rounds of every run are not timed.
    """
    if rounds <= warmup:
        raise ValueError(f"rounds={rounds} leaves nothing to time after {warmup} warm-up rounds")
    ov = [f"rounds={rounds}", *overrides]
    runs: dict[str, list[RunTiming]] = {m: [] for m in MODES}
    for rep in range(repeats):
        for mode in MODES if rep % 2 == 0 else MODES[::-1]:
            t = runner(mode, scenario, ov, warmup)
            runs[mode].append(t)
            progress(
                f"  {mode:<15} run {rep + 1}/{repeats}: {median(t.round_s):.3f} s/round "
                f"(median of {len(t.round_s)}; run {t.wall_s:.0f} s incl. Ray start)"
            )
            for p in t.problems[:3]:
                progress(f"  [yellow]warning, not a full round: {p}[/]")
    med = {m: median(s for t in runs[m] for s in t.round_s) for m in MODES}
    cfg = resolve(scenario, ov)
    stages: dict[str, list[float]] = {}
    for t in runs["privfed+secagg"]:
        for k, v in t.secagg_stages_s.items():
            stages.setdefault(k, []).extend(v)
    return {
        "scenario": scenario,
        "task": cfg.task,
        "sites": cfg.federation.num_sites,
        "rounds": rounds,
        "warmup": warmup,
        "repeats": repeats,
        "wall_s": {m: median(t.wall_s for t in runs[m]) for m in MODES},
        "rounds_timed": {m: sum(len(t.round_s) for t in runs[m]) for m in MODES},
        "round_s": med,
        "privfed_loop_round_s": {
            m: median(s for t in runs[m] for s in t.loop_s) for m in ("privfed", "privfed+secagg")
        },
        "ratio_secagg_off": med["privfed"] / med["bare"],
        "ratio_secagg_on": med["privfed+secagg"] / med["bare"],
        "secagg_stages_s": {k: median(v) for k, v in stages.items()},
        "all_round_s": {m: [t.round_s for t in runs[m]] for m in MODES},
        # Rounds that were not full rounds (a site missing, nothing aggregated); empty when all were.
        "problems": {m: [p for t in runs[m] for p in t.problems] for m in MODES},
        "goal": 1.3,
    }
