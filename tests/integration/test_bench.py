"""The benchmark suite's code paths on tiny settings: structure and sanity, never timings.

Section 1 runs for real (2 repetitions of 2 steps). Sections 2-4 start Ray for every
run, far too slow for a test, so their drivers run with stand-in runners; the parts
that touch privfed or Flower code without Ray (the bare Flower client, the scale
benchmark's data and config, the process-tree memory probe) run for real.
"""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from rich.console import Console

from simulations import bench
from simulations.bench_round import BareClient, RunTiming, round_section
from simulations.bench_scale import make_scale_data, scale_overrides, scale_section
from simulations.bench_util import RoundStamps, TreeMemoryPeak, round_seconds
from simulations.bench_utility import utility_section


def positive_finite(x: object) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def render(table) -> str:
    buf = io.StringIO()
    Console(file=buf, width=200).print(table)
    return buf.getvalue()


def test_dp_section_json(tmp_path):
    out = tmp_path / "bench.json"
    cases = ["vae-digits:32", "gan-digits:64", "recsys-synthetic:512", "recsys-synthetic:16:user"]
    report = bench.main(
        ["--sections", "dp", "--dp-reps", "2", "--dp-steps", "2", "--dp-cases", *cases, "--out", str(out)]
    )
    data = json.loads(out.read_text())
    assert data["meta"]["cores"] >= 1 and data["meta"]["torch"] == torch.__version__
    assert set(data) == {"meta", "dp"}
    assert [r["task"] for r in data["dp"]["results"]] == ["vae", "gan", "recsys", "recsys"]
    assert data["dp"]["results"][-1]["unit"] == "user"
    for r in data["dp"]["results"]:
        assert positive_finite(r["ratio"]) and positive_finite(r["dp_ms"]) and positive_finite(r["non_private_ms"])
    assert "DP-SGD" in render(bench.dp_table(report["dp"]))


def _timing(mode: str, scenario: str, overrides: list[str], warmup: int) -> RunTiming:
    base = {"bare": 0.4, "privfed": 0.5, "privfed+secagg": 0.9}[mode]
    stages = {"setup": [0.1], "share_keys": [0.2]} if mode == "privfed+secagg" else {}
    return RunTiming(mode, [base, base * 1.1], 20.0, loop_s=[base] if mode != "bare" else [], secagg_stages_s=stages)


def test_round_section_structure():
    res = round_section("vae-digits", rounds=4, repeats=2, warmup=2, progress=lambda _: None, runner=_timing)
    assert res["sites"] == 8 and res["warmup"] == 2
    assert positive_finite(res["ratio_secagg_off"]) and positive_finite(res["ratio_secagg_on"])
    assert res["ratio_secagg_on"] > res["ratio_secagg_off"]
    assert set(res["round_s"]) == {"bare", "privfed", "privfed+secagg"}
    json.dumps(res)
    assert "bare Flower" in render(bench.round_table(res))
    with pytest.raises(ValueError):
        round_section(rounds=2, warmup=2, runner=_timing)


def test_bare_client_trains_and_evaluates():
    """The bare Flower site: same task model and data; plain training changes the weights."""
    from common.runtime import cached_task
    from common.tasks.base import get_state
    from simulations.launcher import resolve

    task = cached_task(resolve("vae-digits", ["dp.enabled=false"]))
    torch.manual_seed(0)
    model = task.build_model()
    params = get_state(model, task.shared_keys(model))
    client = BareClient(task, 0)
    new, n, _ = client.fit(params, {})
    assert n == len(task.site_data(0)[0])
    assert [a.shape for a in new] == [a.shape for a in params]
    assert any(not np.array_equal(a, b) for a, b in zip(new, params))
    loss, n_val, _ = client.evaluate(new, {})
    assert positive_finite(loss) and n_val == len(task.site_data(0)[1])


def test_round_stamps_and_seconds():
    stamps = RoundStamps()
    console = Console(file=stamps, width=200)
    for r in (1, 2, 3):
        console.print(f"[bold]round {r:>3}/3[/] │ 8/8 sites trained")
    assert sorted(stamps.stamps) == [1, 2, 3]
    assert round_seconds({1: 0.0, 2: 1.0, 3: 3.0}) == [1.0, 2.0]
    assert round_seconds({1: 0.0, 2: 1.0, 3: 3.0}, warmup=2) == [2.0]


def test_scale_data_and_config(tmp_path):
    """1,000 sites of 32 images each: the config validates and samples exactly K sites."""
    from common.data.arrays import cached_federated_split
    from simulations.launcher import resolve

    n_images = make_scale_data(tmp_path / "d.npz", 1000)
    cfg = resolve("vae-digits", scale_overrides(1000, 10, 3, tmp_path / "d.npz", n_images))
    assert cfg.federation.sampled_per_round == 10 and math.isinf(cfg.dp.epsilon_budget)
    split = cached_federated_split(cfg.data, cfg.federation.num_sites, cfg.federation.seed)
    assert len(split.sites) == 1000 and len(split.test) == 400
    assert min(split.site_sizes()) >= cfg.data.min_site_size


def test_scale_section_structure(tmp_path):
    def fake(sites, sampled, rounds, variant, data, images, log):
        evaluated = sites if variant == "as-is" else min(sites, sampled)
        return {
            "round_s": [0.5 + evaluated / 1000] * (rounds - 1),
            "loop_s": [0.5] * (rounds - 1),
            "evaluated": [evaluated] * rounds,
            "first_round_s": 10.0,
            "setup_s": 5.0,
            "teardown_s": 3.0,
            "wall_s": 30.0,
            "sites": sites,
            "variant": variant,
            "process_wall_s": 31.0,
            "peak_rss_bytes": 2 * 2**30,
            "peak_pss_bytes": 2**30,
            "peak_processes": 12,
            "leftover_processes": [],
        }

    res = scale_section(
        (10, 100), sampled=10, rounds=3, asis_rounds=2, progress=lambda _: None, runner=fake, log=tmp_path / "scale.log"
    )
    points = {(p["variant"], p["sites"]): p for p in res["points"]}
    assert set(points) == {("eval-sampled", 10), ("eval-sampled", 100), ("as-is", 10), ("as-is", 100)}
    for p in res["points"]:
        assert positive_finite(p["ratio_vs_smallest"]) and positive_finite(p["peak_rss_gb"])
    assert points[("as-is", 100)]["ratio_vs_smallest"] > points[("eval-sampled", 100)]["ratio_vs_smallest"]
    json.dumps(res)
    assert "peak RSS" in render(bench.scale_table(res))


def test_tree_memory_sees_children():
    child = (
        "import subprocess, sys, time; "
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(1.5)']); time.sleep(1.0); p.wait()"
    )
    proc = subprocess.Popen([sys.executable, "-c", child])
    with TreeMemoryPeak(root=proc.pid, interval=0.1) as mem:
        proc.wait()
    assert mem.peak_processes >= 2 and mem.peak_rss > 0 and mem.peak_pss > 0
    assert mem.leftovers() == []


def test_utility_section_structure():
    def fake(task, eps, key_file, extra):
        value = 30.0 if math.isinf(eps) else 30.0 + 10 / eps
        return {
            "scenario": task.scenario,
            "epsilon_target": None if math.isinf(eps) else eps,
            "overrides": [],
            "rounds": 3,
            "value": value,
            "eps_max_recorded": eps,
            "wall_s": 1.0,
            "error": "",
        }

    res = utility_section(("vae",), (1.0, math.inf), progress=lambda _: None, runner=fake)
    cells = res["tasks"]["vae"]["cells"]
    assert [c["relative_to_nodp"] for c in cells] == pytest.approx([40 / 30, 1.0])
    assert "ε = ∞" in render(bench.utility_table(res))
    json.dumps(bench._json_safe(res))
