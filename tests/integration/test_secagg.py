"""Secure aggregation (Flower SecAgg+) end to end: same model as plain FedAvg, dropouts, failures."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from common.config import RunConfig
from common.deploy.keys import write_key
from common.errors import ConfigError
from common.faults import drops
from common.privacy.secagg_params import shares_and_threshold
from server.ledger import Ledger
from simulations.launcher import simulate

pytestmark = pytest.mark.slow

VAE = ["vae.hidden-dim=16", "vae.latent-dim=2", "dp.target-epsilon=0.0", "dp.noise-multiplier=1.0", "audit.mia=false"]
TASKS = {
    "vae": ("vae-digits", VAE),
    "gan": (
        "gan-digits",
        [
            "gan.features=256",
            "gan.hidden-dim=32",
            "gan.eval-samples=200",
            "dp.target-epsilon=0.0",
            "dp.noise-multiplier=1.0",
            # The equality check reads the checkpoints only: no evaluation classifier, FID or TSTR.
            "central-eval=false",
        ],
    ),
    "recsys": (
        "recsys-synthetic",
        [
            "recsys.synthetic-users=200",
            "recsys.synthetic-items=80",
            "recsys.num-buckets=512",
            "train.batch-size=128",
            # A fixed noise multiplier (as the VAE and GAN here): no noise search in the preflight.
            "dp.target-epsilon=0.0",
            "dp.noise-multiplier=1.0",
        ],
    ),
}
# SecAgg+ quantizes each coordinate with stochastic rounding onto a grid of step
# 2 * clipping-range / quantization-range, so each site's value is off by less than one
# step, and so is their mean. The secure model may differ from plain FedAvg by that much.
STEP = RunConfig.from_flat({}).secagg.step
# The fewest sites a SecAgg+ run accepts (num-sites=2 is refused, see below);
# the equality of the secure and plain sums does not depend on how many are summed.
EQUALITY_SITES = 3


def _run(tmp_path, name: str, scenario: str, overrides: list[str], key_file=None) -> tuple[dict, list[dict]]:
    run_dir = tmp_path / name
    # The sites run in this process (backend=in-process): what is checked here is what
    # SecAgg+ computes, and Ray's start-up was most of each run's time.
    simulate(scenario, overrides + [f"run-dir={run_dir}", "sample-every=0", "backend=in-process"], key_file=key_file)
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)["state"]
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return state, lines


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(
        float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point() and a[k].numel()
    )


@pytest.mark.parametrize("task", ["gan", "recsys"])
def test_secure_aggregate_equals_plain_fedavg(tmp_path, task):
    """One round, same seeds, same updates: SecAgg+ gives the plain (uniform) FedAvg model."""
    scenario, extra = TASKS[task]
    key = str(write_key(tmp_path / "fed.key")) if task == "recsys" else None
    common = extra + [f"num-sites={EQUALITY_SITES}", "rounds=1", "weighting=uniform", "audit.mia=false"]
    secure, lines = _run(tmp_path, "secure", scenario, common + ["secagg.enabled=true"], key)
    plain, _ = _run(tmp_path, "plain", scenario, common, key)
    assert lines[0]["aggregated"] and len(lines[0]["sites_used"]) == EQUALITY_SITES
    assert _max_diff(secure, plain) < STEP


FIVE = VAE + ["num-sites=5", "rounds=1", "weighting=uniform"]
WITHOUT_0_AND_3 = ['faults.dropout-sites="0,3"', "faults.dropout-stage=upload"]


@pytest.fixture(scope="module")
def plain_without_0_and_3(tmp_path_factory) -> dict:
    """The plain FedAvg model of sites 1, 2 and 4 (0 and 3 drop before uploading), shared to
    save a run: the upload dropouts and the setup dropouts are both checked against it."""
    state, lines = _run(tmp_path_factory.mktemp("plain3"), "plain3", "vae-digits", FIVE + WITHOUT_0_AND_3)
    assert lines[0]["sites_used"] == ["site-1", "site-2", "site-4"]
    return state


def test_dropouts_within_tolerance_recover_the_survivors_sum(tmp_path, plain_without_0_and_3):
    """VAE, 5 sites, threshold 3: two sites may vanish after masking, or before uploading."""
    base = FIVE
    plain, _ = _run(tmp_path, "plain", "vae-digits", base)
    after_mask, lines = _run(
        tmp_path,
        "unmask",
        "vae-digits",
        base + ["secagg.enabled=true", "faults.dropout-stage=unmask", 'faults.dropout-sites="0,3"'],
    )
    # Their masked updates are already in the sum; their masks are rebuilt from shares.
    assert lines[0]["aggregated"] and len(lines[0]["sites_used"]) == 5
    assert _max_diff(after_mask, plain) < STEP

    plain3 = plain_without_0_and_3
    secure3, lines = _run(tmp_path, "secure3", "vae-digits", base + WITHOUT_0_AND_3 + ["secagg.enabled=true"])
    assert lines[0]["sites_used"] == ["site-1", "site-2", "site-4"]
    assert _max_diff(secure3, plain3) < STEP
    # The tolerance is tight enough to tell these two aggregates apart.
    assert _max_diff(plain3, plain) > 100 * STEP


def test_a_site_offline_at_setup_leaves_a_round_of_the_others(tmp_path, plain_without_0_and_3):
    """Flower 1.41 alone fails the whole round here (it asks survivors for shares of a site
    that never shared its keys); server/secagg.py forgets such sites before anyone trains.

    Two sites (0 and 3) are offline, the most threshold 3 of 5 tolerates, so the plain run of
    the other three is the one the upload-dropout test uses (a plain site that drops before
    uploading or before training contributes nothing either way)."""
    secure, lines = _run(
        tmp_path,
        "secure",
        "vae-digits",
        FIVE + ['faults.dropout-sites="0,3"', "secagg.enabled=true", "faults.dropout-stage=setup"],
    )
    assert lines[0]["aggregated"] and lines[0]["sites_used"] == ["site-1", "site-2", "site-4"]
    assert _max_diff(secure, plain_without_0_and_3) < STEP


def test_below_threshold_round_fails_cleanly_and_ledgers_the_spend(tmp_path):
    run_dir = tmp_path / "run"
    simulate(
        "vae-digits",
        VAE
        + [
            "num-sites=5",
            "rounds=2",
            "secagg.enabled=true",
            "faults.dropout-stage=unmask",
            'faults.dropout-sites="0,1,2"',
            'faults.rounds="1"',
            f"run-dir={run_dir}",
            "sample-every=0",
            "backend=in-process",
        ],
    )
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert not lines[0]["aggregated"] and lines[0]["sites_used"] == []
    assert any("secure aggregation failed" in f for f in lines[0]["failures"])
    assert lines[1]["aggregated"] and len(lines[1]["sites_used"]) == 5
    ledger = Ledger(run_dir / "ledger.sqlite")
    first = [r for r in ledger.rows() if r.round == 1]
    # Every site trained and sent a masked update before the round failed: all charged.
    assert [(r.site_id, r.status, r.used, r.steps > 0) for r in first] == [
        (f"site-{i}", "lost", False, True) for i in range(5)
    ]
    assert ledger.verify().ok


@pytest.mark.parametrize(
    "flat, key",
    [
        ({"secagg.num-shares": 4}, "secagg.num-shares"),
        ({"secagg.num-shares": 1}, "secagg.num-shares"),
        ({"secagg.enabled": True, "num-sites": 5, "secagg.num-shares": 7}, "secagg.num-shares"),
        ({"secagg.enabled": True, "num-sites": 2}, "fraction-fit"),
        (
            {"secagg.enabled": True, "num-sites": 5, "secagg.reconstruction-threshold": 5},
            "secagg.reconstruction-threshold",
        ),
        ({"secagg.num-shares": 5, "secagg.reconstruction-threshold": 5}, "secagg.reconstruction-threshold"),
        ({"secagg.enabled": True, "num-sites": 5, "secagg.modulus-range": 1 << 24}, "secagg.modulus-range"),
        ({"secagg.modulus-range": 3 << 30}, "secagg.modulus-range"),
        ({"secagg.enabled": True, "weighting": "examples"}, "weighting"),
        ({"secagg.enabled": True, "central-dp.enabled": True, "central-dp.clip-norm": 10.0}, "central-dp.clip-norm"),
        ({"central-dp.enabled": True, "weighting": "examples"}, "weighting"),
        ({"central-dp.enabled": True, "central-dp.noise-multiplier": 0.0}, "central-dp.noise-multiplier"),
        ({"faults.dropout-sites": "0;1"}, "faults.dropout-sites"),
    ],
)
def test_bad_secure_settings_are_one_line_errors(flat, key):
    with pytest.raises(ConfigError) as info:
        RunConfig.from_flat(flat)
    assert info.value.key == key and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "sampled, cfg, expected",
    [
        (5, {}, (5, 3)),
        (8, {}, (8, 5)),
        (4, {}, (4, 3)),
        (3, {}, (3, 2)),
        (9, {"secagg.num-shares": 5}, (5, 3)),
        (4, {"secagg.num-shares": 5}, (4, 3)),  # fewer sites than shares: every site holds one
        (9, {"secagg.num-shares": 5, "secagg.reconstruction-threshold": 4}, (5, 4)),
        (3, {"secagg.reconstruction-threshold": 4}, (3, 2)),  # never the whole graph: one dropout stays possible
    ],
)
def test_shares_and_threshold_fit_each_round(sampled, cfg, expected):
    assert shares_and_threshold(RunConfig.from_flat(cfg).secagg, sampled) == expected


def test_auto_weighting():
    assert not RunConfig.from_flat({}).uniform_weights
    assert RunConfig.from_flat({"secagg.enabled": True}).uniform_weights
    assert RunConfig.from_flat({"central-dp.enabled": True}).uniform_weights
    assert RunConfig.from_flat({"weighting": "uniform"}).uniform_weights


def test_faults_pick_sites_deterministically():
    f = RunConfig.from_flat({"faults.dropout-rate": 0.3, "faults.rounds": "2,3"}).faults
    picks = [drops(f, 0, site, rnd, "upload") for rnd in range(1, 5) for site in range(200)]
    assert not any(picks[:200]) and not any(picks[600:])  # rounds 1 and 4 are fault-free
    assert 0.22 < np.mean(picks[200:600]) < 0.38
    assert picks == [drops(f, 0, site, rnd, "upload") for rnd in range(1, 5) for site in range(200)]
    assert not drops(f, 0, 1, 2, "train")
