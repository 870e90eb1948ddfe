"""Benchmark: DP-SGD step time / non-private step time, per engine, measured side by side.

    make bench            (or: .venv/bin/python -m simulations.bench_dp)

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
from pathlib import Path

import torch

from common.accounting import RoundPlan
from simulations.launcher import resolve
from common.data import ArrayData
from common.dp import FastDPStep, NonPrivateStep, OpacusDPStep
from common.tasks import get_task
from common.training import make_optimizer

ENGINES = {"non-private": NonPrivateStep, "fast (privfed)": FastDPStep, "opacus hooks": OpacusDPStep}
# A throwaway federation key: the benchmark only times steps on synthetic or local data.
BENCH_KEY = bytes(32)
OPACUS_MEMORY_CAP = 2 * 2**30


def bench_task(scenario: str, batch_size: int, reps: int, steps: int) -> dict[str, float]:
    """The scenario's model and optimiser (e.g. the demo's VAE), at the given batch size."""
    cfg = resolve(scenario, [f"train.batch-size={batch_size}"])
    task_name = cfg.task
    task = get_task(task_name)(cfg, BENCH_KEY)
    train = task.site_data(0)[0]
    idx = torch.arange(batch_size) % len(train)
    batch = ArrayData(train.x[idx], None if train.y is None else train.y[idx])
    n = max(len(train), batch_size)
    plan = RoundPlan(n, batch_size / n, steps, 1.0, 1.0, 1e-5, "rdp")
    runners = {}
    for name, cls in ENGINES.items():
        torch.manual_seed(0)
        model = task.build_model(0).train()
        per_sample_bytes = 4 * batch_size * sum(p.numel() for p in model.parameters())
        if cls is OpacusDPStep and per_sample_bytes > OPACUS_MEMORY_CAP:
            continue  # hooks materialise a (batch x parameters) gradient: tens of GB for big tables
        opt = make_optimizer(model, cfg.train.optimizer, cfg.train.lr)
        engine = cls(model, opt) if cls is NonPrivateStep else cls(model, opt, plan)
        runners[name] = (model, engine)
    times: dict[str, list[float]] = {name: [] for name in runners}
    for rep in range(reps + 2):
        for name, (model, engine) in runners.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                engine.step(task.per_sample_loss(model, batch))
            if rep >= 2:  # warm-up
                times[name].append((time.perf_counter() - t0) / steps)
    for _, engine in runners.values():
        engine.close()
    med = {name: statistics.median(v) for name, v in times.items()}
    base = med["non-private"]
    return {name: {"ms_per_step": 1e3 * t, "ratio": t / base} for name, t in med.items()}


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

    cases = [("vae-digits", 32), ("vae-digits", 64), ("vae-digits", 256), ("recsys-synthetic", 512)]
    from common.tasks.recsys import default_movielens_path

    if default_movielens_path() is not None:
        cases.append(("recsys-movielens", 2048))
    results = []
    for scenario, bs in cases:
        res = bench_task(scenario, bs, args.reps, args.steps)
        results.append({"scenario": scenario, "batch_size": bs, "engines": res})

    table = Table(title=f"DP-SGD step ÷ non-private step (median of {args.reps}×{args.steps} steps, {args.threads} thread)")
    table.add_column("model")
    table.add_column("batch")
    for name in ENGINES:
        table.add_column(name, justify="right")
    for r in results:
        table.add_row(
            r["scenario"],
            str(r["batch_size"]),
            *[
                f"{r['engines'][n]['ratio']:.2f}× ({r['engines'][n]['ms_per_step']:.2f} ms)" if n in r["engines"] else "skipped (memory)"
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
