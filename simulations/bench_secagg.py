"""Benchmark: a federated round with SecAgg+ on, against the same round with it off.

    make bench-secagg      (or: .venv/bin/python -m simulations.bench_secagg)

Same scenario, model, data, sites and seeds; only ``secagg.enabled`` differs. The two
runs go one after the other in this process (plain first, then secure, then repeated
in the opposite order), and the table reports the median round time of each over the
rounds after the first (which carries Ray's and PyTorch's warm-up), and their ratio.
For the secure runs it also reports where the round's time goes, per SecAgg+ stage.
Writes bench-results/bench_secagg.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from common.tasks import get_task
from simulations.launcher import resolve, simulate

# hidden-dim 700 gives the VAE 1.09 M parameters.
MODEL = [
    "vae.hidden-dim=700",
    "vae.latent-dim=8",
    "dp.enabled=false",
    "audit.mia=false",
    "sample-every=0",
    "central-eval=false",
]


def _rounds(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def bench(sites: int, rounds: int, repeats: int, quiet: Console) -> dict:
    base = MODEL + [f"num-sites={sites}", f"rounds={rounds}", "weighting=uniform"]
    times: dict[str, list[float]] = {"plain": [], "secure": []}
    stages: dict[str, list[float]] = {}
    order = ["plain", "secure"]
    for rep in range(repeats):
        for mode in order if rep % 2 == 0 else order[::-1]:
            with tempfile.TemporaryDirectory() as tmp:
                run_dir = Path(tmp) / "run"
                extra = ["secagg.enabled=true"] if mode == "secure" else []
                simulate("vae-digits", base + extra + [f"run-dir={run_dir}"], console=quiet)
                for line in _rounds(run_dir)[1:]:
                    times[mode].append(line["seconds"])
                    for k, v in line.get("secagg_seconds", {}).items():
                        stages.setdefault(k, []).append(v)
    plain, secure = statistics.median(times["plain"]), statistics.median(times["secure"])
    cfg = resolve("vae-digits", base)
    params = sum(p.numel() for p in get_task("vae")(cfg).build_model().parameters())
    return {
        "sites": sites,
        "parameters": params,
        "rounds_timed": len(times["plain"]),
        "plain_round_s": plain,
        "secure_round_s": secure,
        "ratio": secure / plain,
        "secure_stages_s": {k: statistics.median(v) for k, v in stages.items()},
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sites", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="bench-results/bench_secagg.json")
    args = ap.parse_args(argv)
    logging.getLogger("flwr").setLevel(logging.ERROR)
    console = Console(highlight=False)
    quiet = Console(quiet=True)
    results = []
    for n in args.sites:
        console.print(f"[dim]{n} sites: plain and secure runs, {args.repeats} each, {args.rounds} rounds...[/]")
        results.append(bench(n, args.rounds, args.repeats, quiet))
    table = Table(title="Round time, SecAgg+ on ÷ off (same model, data, sites, seeds; median over rounds 2+)")
    for col in ("sites", "params", "plain s/round", "SecAgg+ s/round", "ratio", "SecAgg+ stages (s)"):
        table.add_column(col)
    for r in results:
        stages = ", ".join(f"{k} {v:.2f}" for k, v in r["secure_stages_s"].items())
        table.add_row(
            str(r["sites"]),
            f"{r['parameters'] / 1e6:.2f} M",
            f"{r['plain_round_s']:.2f}",
            f"{r['secure_round_s']:.2f}",
            f"{r['ratio']:.2f}×",
            stages,
        )
    console.print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"machine": platform.platform(), "processor": platform.processor(), "results": results}, indent=2)
    )
    console.print(f"written: {out}")


if __name__ == "__main__":
    main()
