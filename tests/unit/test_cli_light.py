"""The fast commands stay fast: `privfed --help`, `scenarios`, `config`, every command's
`--help` and a config's one-line error import none of torch, Flower, Ray or Opacus (seconds
each), and the task plug-ins' light specs and heavy classes say the same thing.

Asserted by structure (which modules a fresh interpreter loaded), not by timing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "flwr", "ray", "opacus")

# Runs in a fresh interpreter: the test process has imported torch long ago.
_PROBE = r"""
import argparse, contextlib, importlib, io, json, sys

from simulations.cli import COMMANDS, main
from simulations.launcher import describe, resolve, scenario_names
from common.errors import ConfigError

outcomes = {}
def run(*argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            code = main(list(argv))
        except SystemExit as exc:  # --help, and argparse's own errors
            code = exc.code
    outcomes[" ".join(argv)] = (code, out.getvalue())

# Every scenario resolves and validates (the rules included), as `privfed config` does.
for name in scenario_names():
    describe(name)
    resolve(name)
for argv in [
    ["--help"], ["scenarios"], ["config", "vae-digits"],
    ["simulate", "vae-digits", "rounds=abc"], ["simulate", "vae-digits", "dp.bogus=1"],
    ["config", "vae-digits", "task=nope"], ["config", "no-such-scenario"],
    ["config", "recsys-synthetic", "recsys.model=nope"],
]:
    run(*argv)
# Every command's parser, through main and directly.
for name, (module_name, _) in COMMANDS.items():
    run(name, "--help")
    importlib.import_module(module_name).add_arguments(name, argparse.ArgumentParser())
print(json.dumps({"modules": sorted(sys.modules), "outcomes": outcomes}))
"""


@pytest.fixture(scope="module")
def probe() -> dict:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_fast_commands_import_no_heavy_library(probe):
    loaded = sorted(m for m in probe["modules"] if m.split(".")[0] in HEAVY)
    assert loaded == [], f"a fast command imported {sorted({m.split('.')[0] for m in loaded})}"


def test_fast_commands_still_answer(probe):
    """The probe's commands did what they should (so an empty import list means something)."""
    out = probe["outcomes"]
    assert out["scenarios"][0] == 0 and "vae-digits" in out["scenarios"][1]
    assert out["config vae-digits"][0] == 0 and 'task = "vae"' in out["config vae-digits"][1]
    for argv, key in [
        ("simulate vae-digits rounds=abc", "rounds"),
        ("simulate vae-digits dp.bogus=1", "dp.bogus"),
        ("config vae-digits task=nope", "task"),
        ("config no-such-scenario", "scenario"),
        ("config recsys-synthetic recsys.model=nope", "recsys.model"),
    ]:
        code, text = out[argv]
        assert code == 2 and text.startswith("error:") and key in text, (argv, text)
        assert len(text.strip().splitlines()) == 1, text
    assert all(out[f"{name} --help"][0] == 0 for name in ("simulate", "audit", "site", "coordinator"))


def test_every_task_class_takes_its_declarations_from_its_spec():
    from dataclasses import fields

    from common.config.loading import registered_tasks
    from common.tasks import get_task

    specs = registered_tasks()
    assert set(specs) == {"vae", "gan", "recsys", "tabular"}
    for name, spec in specs.items():
        cls = get_task(name)
        assert cls.name == name
        assert {f.name: getattr(cls, f.name) for f in fields(spec)} == {
            f.name: getattr(spec, f.name) for f in fields(spec)
        }


def test_a_task_class_may_not_redeclare_its_spec():
    """One home per declaration: the config checks runs against the SPEC, so a class-body
    copy could silently disagree with it."""
    from common.tasks import register_task
    from common.tasks.vae.task import VAETask

    class Stray(VAETask):
        data_sources = ("digits",)

    with pytest.raises(RuntimeError, match="data_sources"):
        register_task("vae")(Stray)


def test_recsys_model_names_are_the_models_built():
    from common.tasks.recsys.config import MODEL_NAMES
    from common.tasks.recsys.model import MODELS

    assert tuple(MODELS) == MODEL_NAMES
