"""A local ``flwr run .`` (Flower's simulation engine) takes every party's key from the folder
``$PRIVFED_SIMULATION_IDS`` names (common/deploy/simulation_ids.py), and nothing else does:
a deployed ServerApp still needs its registry, a deployed site its own signing key, and
identities made for another run are refused in one line naming the variable."""

from __future__ import annotations

import stat
import subprocess
import sys
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest
from flwr.app import Context, RecordDict

import client.app as client_app
import server.app as server_app
from common.config import RunConfig, flatten
from common.deploy.signing import public_hex, write_signing_key
from common.deploy.simulation_ids import (
    ENV,
    SIMULATION_NODE_CONFIG,
    app_config,
    make_for_app,
    simulation_identities,
)
from common.errors import ConfigError, PrivfedError
from common.runtime import drop_inactive_tasks
from simulations.launcher import resolve
from tests.site_keys import SERVER_PUBLIC

ROOT = Path(__file__).resolve().parents[2]
# A run as the module-level apps see it under `flwr run`: everything in the run config.
RUN = {"num-sites": 2, "dp.target-epsilon": 0.0, "dp.noise-multiplier": 1.0, "train.local-epochs": 0.2}


@pytest.fixture(scope="module")
def ids(tmp_path_factory):
    """What `privfed keys simulation DIR ...` makes for RUN (real training-split sizes)."""
    folder = tmp_path_factory.mktemp("ids") / "ids"
    made = make_for_app(folder, RunConfig.from_flat(RUN))
    return SimpleNamespace(folder=folder, made=made)


@pytest.fixture
def three_sites(tmp_path):
    folder = tmp_path / "ids3"
    simulation_identities(folder, [100, 100, 100])
    return folder


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


# ------------------------------------------------------------------ the ServerApp
def _server(monkeypatch, *, simulation: bool):
    """The module-level ServerApp's main, with Flower's grid said to be (or not) the simulation's;
    returns (app, the configs run_federation was called with)."""
    seen: list[RunConfig] = []

    class _Summary:
        def headline(self) -> list[str]:
            return []

    def fake_run(grid, context, cfg, console, **_):
        seen.append(cfg)
        return _Summary()

    monkeypatch.setattr(server_app, "is_simulation", lambda grid: simulation)
    monkeypatch.setattr(server_app, "run_federation", fake_run)
    return server_app.build_server_app(), seen


def _ctx(run_config: dict) -> Context:
    return Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)


def test_a_simulated_server_app_takes_the_registry_and_its_key_from_the_variable(ids, monkeypatch):
    monkeypatch.setenv(ENV, str(ids.folder))
    app, seen = _server(monkeypatch, simulation=True)
    app(SimpleNamespace(), _ctx(RUN))  # type: ignore[arg-type]
    (cfg,) = seen
    assert cfg.federation.registry == str(ids.folder / "registry.toml")
    assert cfg.federation.server_key == str(ids.folder / "keys" / "server.key")
    registry, key = server_app.load_identities(cfg)  # what run_federation then does: they match
    assert public_hex(key) == registry.server_key == ids.made.server_public_key


def test_a_run_config_that_names_its_registry_keeps_it(ids, monkeypatch, tmp_path):
    monkeypatch.setenv(ENV, str(ids.folder))
    app, seen = _server(monkeypatch, simulation=True)
    app(SimpleNamespace(), _ctx({**RUN, "registry": str(tmp_path / "own.toml")}))  # type: ignore[arg-type]
    assert seen[0].federation.registry == str(tmp_path / "own.toml")


def test_without_the_variable_a_simulated_server_app_says_what_to_do(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    app, seen = _server(monkeypatch, simulation=True)
    with pytest.raises(ConfigError) as info:
        app(SimpleNamespace(), _ctx(RUN))  # type: ignore[arg-type]
    msg = _one_line(info)
    assert msg.startswith("config key 'registry': is empty") and ENV in msg and "privfed keys simulation" in msg
    assert seen == []


def test_a_deployed_server_app_never_reads_the_variable(ids, monkeypatch, tmp_path):
    """Told by Flower's grid (not InMemoryGrid), not by a setting: with the variable set, a
    deployment's ServerApp still refuses to run without a registry, and makes no run dir."""
    monkeypatch.setenv(ENV, str(ids.folder))
    app = server_app.build_server_app()
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError) as info:
        app(SimpleNamespace(), _ctx({**RUN, "run-dir": str(run_dir)}))  # type: ignore[arg-type]
    assert _one_line(info).startswith("config key 'registry': is empty: the server needs the federation registry")
    assert not run_dir.exists()


def test_identities_for_another_num_sites_are_refused_in_one_line(three_sites, monkeypatch):
    monkeypatch.setenv(ENV, str(three_sites))
    with pytest.raises(ConfigError) as info:
        server_app.with_simulation_identities(RunConfig.from_flat(RUN))
    msg = _one_line(info)
    assert info.value.key == ENV
    assert "holds the keys of 3 simulated site(s), but num-sites is 2" in msg and "num-sites=2" in msg


def test_identities_for_another_data_split_are_refused_without_the_sizes(ids, monkeypatch, tmp_path):
    real = ids.made.sizes
    folder = tmp_path / "other-split"
    simulation_identities(folder, [n + 1 for n in real])
    monkeypatch.setenv(ENV, str(folder))
    with pytest.raises(ConfigError) as info:
        server_app.with_simulation_identities(RunConfig.from_flat(RUN))
    msg = _one_line(info)
    assert info.value.key == ENV and "another data split" in msg
    assert not any(str(n) in msg.replace(str(folder), "") for n in [*real, *(n + 1 for n in real)])


@pytest.mark.parametrize("value, says", [("/nonexistent/ids", "holds no registry.toml"), ("ids", "absolute path")])
def test_a_folder_that_is_not_one_is_refused_in_one_line(monkeypatch, value, says):
    monkeypatch.setenv(ENV, value)
    with pytest.raises(ConfigError) as info:
        server_app.with_simulation_identities(RunConfig.from_flat(RUN))
    assert info.value.key == ENV and says in _one_line(info)


# ------------------------------------------------------------------ the ClientApp
def _site(node: dict, run_config: dict | None = None):
    ctx = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config=run_config or RUN)
    return client_app.make_site({}, ctx)  # what the module-level `app` passes: nothing of its own


SIMULATED_NODE = {"partition-id": 1, "num-partitions": 2}  # what Flower's simulation engine gives a node


@pytest.fixture
def in_engine(monkeypatch):
    """As if this ClientApp ran in Flower's simulation engine (a Ray actor)."""
    monkeypatch.setattr(client_app, "in_simulation_engine", lambda: True)


def test_flowers_simulated_node_config_is_what_the_module_expects():
    from flwr.common.constant import NUM_PARTITIONS_KEY, PARTITION_ID_KEY

    assert SIMULATION_NODE_CONFIG == {PARTITION_ID_KEY, NUM_PARTITIONS_KEY} == set(SIMULATED_NODE)


def test_a_node_of_the_engine_signs_with_its_own_key_from_the_variable(ids, monkeypatch, in_engine):
    monkeypatch.setenv(ENV, str(ids.folder))
    site = _site(SIMULATED_NODE)
    assert public_hex(site.signing_key) == ids.made.registry.sites["site-1"].public_key
    assert site.server_key == ids.made.server_public_key
    assert site.declared == ids.made.sizes[1] == len(site.train_data)  # n-hat: its training split


@pytest.mark.parametrize(
    "extra",
    [
        {"declared-size": 600},
        {"declared-size": 600, "server-key": SERVER_PUBLIC},
        {"site-id": "hospital-a"},
        {"state-dir": "/nonexistent"},
        {"num-partitions": 2, "epsilon-budget": 5.0},
    ],
)
def test_a_deployed_looking_node_without_its_signing_key_is_still_refused(ids, monkeypatch, in_engine, extra):
    """Even with the variable set and (as if) in the engine: a node config with any site
    setting is a deployed site's, which signs with its own key or not at all."""
    monkeypatch.setenv(ENV, str(ids.folder))
    with pytest.raises(ConfigError) as info:
        _site({"partition-id": 0, **extra})
    assert info.value.key == "signing-key" and _one_line(info)


def test_flowers_node_config_outside_the_engine_is_refused(ids, monkeypatch):
    """A SuperNode given only partition-id and num-partitions, with the variable set: not a
    Ray actor (this test process is none), so still the deployed rule."""
    monkeypatch.setenv(ENV, str(ids.folder))
    assert not client_app.in_simulation_engine()
    with pytest.raises(ConfigError) as info:
        _site(SIMULATED_NODE)
    assert info.value.key == "signing-key"


def test_a_node_with_its_own_signing_key_ignores_the_variable(ids, monkeypatch, in_engine, tmp_path):
    monkeypatch.setenv(ENV, str(ids.folder))
    own = write_signing_key(tmp_path / "site.pem")
    node = {"partition-id": 0, "declared-size": 600, "signing-key": str(tmp_path / "site.pem")}
    site = _site({**node, "server-key": SERVER_PUBLIC})
    assert public_hex(site.signing_key) == public_hex(own) and site.server_key == SERVER_PUBLIC


def test_a_node_of_the_engine_refuses_identities_for_another_run_in_one_line(
    ids, three_sites, monkeypatch, in_engine, tmp_path
):
    monkeypatch.setenv(ENV, str(three_sites))
    with pytest.raises(ConfigError) as info:
        _site(SIMULATED_NODE)
    assert info.value.key == ENV and "but num-sites is 2" in _one_line(info)
    # The right number of sites, another split (a keyed task's server cannot check it): the site does.
    folder = tmp_path / "other-split"
    simulation_identities(folder, [n + 1 for n in ids.made.sizes])
    monkeypatch.setenv(ENV, str(folder))
    with pytest.raises(ConfigError) as info:
        _site(SIMULATED_NODE)
    assert info.value.key == ENV and "another data split" in _one_line(info)


def test_asking_whether_in_the_engine_never_starts_ray():
    code = "import ray, client.app as a; print(a.in_simulation_engine(), ray.is_initialized())"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.stdout.split() == ["False", "False"], out.stderr[-2000:]


# ------------------------------------------------------------------ privfed keys simulation
def test_app_config_is_what_flwr_run_runs():
    table = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    expected = RunConfig.from_flat(drop_inactive_tasks({**flatten(table), "rounds": 3, "num-sites": 2}))
    assert app_config(ROOT, ["rounds=3", "num-sites=2"]) == expected


def test_privfed_keys_simulation_makes_the_folder_and_says_what_to_export(tmp_path, capsys):
    from simulations.cli import main

    folder = tmp_path / "ids"
    assert main(["keys", "simulation", str(folder), "--app", str(ROOT), "num-sites=2"]) == 0
    out = capsys.readouterr().out
    assert f"export {ENV}={folder.resolve()}" in out and "num-supernodes=2" in out
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for name in ("server.key", "site-0.key", "site-1.key"):
        assert stat.S_IMODE((folder / "keys" / name).stat().st_mode) == 0o600
    assert sorted(tomllib.loads((folder / "registry.toml").read_text())) == ["server", "site"]
    before = (folder / "registry.toml").read_text()
    assert main(["keys", "simulation", str(folder), "--app", str(ROOT), "num-sites=2"]) == 2
    err = capsys.readouterr().err
    assert "already holds simulation keys (pass --force" in err and len(err.strip().splitlines()) == 1
    assert (folder / "registry.toml").read_text() == before  # nothing replaced
    assert main(["keys", "simulation", str(tmp_path / "x"), "--app", str(ROOT), "nmu-sites=2"]) == 2
    err = capsys.readouterr().err
    assert "'nmu-sites'" in err and len(err.strip().splitlines()) == 1


def test_a_keyed_task_needs_the_federation_key_to_size_its_sites(tmp_path, monkeypatch):
    monkeypatch.delenv("PRIVFED_KEY_FILE", raising=False)
    cfg = resolve("recsys-synthetic", ["num-sites=2"])
    with pytest.raises(ConfigError) as info:
        make_for_app(tmp_path / "ids", cfg)
    assert info.value.key == "key-file" and _one_line(info)
    assert not (tmp_path / "ids").exists()


def test_the_keys_go_only_into_a_new_or_empty_folder_of_their_own(tmp_path):
    """`privfed keys simulation .` must not make a checkout or a home folder 0700 (review of issue 23)."""
    cfg = RunConfig.from_flat(RUN)
    busy = tmp_path / "checkout"
    busy.mkdir(mode=0o755)
    (busy / "README.md").write_text("x")
    with pytest.raises(PrivfedError, match="holds other files"):
        make_for_app(busy, cfg)
    assert busy.stat().st_mode & 0o777 == 0o755
    target = tmp_path / "elsewhere"
    target.mkdir()
    linked = tmp_path / "ids"
    linked.mkdir()
    (linked / "keys").symlink_to(target)
    with pytest.raises(PrivfedError, match="is a link"):
        make_for_app(linked, cfg, force=True)
    assert not any(target.iterdir())
    make_for_app(tmp_path / "fresh", cfg)  # a new folder is fine, and so is replacing its keys
    make_for_app(tmp_path / "fresh", cfg, force=True)
