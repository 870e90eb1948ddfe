"""privfed's benchmark suite: one table of ratios per section, each measured side by side.

    make bench             sections 1-3 (about 11 minutes on 2 cores) -> bench-results/bench.json
    make bench-utility     section 4 (20-35 minutes, with load)        -> bench-results/bench_utility.json
    .venv/bin/python -m simulations.bench --sections dp,round     a subset

1. **DP-SGD step ÷ non-private step** per task model (VAE, GAN discriminator, MF), fast
   engine (:mod:`simulations.bench_dp`). Goal ≤ 1.5×.
2. **Full privfed round ÷ bare Flower FedAvg round**, SecAgg+ off and on
   (:mod:`simulations.bench_round`). Goal ≤ 1.3×.
3. **Scale**: seconds per round and peak memory of the whole process tree at 10, 100 and
   1,000 simulated sites with 10 sampled per round (:mod:`simulations.bench_scale`).
   Goals: 1,000 sites under 4 GB; cost per round independent of the number of sites.
4. **Utility against privacy** at ε ∈ {1, 3, 8, ∞} per task (:mod:`simulations.bench_utility`),
   behind ``--utility``: full federated runs, slow.

The machine is shared and its absolute timings drift, so every timing number is a ratio
to a baseline measured in the same run, interleaved with it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from simulations.bench_util import machine_info

SECTIONS = ("dp", "round", "scale", "trust")
DEFAULT_OUT = Path("bench-results/bench.json")
DEFAULT_UTILITY_OUT = Path("bench-results/bench_utility.json")


def _goal(ok: bool) -> str:
    return "[green]met[/]" if ok else "[red]not met[/]"


# ------------------------------------------------------------------ tables


def dp_table(res: dict[str, Any]) -> Table:
    t = Table(
        title=f"1. DP-SGD step ÷ non-private step (fast engine; median of {res['reps']}×{res['steps']} steps, "
        f"{res['threads']} torch thread, interleaved)"
    )
    for col in ("model", "scenario", "batch", "non-private", "DP-SGD", "ratio", f"goal ≤ {res['goal']}×"):
        t.add_column(col, justify="right" if col not in ("model", "scenario") else "left")
    for r in res["results"]:
        t.add_row(
            r["model"],
            r["scenario"],
            f"{r['batch_size']} users" if r.get("unit") == "user" else str(r["batch_size"]),
            f"{r['non_private_ms']:.2f} ms",
            f"{r['dp_ms']:.2f} ms",
            f"[bold]{r['ratio']:.2f}×[/]",
            _goal(r["ratio"] <= res["goal"]),
        )
    return t


def round_table(res: dict[str, Any]) -> Table:
    t = Table(
        title=f"2. Full privfed round ÷ bare Flower FedAvg round ({res['scenario']}, {res['sites']} sites; "
        f"median s/round over rounds {res['warmup'] + 1}-{res['rounds']} of {res['repeats']} runs each, alternating)"
    )
    for col in ("run", "s/round", "÷ bare", f"goal ≤ {res['goal']}×", "whole run (s)"):
        t.add_column(col, justify="left" if col == "run" else "right")
    rs, wall = res["round_s"], res["wall_s"]
    t.add_row("bare Flower FedAvg (no DP)", f"{rs['bare']:.3f}", "1.00×", "", f"{wall['bare']:.0f}")
    t.add_row(
        "privfed: DP + ledger + fairness metrics, SecAgg+ off",
        f"{rs['privfed']:.3f}",
        f"[bold]{res['ratio_secagg_off']:.2f}×[/]",
        _goal(res["ratio_secagg_off"] <= res["goal"]),
        f"{wall['privfed']:.0f}",
    )
    t.add_row(
        "privfed: the same, SecAgg+ on",
        f"{rs['privfed+secagg']:.3f}",
        f"[bold]{res['ratio_secagg_on']:.2f}×[/]",
        _goal(res["ratio_secagg_on"] <= res["goal"]),
        f"{wall['privfed+secagg']:.0f}",
    )
    if res.get("secagg_stages_s"):
        t.caption = "SecAgg+ stages (median s): " + ", ".join(f"{k} {v:.2f}" for k, v in res["secagg_stages_s"].items())
    return t


def scale_table(res: dict[str, Any]) -> Table:
    t = Table(
        title=f"3. Scale: {res['sampled_per_round']} sites sampled per round, VAE, {res['per_site_images']} images "
        f"per site (median s/round after round 1; peak memory of the whole process tree)"
    )
    cols = (
        "federated evaluation",
        "sites",
        "evaluated/round",
        "s/round",
        "÷ fewest sites",
        "round 1 (s)",
        "before round 1 (s)",
        "peak RSS sum",
        "peak PSS sum",
        "processes",
        "< 4 GB",
    )
    for col in cols:
        t.add_column(col, justify="left" if col == "federated evaluation" else "right")
    for p in res["points"]:
        t.add_row(
            "every site (as-is)" if p["variant"] == "as-is" else "sampled like fit",
            f"{p['sites']:,}",
            f"{p['evaluated_per_round']:g}",
            f"{p['round_s']:.2f}",
            f"[bold]{p['ratio_vs_smallest']:.2f}×[/]",
            f"{p['first_round_s']:.1f}",
            f"{p['setup_s']:.1f}",
            f"{p['peak_rss_gb']:.2f} GB",
            f"{p['peak_pss_gb']:.2f} GB",
            str(p["peak_processes"]),
            _goal(p["peak_rss_gb"] < res["goal_rss_gb"]),
        )
    return t


def utility_table(res: dict[str, Any]) -> Table:
    eps = res["epsilons"]
    t = Table(title="4. Final utility against ε per site (δ as each scenario sets; ∞ = the -nodp baseline)")
    t.add_column("task and metric")
    for e in eps:
        t.add_column("ε = ∞" if e == "inf" else f"ε = {e:g}", justify="right")
    for name, task in res["tasks"].items():
        if "skipped" in task:
            t.add_row(name, *(["skipped"] + [""] * (len(eps) - 1)))
            continue
        cells = []
        for c in task["cells"]:
            if c["value"] is None:
                cells.append("[red]failed[/]")
                continue
            rel = (
                f" ({c['relative_to_nodp']:.2f}×)" if c["relative_to_nodp"] is not None and c["epsilon_target"] else ""
            )
            # A failed run (e.g. GAN mode collapse) keeps its last good round's value.
            failed = f" [red]failed in round {c['rounds'] + 1}[/]" if c["error"] else ""
            cells.append(f"{c['value']:.3f}{rel}{failed}")
        t.add_row(f"{task['label']} [{task['scenario']}]", *cells)
    return t


# ------------------------------------------------------------------ driver


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset of dp,round,scale,trust")
    p.add_argument("--utility", action="store_true", help="run section 4 (utility vs ε) only; slow")
    p.add_argument(
        "--out", type=Path, default=None, help=f"JSON output (default {DEFAULT_OUT}, or {DEFAULT_UTILITY_OUT})"
    )
    g = p.add_argument_group("1. DP-SGD step")
    g.add_argument("--dp-reps", type=int, default=15)
    g.add_argument("--dp-steps", type=int, default=20)
    g.add_argument("--dp-opacus", action="store_true", help="also time Opacus's hooks engine (very slow on MF)")
    g.add_argument(
        "--dp-cases",
        nargs="+",
        default=None,
        metavar="SCENARIO:BATCH[:user]",
        help="default: each task's scenario at its own batch size (+ recsys-movielens:2048 when present), and "
        "recsys-synthetic:64:user (user-level DP: 64 persons per step)",
    )
    g = p.add_argument_group("2. privfed round vs bare Flower round")
    g.add_argument("--round-scenario", default="vae-digits")
    g.add_argument("--round-rounds", type=int, default=12)
    g.add_argument("--round-warmup", type=int, default=3, help="rounds not timed at the start of each run")
    g.add_argument("--round-repeats", type=int, default=2)
    g = p.add_argument_group("3. scale")
    g.add_argument("--scale-sites", type=int, nargs="+", default=[10, 100, 1000])
    g.add_argument("--scale-sampled", type=int, default=10)
    g.add_argument("--scale-rounds", type=int, default=10, help="rounds per run with evaluation sampled like fit")
    g.add_argument("--scale-asis-rounds", type=int, default=3, help="rounds per run as-is (every site evaluates: slow)")
    g.add_argument("--scale-repeats", type=int, default=1)
    g = p.add_argument_group("4. utility (--utility)")
    g.add_argument("--tasks", nargs="+", default=["vae", "gan", "recsys", "tabular"])
    g.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0, math.inf])
    g.add_argument("--key-file", default=None, help="federation key for the recommender (privfed keys new PATH)")
    args = p.parse_args(argv)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in args.sections if s not in SECTIONS]
    if bad:
        p.error(f"unknown section(s) {', '.join(bad)}; choose from {', '.join(SECTIONS)}")
    if args.out is None:
        args.out = DEFAULT_UTILITY_OUT if args.utility else DEFAULT_OUT
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _args(argv)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=170)  # a log file: keep the tables unwrapped

    def progress(msg: str) -> None:
        console.print(f"[dim]{datetime.now():%H:%M:%S}[/] {msg}")

    t_start = time.perf_counter()
    report: dict[str, Any] = {
        "meta": {
            **machine_info(),
            "command": " ".join(
                [Path(sys.executable).name, "-m", "simulations.bench", *(argv if argv is not None else sys.argv[1:])]
            ),
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
        }
    }
    tables = []
    if args.utility:
        from simulations.bench_utility import utility_section

        progress("[bold]4. utility against ε[/]: one full federated run per cell")
        report["utility"] = utility_section(args.tasks, args.epsilons, args.key_file, progress=progress)
        tables.append(utility_table(report["utility"]))
    else:
        if "dp" in args.sections:
            from simulations.bench_dp import dp_section

            progress("[bold]1. DP-SGD step ÷ non-private step[/]")
            cases = user_cases = None
            if args.dp_cases is not None:  # scenario:batch, or scenario:persons:user for user-level DP
                parsed = [c.split(":") for c in args.dp_cases]
                cases = [(p[0], int(p[1])) for p in parsed if p[2:] != ["user"]]
                user_cases = [(p[0], int(p[1])) for p in parsed if p[2:] == ["user"]]
            report["dp"] = dp_section(
                args.dp_reps,
                args.dp_steps,
                with_opacus=args.dp_opacus,
                cases=cases,
                progress=progress,
                user_cases=user_cases,
            )
            console.print(dp_table(report["dp"]))
            tables.append(dp_table(report["dp"]))
        if "round" in args.sections:
            from simulations.bench_round import round_section

            progress(
                f"[bold]2. privfed round ÷ bare Flower round[/] ({args.round_repeats} runs of each, "
                f"{args.round_rounds} rounds, alternating; each run starts Ray)"
            )
            report["round"] = round_section(
                args.round_scenario, args.round_rounds, args.round_repeats, warmup=args.round_warmup, progress=progress
            )
            console.print(round_table(report["round"]))
            tables.append(round_table(report["round"]))
        if "scale" in args.sections:
            from simulations.bench_scale import scale_section

            progress(
                f"[bold]3. scale[/]: {', '.join(map(str, args.scale_sites))} sites, "
                f"{args.scale_sampled} sampled per round; "
                "each run in a subprocess (log: bench-results/bench_scale.log)"
            )
            report["scale"] = scale_section(
                args.scale_sites,
                args.scale_sampled,
                args.scale_rounds,
                args.scale_repeats,
                asis_rounds=args.scale_asis_rounds,
                progress=progress,
            )
            console.print(scale_table(report["scale"]))
            tables.append(scale_table(report["scale"]))
        if "trust" in args.sections:
            from simulations.bench_hostile import FLOOD
            from simulations.bench_hostile import measure as hostile_measure
            from simulations.bench_signing import measure as signing_measure

            progress("[bold]5. trust[/]: signing and verifying (10 sites x 20 rounds), one hostile reply")
            honest, hostile = hostile_measure()
            report["trust"] = {
                "signing": signing_measure(),
                "hostile": {"honest_ms": honest, "hostile_ms": hostile, "history_entries": FLOOD, "goal_extra_ms": 50},
            }
            console.print(trust_table(report["trust"]))
            tables.append(trust_table(report["trust"]))
    report["meta"]["seconds"] = round(time.perf_counter() - t_start, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(_json_safe(report), indent=2))
    if len(tables) > 1 or args.utility:
        console.rule("summary")
        for t in tables:
            console.print(t)
    m = report["meta"]
    console.print(
        f"machine: {m['cores']} cores, {m['cpu']}, torch {m['torch']}, flwr {m['flwr']}; "
        f"took {m['seconds']:.0f} s; written: {args.out}"
    )
    return report


def trust_table(res: dict[str, Any]) -> Table:
    """Section 5: what the signed ledger costs, and what one hostile reply costs the server."""
    sig, h = res["signing"], res["hostile"]
    t = Table(title=f"5. Trust: signed replies and ledger ({sig['sites']} sites x {sig['rounds']} rounds, median ms)")
    for col in ("where", "what", "ms"):
        t.add_column(col, justify="right" if col == "ms" else "left")
    for where, part in (("site, per round", sig["site_ms"]), ("server, per round", sig["server_ms_per_round"])):
        for what, ms in part.items():
            t.add_row(where, what.replace("_", " "), f"{ms:.2f}")
    for what, ms in sig["audit_ms"].items():
        t.add_row("auditor, whole ledger", what.replace("_", " "), f"{ms:.1f}")
    extra = h["hostile_ms"] - h["honest_ms"]
    t.add_row("server", "aggregate_fit, 3 honest sites", f"{h['honest_ms']:.1f}")
    t.add_row(
        "server",
        f"+ one hostile {h['history_entries']:,}-entry history (goal ≤ +{h['goal_extra_ms']} ms: {_goal(extra <= 50)})",
        f"{h['hostile_ms']:.1f}",
    )
    return t


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else "inf"
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


if __name__ == "__main__":
    main()
