"""Benchmark: final utility against privacy, ε ∈ {1, 3, 8, ∞}, for every task.

    make bench-utility     (or: .venv/bin/python -m simulations.bench --utility)

Each cell is one full federated run of the task's scenario (its sites, rounds and
model), with ``dp.target-epsilon = ε``: the noise multiplier is chosen so that every
site spends exactly ε over the planned rounds (δ as the scenario sets it). ε = ∞ is the
scenario's ``-nodp`` baseline. Utility is read from the final round's test metrics:

* VAE (``vae-digits``): test negative ELBO in nats on the server's split (lower is better);
* GAN (``gan-digits``): TSTR accuracy, a classifier trained on generated images and
  tested on real ones (higher is better);
* tabular generator (``tabular-adult``, only when UCI Adult is present): TSTR accuracy
  of a logistic regression trained on synthetic rows, tested on real held-out rows;
* recommender (``recsys-movielens``, only when MovieLens 100K is present): held-out
  RMSE (lower is better). Its sites pseudonymise ids with a federation key: pass
  ``--key-file`` (``privfed keys new PATH``), or a throwaway key is written for this
  benchmark; a different key changes the held-out split, so the last digit can move.

Runs are seeded, so each number repeats on the same machine and key. This takes long
(20 to 35 minutes on two cores: the tabular runs take 3-4 minutes each), so it is not part of ``make bench``.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console


@dataclass(frozen=True)
class UtilityTask:
    scenario: str
    baseline: str  # the scenario's non-private twin (ε = ∞)
    metric: str
    label: str
    higher_is_better: bool


TASKS: dict[str, UtilityTask] = {
    "vae": UtilityTask("vae-digits", "vae-digits-nodp", "neg_elbo", "VAE test neg. ELBO (nats, lower better)", False),
    "gan": UtilityTask("gan-digits", "gan-digits-nodp", "tstr", "GAN TSTR accuracy (higher better)", True),
    "recsys": UtilityTask(
        "recsys-movielens", "recsys-movielens-nodp", "rmse", "MF held-out RMSE, MovieLens 100K (lower better)", False
    ),
    "tabular": UtilityTask(
        "tabular-adult", "tabular-adult-nodp", "tstr.lr.accuracy", "Tabular TSTR accuracy, Adult (higher better)", True
    ),
}
EPSILONS = (1.0, 3.0, 8.0, math.inf)
# Per-round work only; the end-of-run MIA and intermediate sample grids are not utility.
FIXED = ("audit.mia=false", "sample-every=0")


def run_cell(task: UtilityTask, eps: float, key_file: str | None, extra: Iterable[str] = ()) -> dict[str, Any]:
    """One full run; its final utility, the ε the ledger recorded and its wall time."""
    from simulations.launcher import simulate

    scenario = task.baseline if math.isinf(eps) else task.scenario
    overrides = list(FIXED) + ([] if math.isinf(eps) else [f"dp.target-epsilon={eps:g}"]) + list(extra)
    quiet = Console(quiet=True)
    with tempfile.TemporaryDirectory(prefix="privfed-utility-") as tmp:
        run_dir = Path(tmp) / "run"
        t0 = time.perf_counter()
        error = ""
        try:
            simulate(scenario, overrides + [f"run-dir={run_dir}"], console=quiet, key_file=key_file)
        except Exception as exc:  # a run that fails (e.g. GAN mode collapse) is a result too
            error = f"{type(exc).__name__}: {exc}"[:300]
        wall = time.perf_counter() - t0
        path = run_dir / "metrics.jsonl"
        lines = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
    last = lines[-1] if lines else {}
    value = last.get("test", {}).get(task.metric)
    return {
        "scenario": scenario,
        "epsilon_target": None if math.isinf(eps) else eps,
        "overrides": overrides,
        "rounds": len(lines),
        "value": float(value) if isinstance(value, (int, float)) else None,
        "eps_max_recorded": last.get("eps_max"),
        "wall_s": wall,
        "error": error,
    }


def utility_section(
    tasks: Iterable[str] = ("vae", "gan", "recsys", "tabular"),
    epsilons: Iterable[float] = EPSILONS,
    key_file: str | None = None,
    extra: Iterable[str] = (),
    progress: Callable[[str], None] = print,
    runner: Callable[..., dict[str, Any]] = run_cell,
) -> dict[str, Any]:
    """Final utility per (task, ε); ``relative_to_nodp`` = value ÷ the ε = ∞ value."""
    from common.data.tabular import default_adult_path
    from common.tasks.recsys.data import default_movielens_path

    missing = {
        "recsys": (default_movielens_path, "MovieLens 100K not found (../shared/data/ml-100k)"),
        "tabular": (default_adult_path, "UCI Adult not found (../shared/data/adult)"),
    }

    out: dict[str, Any] = {"epsilons": ["inf" if math.isinf(e) else e for e in epsilons], "tasks": {}}
    with tempfile.TemporaryDirectory(prefix="privfed-utility-key-") as tmp:
        for name in tasks:
            task = TASKS[name]
            if name in missing and missing[name][0]() is None:
                out["tasks"][name] = {"skipped": missing[name][1]}
                progress(f"  {name}: skipped ({missing[name][1]})")
                continue
            kf = key_file
            if name == "recsys" and kf is None:
                from common.deploy.keys import write_key

                kf = str(write_key(Path(tmp) / "bench.key"))  # one throwaway key for all of this task's runs
            cells = []
            for eps in epsilons:
                cell = runner(task, eps, kf, extra)
                cells.append(cell)
                shown = "failed" if cell["value"] is None else f"{task.metric} {cell['value']:.4f}"
                progress(
                    f"  {name:<7} ε={'∞' if math.isinf(eps) else f'{eps:g}':<3} {shown} "
                    f"(ledger max ε {cell['eps_max_recorded']}, {cell['rounds']} rounds, {cell['wall_s']:.0f} s)"
                    + (f" [red]{cell['error']}[/]" if cell["error"] else "")
                )
            base = next((c["value"] for c in cells if c["epsilon_target"] is None), None)
            for c in cells:
                c["relative_to_nodp"] = c["value"] / base if c["value"] is not None and base else None
            out["tasks"][name] = {
                "scenario": task.scenario,
                "metric": task.metric,
                "label": task.label,
                "higher_is_better": task.higher_is_better,
                "cells": cells,
            }
    return out
