"""Benchmark: DP-SGD step time / non-private step time, per engine, measured side by side.

    make bench-dp         (or: .venv/bin/python -m simulations.bench_dp)

The suite (``make bench``, :mod:`simulations.bench`) runs :func:`dp_section`: the fast
engine only, one case per task model. This script adds more batch sizes and Opacus's
hooks engine (slow: about 300× on the recommender).

Every engine trains its own copy of the same model on the same batch; the engines
take turns within each repetition, and the table reports the median over
repetitions as a ratio to the non-private step measured in the same repetitions.
Ratios, not seconds, are what carry over between machines. Writes
bench-results/bench_dp.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from common.data.arrays import ArrayData
from common.privacy.accounting import RoundPlan
from common.privacy.engines import FastDPStep, NonPrivateStep, OpacusDPStep, StepEngine
from common.privacy.training import task_optimizer
from common.tasks import get_task
from simulations.launcher import resolve

ENGINES: dict[str, Callable[..., StepEngine]] = {
    "non-private": NonPrivateStep,
    "fast (privfed)": FastDPStep,
    "opacus hooks": OpacusDPStep,
}
# A throwaway federation key: the benchmark only times steps on synthetic or local data.
BENCH_KEY = bytes(32)
OPACUS_MEMORY_CAP = 2 * 2**30


def bench_task(
    scenario: str,
    batch_size: int,
    reps: int,
    steps: int,
    engines: Mapping[str, Callable[..., StepEngine]] | None = None,
) -> dict[str, dict[str, float]]:
    """The scenario's model and optimiser (e.g. the demo's VAE), at the given batch size.

    Only the task's private module trains (the GAN's discriminator, on real images),
    exactly as in a site's round; the loss is the task's per-example loss. Returns, per
    engine, the median ms per step and its ratio to the non-private step.
    """
    engines = ENGINES if engines is None else engines
    cfg = resolve(scenario, [f"train.batch-size={batch_size}"])
    task_name = cfg.task
    task = get_task(task_name)(cfg, BENCH_KEY)
    train = task.site_data(0)[0]
    idx = torch.arange(batch_size) % len(train)
    batch = ArrayData(train.x[idx], None if train.y is None else train.y[idx])
    n = max(len(train), batch_size)
    plan = RoundPlan(n, batch_size / n, steps, 1.0, 1.0, 1e-5, "rdp")
    runners = {}
    for name, cls in engines.items():
        torch.manual_seed(0)
        model = task.build_model(0).train()
        private = task.private_module(model)
        per_sample_bytes = 4 * batch_size * sum(p.numel() for p in private.parameters() if p.requires_grad)
        if cls is OpacusDPStep and per_sample_bytes > OPACUS_MEMORY_CAP:
            continue  # hooks materialise a (batch x parameters) gradient: tens of GB for big tables
        opt = task_optimizer(task, private, cfg.train.lr)
        engine = cls(private, opt) if cls is NonPrivateStep else cls(private, opt, plan)
        runners[name] = (model, engine)
    steppers = {name: _plain_step(task, model, engine, batch) for name, (model, engine) in runners.items()}
    try:
        return interleaved(steppers, reps, steps)
    finally:
        for _, engine in runners.values():
            engine.close()


def _plain_step(task: Any, model: torch.nn.Module, engine: StepEngine, batch: ArrayData) -> Callable[[], None]:
    def step() -> None:
        engine.step(task.per_sample_loss(model, batch))

    return step


def interleaved(steppers: Mapping[str, Callable[[], None]], reps: int, steps: int) -> dict[str, dict[str, float]]:
    """Each stepper's median time per step and its ratio to ``"non-private"``'s: they take turns
    within every repetition (``steps`` steps each), after two warm-up repetitions."""
    times: dict[str, list[float]] = {name: [] for name in steppers}
    for rep in range(reps + 2):
        for name, step in steppers.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            if rep >= 2:  # warm-up
                times[name].append((time.perf_counter() - t0) / steps)
    med = {name: statistics.median(v) for name, v in times.items()}
    base = med["non-private"]
    return {name: {"ms_per_step": 1e3 * t, "ratio": t / base} for name, t in med.items()}


def bench_user_level(scenario: str, users: int, reps: int, steps: int) -> dict[str, dict[str, float]]:
    """User-level DP step ÷ non-private step on the scenario's model (dp.unit = user).

    The batch is ``users`` persons with up to ``dp.max-records-per-user`` ratings each, as
    :class:`~common.privacy.training.PersonSampler` draws it; the DP step clips each person's
    summed gradient and steps the site-local user table on its exact gradient, as a round
    does; the non-private step is a plain step on the same ratings.
    """
    from common.privacy.training import PersonSampler

    cfg = resolve(scenario, ["dp.unit=user", f"train.batch-size={users}"])
    task = get_task(cfg.task)(cfg, BENCH_KEY)
    train = task.site_data(0)[0]
    assert train.person is not None
    sampler = PersonSampler(train.person, cfg.dp.max_records_per_user, torch.Generator().manual_seed(0))
    idx, groups = sampler.take(torch.arange(min(users, sampler.persons)))
    batch = ArrayData(train.x[idx], None if train.y is None else train.y[idx])
    n = max(sampler.persons, users)
    plan = RoundPlan(n, users / n, steps, 1.0, 1.0, 1e-5, "rdp")
    steppers: dict[str, Callable[[], None]] = {}
    engines: list[StepEngine] = []
    for name in ("non-private", "fast, user-level"):
        torch.manual_seed(0)
        model = task.build_model(0).train()
        if name == "non-private":
            plain = NonPrivateStep(model, task_optimizer(task, model, cfg.train.lr))
            steppers[name] = _plain_step(task, model, plain, batch)
            engines.append(plain)
            continue
        # As a round does (LocalSession.step): the engine for the shared layers, a plain
        # optimiser step for the person-local user table on the same backward.
        local = [p for m in task.person_local_modules(model) for p in m.parameters()]
        opt = task_optimizer(task, model, cfg.train.lr, but=map(id, local))
        local_opt = task_optimizer(task, model, cfg.train.lr, only=local)
        dp = FastDPStep(model, opt, plan, person_local=task.person_local_modules(model))
        engines.append(dp)

        def user_step(m: Any = model, e: StepEngine = dp, lo: torch.optim.Optimizer = local_opt) -> None:
            lo.zero_grad(set_to_none=True)
            e.step(task.per_sample_loss(m, batch), groups)
            lo.step()

        steppers[name] = user_step
    try:
        res = interleaved(steppers, reps, steps)
    finally:
        for engine in engines:
            engine.close()
    return {name: {**r, "ratings": len(batch)} for name, r in res.items()}


# User-level DP (dp.unit = user): the MF model at its user-level scenario's persons per step.
USER_CASES = (("recsys-synthetic", 64),)
# One case per task model, at the batch size its scenario trains with.
SUITE_CASES = (("vae-digits", 32), ("gan-digits", 64), ("recsys-synthetic", 512))
MODEL_NAMES = {
    "vae": "VAE (hidden 64, latent 8)",
    "gan": "GAN discriminator head (on 256 fixed random features)",
    "recsys": "biased MF (dim 4, 131,072-row item table)",
}


def dp_section(
    reps: int = 15,
    steps: int = 20,
    threads: int = 1,
    with_opacus: bool = False,
    cases: Iterable[tuple[str, int]] | None = None,
    progress: Callable[[str], None] = print,
    user_cases: Iterable[tuple[str, int]] | None = None,
) -> dict[str, Any]:
    """DP-SGD step ÷ non-private step per task model (the suite's section 1).

    ``ratio`` = median time of one fast-engine DP-SGD step (per-example clipping, noise,
    Opacus's optimiser wrapper) ÷ median time of one plain step of the same model,
    optimiser and batch, the two taking turns within every repetition. ``user_cases``
    (scenario, persons per step): the same for user-level DP (:func:`bench_user_level`).
    """
    from common.tasks.recsys.data import default_movielens_path

    if user_cases is None:  # the suite's user-level case, unless the caller picked its cases
        user_cases = USER_CASES if cases is None else ()
    if cases is None:
        cases = list(SUITE_CASES) + ([("recsys-movielens", 2048)] if default_movielens_path() is not None else [])
    engines = {k: v for k, v in ENGINES.items() if with_opacus or v is not OpacusDPStep}
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    results = []
    try:
        for scenario, bs in cases:
            res = bench_task(scenario, bs, reps, steps, engines)
            task = resolve(scenario).task
            fast = res["fast (privfed)"]
            results.append(
                {
                    "scenario": scenario,
                    "task": task,
                    "model": MODEL_NAMES.get(task, task),
                    "batch_size": bs,
                    "non_private_ms": res["non-private"]["ms_per_step"],
                    "dp_ms": fast["ms_per_step"],
                    "ratio": fast["ratio"],
                    "engines": res,
                }
            )
            progress(
                f"  {scenario:<17} batch {bs:>4}: DP step {fast['ratio']:.2f}× non-private "
                f"({fast['ms_per_step']:.2f} ms)"
            )
        for scenario, users in user_cases:
            res = bench_user_level(scenario, users, reps, steps)
            fast = res["fast, user-level"]
            results.append(
                {
                    "scenario": scenario,
                    "task": "recsys",
                    "model": MODEL_NAMES["recsys"] + ", user-level DP",
                    "batch_size": users,
                    "unit": "user",
                    "ratings": fast["ratings"],
                    "non_private_ms": res["non-private"]["ms_per_step"],
                    "dp_ms": fast["ms_per_step"],
                    "ratio": fast["ratio"],
                    "engines": res,
                }
            )
            progress(
                f"  {scenario:<17} {users} users ({int(fast['ratings'])} ratings), user-level: DP step "
                f"{fast['ratio']:.2f}× non-private ({fast['ms_per_step']:.2f} ms)"
            )
    finally:
        torch.set_num_threads(before)
    return {"reps": reps, "steps": steps, "threads": threads, "goal": 1.5, "results": results}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=1, help="torch threads (simulated sites run with 1)")
    p.add_argument("--out", type=Path, default=Path("bench-results/bench_dp.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from rich.console import Console
    from rich.table import Table

    cases = [("vae-digits", 32), ("vae-digits", 64), ("vae-digits", 256), ("gan-digits", 64), ("recsys-synthetic", 512)]
    from common.tasks.recsys.data import default_movielens_path

    if default_movielens_path() is not None:
        cases.append(("recsys-movielens", 2048))
    results: list[dict[str, Any]] = []
    for scenario, bs in cases:
        res = bench_task(scenario, bs, args.reps, args.steps)
        results.append({"scenario": scenario, "batch_size": bs, "engines": res})

    table = Table(
        title=f"DP-SGD step ÷ non-private step (median of {args.reps}×{args.steps} steps, {args.threads} thread)"
    )
    table.add_column("model")
    table.add_column("batch")
    for name in ENGINES:
        table.add_column(name, justify="right")
    for r in results:
        table.add_row(
            r["scenario"],
            str(r["batch_size"]),
            *[
                f"{r['engines'][n]['ratio']:.2f}× ({r['engines'][n]['ms_per_step']:.2f} ms)"
                if n in r["engines"]
                else "skipped (memory)"
                for n in ENGINES
            ],
        )
    Console().print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"machine": platform.platform(), "cpu_count": torch.get_num_threads(), "torch": torch.__version__}
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
