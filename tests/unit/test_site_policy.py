"""Issue 19: a site policy the coordinator cannot loosen; each refusal names the run config
key, repeats no value, happens before any data is read, and carries a signed token."""

from __future__ import annotations

import pytest
from flwr.app import Context, RecordDict
from flwr.common.config import parse_config_args

import client.app as app
from client.app import RefusingSite, make_site
from client.mods import failure_text
from common.deploy.signing import parse_refusal, public_hex, refusal_claim, refusal_token, verify
from common.deploy.site_config import PolicyRefusal, SiteConfig, SitePolicy
from common.errors import ConfigError
from tests.site_keys import SERVER_PUBLIC, SITE_KEYS, site_keys

BASE = {"num-sites": 3, "dp.noise-multiplier": 1.0}


def _make(node, run_config=None):
    ctx = Context(
        run_id=1,
        node_id=1,
        node_config={"partition-id": 0, "declared-size": 600, **node},
        state=RecordDict(),
        run_config=run_config or {},
    )
    return make_site(BASE, ctx, **site_keys())


@pytest.fixture
def no_data(monkeypatch):
    """A refusal must come before the SiteClient (which loads the data) is built."""

    def loaded(*a, **k):
        raise AssertionError("data loaded before the policy check")

    monkeypatch.setattr(app, "SiteClient", loaded)


@pytest.mark.parametrize(
    "node, run_config, key, value",
    [
        ({"allowed-tasks": "gan, recsys"}, {}, "task", None),
        ({"min-noise-multiplier": 2.5}, {}, "dp.noise-multiplier", "2.5"),
        ({"min-noise-multiplier": 2.5}, {"dp.target-epsilon": 8.0}, "dp.target-epsilon", "2.5"),
        ({"max-epsilon-per-round": 0.0123}, {}, "dp.noise-multiplier", "0.0123"),
        ({"max-delta": 3e-9}, {}, "dp.delta", "3e-09"),
        ({"min-noise-multiplier": 1.5}, {"dp.enabled": False, "metrics.dp": False}, "dp.enabled", "1.5"),
        ({}, {"dp.secure-rng": False}, "dp.secure-rng", None),
        ({}, {"metrics.dp": False}, "metrics.dp", None),
        ({"privacy-unit": "user"}, {}, "dp.unit", None),  # record-level DP at a site that promised persons
    ],
)
def test_each_limit_refuses_with_the_key_and_no_value(no_data, node, run_config, key, value):
    with pytest.raises(PolicyRefusal) as info:
        _make(node, run_config)
    exc = info.value
    assert exc.key == key and isinstance(exc, ConfigError)
    if value is not None:
        assert value not in str(exc)
    text = failure_text(exc.sign_for("run-7", 4))
    assert text.startswith(f"site failed: PolicyRefusal [E-POLICY] (config key '{key}') signed-refusal:")
    parsed = parse_refusal(text)
    assert parsed is not None
    claim, sig = parsed
    assert claim == refusal_claim("run-7", 4, "site-0", key)
    assert verify(public_hex(SITE_KEYS[0]), claim, sig)
    assert not verify(public_hex(SITE_KEYS[1]), claim, sig)


def test_the_group_size_floor_applies_to_the_tasks_that_have_one(no_data):
    with pytest.raises(PolicyRefusal) as info:
        _make({"min-group-size": 20}, {"task": "vae", "vae.min-group-size": 5})
    assert info.value.key == "vae.min-group-size" and "5" not in str(info.value)
    with pytest.raises(PolicyRefusal) as info:
        recsys = {"task": "recsys", "data.source": "synthetic", "data.partition": "iid"}
        _make({"min-group-size": 20}, {**recsys, "recsys.min-group-size": 19})
    assert info.value.key == "recsys.min-group-size"


def test_allowed_tasks_is_checked_first(no_data):
    # Outside two limits: the task is named, not the noise.
    with pytest.raises(PolicyRefusal) as info:
        _make({"allowed-tasks": "gan", "min-noise-multiplier": 9.0}, {})
    assert info.value.key == "task"


def test_a_run_config_within_the_limits_trains():
    node = {
        "allowed-tasks": "gan,vae",
        "min-noise-multiplier": 1.0,
        "max-epsilon-per-round": 50.0,
        "max-delta": 1e-3,
        "min-group-size": 3,
    }
    site = _make(node, {"task": "vae"})
    assert site.cfg.dp.noise_multiplier == 1.0


def test_the_refusing_site_signs_for_the_instruction_and_checks_its_run_id():
    exc = PolicyRefusal("dp.delta", "is above this site's limit").bind(SITE_KEYS[2], "clinic-b")
    site = RefusingSite(exc)
    with pytest.raises(PolicyRefusal) as info:
        site.fit([], {"server-round": 5, "run-id": "run-9"})
    claim, sig = parse_refusal(failure_text(info.value)) or ({}, "")
    assert claim == refusal_claim("run-9", 5, "clinic-b", "dp.delta")
    assert verify(public_hex(SITE_KEYS[2]), claim, sig)
    with pytest.raises(ConfigError) as bad:
        RefusingSite(exc).evaluate([], {"server-round": 5, "run-id": "../x"})
    assert bad.value.key == "run-id"


def test_failure_text_carries_only_a_well_formed_token_for_the_refused_key():
    exc = PolicyRefusal("dp.delta", "is above")
    exc.refusal_token = "signed-refusal: rating 4.5 for user 17"
    assert failure_text(exc) == "site failed: PolicyRefusal [E-POLICY] (config key 'dp.delta')"
    # A token for another key, or with extra claim fields, is not appended.
    exc.refusal_token = refusal_token(SITE_KEYS[0], refusal_claim("r", 1, "site-0", "task"))
    assert "signed-refusal" not in failure_text(exc)
    exc.refusal_token = refusal_token(SITE_KEYS[0], {**refusal_claim("r", 1, "site-0", "dp.delta"), "n": 123})
    assert "signed-refusal" not in failure_text(exc)
    exc.refusal_token = refusal_token(SITE_KEYS[0], refusal_claim("r", 1, "site-0", "dp.delta")) + " n=5"
    assert "signed-refusal" not in failure_text(exc)


@pytest.mark.parametrize(
    "node, key",
    [
        ({"min-noise-multiplier": "high"}, "site min-noise-multiplier"),
        ({"max-delta": 2.0}, "site max-delta"),
        ({"min-group-size": 2.5}, "site min-group-size"),
        ({"allowed-tasks": 3}, "site allowed-tasks"),
        ({"max-epsilon-per-round": -1.0}, "site max-epsilon-per-round"),
        ({"privacy-unit": "rating"}, "site privacy-unit"),
    ],
)
def test_a_malformed_policy_is_the_sites_own_error(node, key):
    with pytest.raises(ConfigError) as info:
        SitePolicy.from_node_config(node)
    assert info.value.key == key and not isinstance(info.value, PolicyRefusal)


def _site_config(**fields) -> SiteConfig:
    """A site config with its keys and every policy limit set; ``fields`` add or override."""
    policy = {"min_noise_multiplier": 0.8, "max_epsilon_per_round": 0.5, "max_delta": 1e-5, "min_group_size": 12}
    base = {"declared_size": 300, "signing_key": "s.pem", "server_key": SERVER_PUBLIC, "allowed_tasks": "vae"}
    return SiteConfig("clinic-a", 0, "h:1", "ca", "k", "k.pub", **{**base, **policy, **fields})


def test_the_site_config_carries_keys_and_policy_to_the_node_config(tmp_path):
    site = _site_config(signing_key=str(tmp_path / "s.pem"), allowed_tasks="gan,vae")
    site.validate()
    path = tmp_path / "site.toml"
    path.write_text(site.to_toml())
    assert SiteConfig.load(path) == site
    parsed = parse_config_args([site.node_config()])
    assert parsed["signing-key"] == str(tmp_path / "s.pem") and parsed["server-key"] == SERVER_PUBLIC
    assert SitePolicy.from_node_config(parsed) == SitePolicy(("gan", "vae"), 0.8, 0.5, 1e-5, 12)
    for bad, key in (
        ({"signing_key": ""}, "signing-key"),
        ({"server_key": "xyz"}, "server-key"),
        ({"site_id": "node-3"}, "site-id"),
        ({"allowed_tasks": 'a"b'}, "allowed-tasks"),
        ({"max_delta": 1.5}, "site max-delta"),
    ):
        import dataclasses

        with pytest.raises(ConfigError) as info:
            dataclasses.replace(site, **bad).validate()
        assert info.value.key == key


def test_a_mistyped_node_config_key_is_refused_not_ignored(no_data):
    """Issue 20, finding 7: `epsilon_budget = 4.0` (underscore) was ignored and the site trained
    to the run's budget. Now it is refused before anything is read, naming the closest key."""
    with pytest.raises(ConfigError) as info:
        _make({"epsilon_budget": 4.0})
    assert info.value.key == "epsilon_budget" and "did you mean 'epsilon-budget'" in str(info.value)
    assert "4.0" not in str(info.value)  # the value never repeats (error text can reach the coordinator)
    assert failure_text(info.value) == "site failed: ConfigError [E-CONFIG] (config key 'epsilon_budget')"
    with pytest.raises(ConfigError, match="not a privfed site setting"):
        _make({"colour": "blue"})


def test_every_key_privfed_site_join_writes_is_one_the_site_accepts(tmp_path):
    from common.deploy.site_config import NODE_CONFIG_KEYS

    site = _site_config(
        key_file="f.key",
        data_path="d.csv",
        data_format="csv",
        users_path="u.csv",
        epsilon_budget=4.0,
        state_dir="st",
        dataset_id="ds",
        allow_seeded_noise=True,
        allow_exact_metrics=True,
        privacy_unit="user",
    )
    parsed = parse_config_args([site.node_config()])
    assert set(parsed) == set(NODE_CONFIG_KEYS) - {"num-partitions"}  # that one only Flower's simulation sets
