"""A site's state file stays under its own state-dir, whatever run id the coordinator sends."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from client.state import state_path
from common.errors import PrivfedError
from tests.site_keys import site_keys


@pytest.mark.parametrize("run_id", ["..", ".", "...", "../..", "a/../../b", "/etc", "..\\..", "run/../../x"])
def test_a_hostile_run_id_never_names_a_file_outside_state_dir(tmp_path, run_id):
    root = (tmp_path / "state").resolve()
    try:
        path = state_path(root, run_id, "site-0")
    except PrivfedError as exc:
        assert "run-id" in str(exc) and "\n" not in str(exc)
        assert run_id not in str(exc).replace("'.' or '..'", "")  # the value is not echoed back
        return
    assert path.resolve().is_relative_to(root)
    assert path.parent.parent == root  # exactly <state-dir>/<run-id>/<site-id>.pt


@settings(deadline=None)  # the suite runs it after torch, Ray and Flower are loaded: a GC pause is not a failure
@given(run_id=st.text(max_size=40), site_id=st.text(max_size=40))
def test_any_run_and_site_id_stays_inside_state_dir(tmp_path_factory, run_id, site_id):
    root = tmp_path_factory.getbasetemp().resolve() / "state"
    try:
        path = state_path(root, run_id, site_id)
    except PrivfedError:
        return
    assert path.resolve().is_relative_to(root)
    assert path.parent.parent == root


# ------------------------------------------------------------ lifetime budget per dataset
def _lifetime_site(state_dir, budget=4.0, run_config=None, **node):
    """A fresh SiteClient (a new node state, as each new run or a restarted SuperNode has)
    on the same state-dir and dataset (``run_config``: what the coordinator's run config says)."""
    from flwr.app import Context, RecordDict

    from client.app import make_site

    defaults = {
        "num-sites": 3,
        "dp.noise-multiplier": 1.0,
        "dp.epsilon-budget": budget,
        "train.local-epochs": 0.5,
        "dp.secure-rng": False,  # reproducible; the virtual site below allows it
    }
    ctx = Context(
        run_id=1,
        node_id=1,
        node_config={
            "partition-id": 0,
            "state-dir": str(state_dir),
            "declared-size": 600,
            **node,
        },  # n-hat near the real ~430
        state=RecordDict(),
        run_config=run_config or {},
    )
    return make_site(defaults, ctx, allow_seeded_noise=True, **site_keys())


def _params(site):
    from common.tasks.base import get_state

    model = site.task.build_model()
    return get_state(model, site.task.shared_keys(model))


def _trained_rounds(tmp_path, rotate: bool) -> tuple[int, dict]:
    params, trained, last = None, 0, {}
    site = None
    for i in range(1, 20):
        if site is None or rotate:
            site = _lifetime_site(tmp_path / "state")
            params = params or _params(site)
        run_id, rnd = (f"run-{i}", 1) if rotate else ("run-1", i)
        _, _, last = site.fit(params, {"server-round": rnd, "run-id": run_id})
        if last["status"] != "trained":
            break
        trained += 1
    return trained, last


def test_rotating_run_ids_cannot_exceed_the_site_budget(tmp_path):
    """Issue 18, finding 8: budget 2 bought 4 rounds under one run id and 9 under rotating ones."""
    from client.state import Lifetime
    from common.privacy.accounting import LIFETIME_ACCOUNTANT, epsilon

    one_run, _ = _trained_rounds(tmp_path / "one", rotate=False)
    rotating, last = _trained_rounds(tmp_path / "rotating", rotate=True)
    assert 2 <= one_run < 19
    assert rotating == one_run  # a new run id is not a new budget
    assert last["status"] == "budget_exhausted" and "lifetime" in last["note"]
    site = _lifetime_site(tmp_path / "rotating" / "state")
    entries = site.lifetime.load()
    assert len(entries) == rotating and len({e.run_id for e in entries}) == rotating
    mechs = Lifetime.merged(entries, [])
    assert epsilon(mechs, entries[0].delta, LIFETIME_ACCOUNTANT) <= 4.0


def test_a_resumed_run_does_not_count_a_round_twice(tmp_path):
    from common.privacy.accounting import epsilon

    first = _lifetime_site(tmp_path / "state", budget=50.0)
    params = _params(first)
    for rnd in (1, 2):
        first.fit(params, {"server-round": rnd, "run-id": "run-x"})
    resumed = _lifetime_site(tmp_path / "state", budget=50.0)  # same run id, fresh node state
    _, _, m = resumed.fit(params, {"server-round": 3, "run-id": "run-x"})
    entries = resumed.lifetime.load()
    assert [(e.run_id, e.round) for e in entries] == [("run-x", 1), ("run-x", 2), ("run-x", 3)]
    # The lifetime view of this run equals the run's own history: nothing counted twice.
    assert resumed._lifetime() == resumed._history()
    assert m["eps_spent"] == pytest.approx(epsilon(resumed._history(), 1e-5, "rdp"))
    resumed.lifetime.record(entries[-1])  # recorded again (a retried write): still one spend
    assert len(resumed.lifetime.load()) == 3


def test_a_damaged_lifetime_history_is_an_error_not_a_fresh_budget(tmp_path):
    site = _lifetime_site(tmp_path / "state", budget=50.0)
    site.fit(_params(site), {"server-round": 1, "run-id": "r"})
    site.lifetime.path.write_text('{"rounds": [["r", 1, "x"')
    with pytest.raises(PrivfedError, match="lifetime history .* cannot be read"):
        _lifetime_site(tmp_path / "state", budget=50.0).fit(_params(site), {"server-round": 2, "run-id": "r2"})


def test_the_dataset_id_comes_from_where_the_data_is_not_from_the_run(tmp_path):
    from common.config import RunConfig
    from common.deploy.site_config import dataset_identity

    base = {"num-sites": 3}
    node = {"partition-id": 1}
    same = dataset_identity(RunConfig.from_flat(base), node, 1)
    # The coordinator's other keys (seed, alpha, task settings) do not name a new dataset ...
    assert dataset_identity(RunConfig.from_flat({**base, "seed": 7, "data.alpha": 0.1}), node, 1) == same
    assert dataset_identity(RunConfig.from_flat(base), node, 2) != same  # ... another partition does
    f = tmp_path / "mine.npz"
    site_file = RunConfig.from_flat({**base, "data.path": str(f), "data.partition": "site", "data.source": "npz"})
    mine = dataset_identity(site_file, node, 1)
    f.write_bytes(b"more records")  # the content is not the identity: adding a record keeps the budget
    assert dataset_identity(site_file, node, 1) == mine == dataset_identity(site_file, node, 2)
    assert dataset_identity(site_file, {**node, "dataset-id": "clinic/../x"}, 1) == "clinic_.._x"


# ------------------------------------------------------------ seeded noise is the site's call
def _deployed(run_config, node=None, **kw):
    from flwr.app import Context, RecordDict

    from client.app import make_site

    ctx = Context(
        run_id=1,
        node_id=1,
        node_config={"partition-id": 0, "declared-size": 200, **(node or {})},
        state=RecordDict(),
        run_config=run_config,
    )
    return make_site({"num-sites": 3, "dp.noise-multiplier": 1.0}, ctx, **{**site_keys(), **kw})


def test_a_deployed_site_refuses_seeded_noise_from_the_run_config():
    from common.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        _deployed({"dp.secure-rng": False})
    text = str(info.value)
    assert text.startswith("config key 'dp.secure-rng':") and "\n" not in text and "allow-seeded-noise" in text
    # The coordinator cannot grant the permission itself: the run config is not the node config.
    with pytest.raises(ConfigError):
        _deployed({"dp.secure-rng": False, "allow-seeded-noise": True})
    with pytest.raises(ConfigError, match="allow-seeded-noise"):
        _deployed({"dp.secure-rng": False}, {"allow-seeded-noise": "yes"})


def test_seeded_noise_only_where_the_site_allows_it_and_the_reply_says_which():
    site = _deployed({})  # the default: OS entropy
    assert site.cfg.dp.secure_rng
    _, _, m = site.fit(_params(site), {"server-round": 1})
    assert m["rng"] == "os"
    for allowed in (
        _deployed({"dp.secure-rng": False}, {"allow-seeded-noise": True}),
        _deployed({"dp.secure-rng": False}, allow_seeded_noise=True),
    ):
        _, _, m = allowed.fit(_params(allowed), {"server-round": 1})
        assert m["rng"] == "seeded"
    # Without noise there is nothing to seed: a non-private run is not refused for it.
    assert not _deployed({"dp.secure-rng": False, "dp.enabled": False, "metrics.dp": False}).cfg.dp.enabled


def test_exact_metrics_only_where_the_site_allows_them():
    """The coordinator's run config alone cannot turn a site's private metrics off (issue 18)."""
    from common.errors import ConfigError

    with pytest.raises(ConfigError, match=r"'metrics.dp'.*allow-exact-metrics is false") as refused:
        _deployed({"metrics.dp": False})
    assert "\n" not in str(refused.value)
    assert not _deployed({"metrics.dp": False}, {"allow-exact-metrics": True}).cfg.metrics.dp
    assert not _deployed({"metrics.dp": False}, allow_seeded_noise=True).cfg.metrics.dp  # a virtual site
    assert _deployed({}).cfg.metrics.dp  # the default: private metrics
    with pytest.raises(ConfigError, match="allow-exact-metrics"):
        _deployed({"metrics.dp": False}, {"allow-exact-metrics": "yes"})
