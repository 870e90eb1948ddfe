"""Config validation: every invalid value stops with one line naming the key."""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pytest

from common.config import RunConfig, parse_override
from common.errors import ConfigError, DataError
from common.preflight import preflight
from simulations.cli import main as cli_main
from simulations.launcher import load_scenario, resolve

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_are_valid_and_roundtrip():
    cfg = RunConfig.from_flat({})
    again = RunConfig.from_flat(cfg.to_flat())
    assert again == cfg
    assert cfg.task_params.latent_dim >= 1


@pytest.mark.parametrize(
    "flat, key",
    [
        ({"roundz": 3}, "roundz"),
        ({"dp.nois": 1.0}, "dp.nois"),
        ({"nosuch.section": 1}, "nosuch.section"),
        ({"task": "tabular-magic"}, "task"),
        ({"rounds": 0}, "rounds"),
        ({"rounds": -3}, "rounds"),
        ({"dp.noise-multiplier": -1.0}, "dp.noise-multiplier"),
        ({"dp.noise-multiplier": 0.0}, "dp.noise-multiplier"),
        ({"dp.target-epsilon": -2.0}, "dp.target-epsilon"),
        ({"dp.epsilon-budget": -1.0}, "dp.epsilon-budget"),
        ({"dp.delta": 1.5}, "dp.delta"),
        ({"dp.delta": -1e-5}, "dp.delta"),
        ({"dp.max-grad-norm": 0.0}, "dp.max-grad-norm"),
        ({"dp.accountant": "moments"}, "dp.accountant"),
        ({"dp.engine": "turbo"}, "dp.engine"),
        ({"num-sites": 0}, "num-sites"),
        ({"rounds": "ten"}, "rounds"),
        ({"rounds": 2.5}, "rounds"),
        ({"dp.enabled": "yes"}, "dp.enabled"),
        ({"fraction-fit": 0.0}, "fraction-fit"),
        ({"device": "tpu"}, "device"),
        ({"data.source": "imagenet"}, "data.source"),
        ({"data.alpha": 0.0}, "data.alpha"),
        ({"vae.latent-dim": 0}, "vae.latent-dim"),
        ({"dp.target-epsilon": 20.0, "dp.epsilon-budget": 10.0}, "dp.target-epsilon"),
    ],
)
def test_invalid_values_name_the_key(flat, key):
    with pytest.raises(ConfigError) as info:
        RunConfig.from_flat(flat)
    assert info.value.key == key
    assert f"'{key}'" in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_key_suggests_the_right_one():
    with pytest.raises(ConfigError, match="did you mean 'dp.noise-multiplier'"):
        RunConfig.from_flat({"dp.noise": 1.0})


def test_more_sites_than_examples_is_rejected_before_start():
    cfg = RunConfig.from_flat({"num-sites": 500})
    with pytest.raises(ConfigError) as info:
        preflight(cfg)
    assert info.value.key == "num-sites"


def test_delta_at_least_one_over_n_is_rejected():
    # Default split: every site has 20..1000 examples, so delta = 0.05 >= 1/n.
    cfg = RunConfig.from_flat({"dp.delta": 0.05})
    with pytest.raises(ConfigError, match=r"dp.delta.*1/n"):
        preflight(cfg)


def test_auto_delta_is_below_one_over_n():
    from common.privacy.plan import plan_round

    cfg = RunConfig.from_flat({})
    for n in (11, 50, 1000, 10**6):
        assert plan_round(cfg, n).delta < 1.0 / n


def test_missing_data_file_names_the_file(tmp_path):
    missing = tmp_path / "nope.npz"
    cfg = RunConfig.from_flat({"data.source": "npz", "data.path": str(missing)})
    with pytest.raises(DataError, match="nope.npz"):
        preflight(cfg)


def test_corrupt_data_file_names_the_file(tmp_path):
    bad = tmp_path / "corrupt.npz"
    bad.write_bytes(b"PK\x03\x04 this is not a zip archive at all")
    cfg = RunConfig.from_flat({"data.source": "npz", "data.path": str(bad)})
    with pytest.raises(DataError, match="corrupt.npz.*not a readable"):
        preflight(cfg)


def test_npz_without_x_and_out_of_range_values(tmp_path):
    p = tmp_path / "nox.npz"
    np.savez(p, images=np.zeros((5, 4)))
    with pytest.raises(DataError, match="no array 'x'"):
        preflight(RunConfig.from_flat({"data.source": "npz", "data.path": str(p)}))
    q = tmp_path / "range.npz"
    np.savez(q, x=np.full((400, 16), 7.0))
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        preflight(RunConfig.from_flat({"data.source": "npz", "data.path": str(q)}))


def test_overrides_parse_as_toml_literals():
    assert parse_override("rounds=3") == ("rounds", 3)
    assert parse_override("dp.noise-multiplier=1.5") == ("dp.noise-multiplier", 1.5)
    assert parse_override("dp.enabled=false") == ("dp.enabled", False)
    assert parse_override("dp.engine=opacus") == ("dp.engine", "opacus")
    with pytest.raises(ConfigError):
        parse_override("rounds")


@pytest.mark.parametrize(
    ("scenario", "also"),
    [
        # The VAE's private run trains rank-4 adapters at its own learning rate; its non-private
        # reference trains every weight (the stronger baseline; docs/TASKS.md). Nothing else differs.
        ("vae-digits", {"train.lr", "vae.adapter-rank"}),
        ("gan-digits", set()),
        ("tabular-adult", set()),
    ],
)
def test_scenarios_resolve_and_nodp_differs_only_in_dp(scenario, also):
    dp = resolve(scenario).to_flat()
    nodp = resolve(f"{scenario}-nodp").to_flat()
    diff = {k for k in dp if dp[k] != nodp[k]}
    assert diff == {"scenario", "dp.enabled"} | also


def test_unknown_scenario():
    with pytest.raises(ConfigError, match="unknown scenario 'nope'"):
        load_scenario("nope")


def test_pyproject_flower_config_is_the_vae_digits_scenario():
    """`flwr run .` and `privfed simulate vae-digits` must run the same thing, and every key
    must be present so `flwr run --run-config` can override it. One difference: `flwr run`
    deploys, so its noise comes from OS entropy; the simulation launcher seeds it."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    from dataclasses import fields

    from common.config import flatten
    from common.config.limits import key_of
    from common.config.loading import registered_tasks
    from common.runtime import drop_inactive_tasks

    listed = flatten(pyproject["tool"]["flwr"]["app"]["config"])
    # Every task's table is listed (so `flwr run` can deploy any task), the others at their defaults.
    for name in ("gan", "recsys", "tabular"):
        cls = registered_tasks()[name].config_cls
        assert {k: v for k, v in listed.items() if k.startswith(name + ".")} == {
            f"{name}.{key_of(f.name)}": getattr(cls(), f.name) for f in fields(cls)
        }
    flower = drop_inactive_tasks(listed)
    # The differences: `flwr run` (deployment) draws noise from OS entropy and keeps private
    # metrics on; the simulation launcher seeds the noise and turns private metrics off.
    assert flower == {**resolve("vae-digits", ["metrics.dp=true"]).to_flat(), "dp.secure-rng": True}
    assert flower["dp.secure-rng"] is True and resolve("vae-digits").dp.secure_rng is False
    assert flower["metrics.dp"] is True and resolve("vae-digits").metrics.dp is False


def test_noise_is_secure_by_default_and_seeded_only_by_the_simulation_launcher():
    assert RunConfig.from_flat({}).dp.secure_rng is True  # a deployment, a test, any other caller
    assert resolve("vae-digits").dp.secure_rng is False  # reproducible simulations
    assert resolve("vae-digits", ["dp.secure-rng=true"]).dp.secure_rng is True  # an override still wins


def test_cli_prints_one_line_and_creates_nothing(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = cli_main(["simulate", "vae-digits", "rounds=0", f"run-dir={run_dir}"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0 and "rounds" in err and "Traceback" not in err
    assert not run_dir.exists()


def test_cli_bad_data_file_one_line(tmp_path, capsys):
    bad = tmp_path / "x.npz"
    bad.write_text("garbage")
    code = cli_main(["simulate", "vae-digits", "data.source=npz", f"data.path={bad}", f"run-dir={tmp_path / 'r'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "x.npz" in err
    assert not (tmp_path / "r").exists()


def test_run_dir_that_is_a_file_is_refused(tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    assert cli_main(["simulate", "vae-digits", f"run-dir={f}"]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_npz_with_empty_examples(tmp_path):
    p = tmp_path / "empty.npz"
    np.savez(p, x=np.zeros((400, 0), dtype=np.float32))
    with pytest.raises(DataError, match="at least one value"):
        preflight(RunConfig.from_flat({"data.source": "npz", "data.path": str(p)}))
