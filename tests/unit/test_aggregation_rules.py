"""The config's list of aggregation names and the server's registry of rules stay one list.

The config (common/) validates `aggregation = ...` before anything starts and cannot import
server/, so it keeps the names; the server registers one class per rule. This test is what
makes the two one source: a rule added in one place only fails here.
"""

from __future__ import annotations

from common.config import AGGREGATIONS as CONFIG_NAMES
from server.aggregation import AGGREGATIONS as REGISTRY
from server.aggregation import get_aggregation
from tests.conftest import make_cfg


def test_config_names_are_exactly_the_registered_rules():
    assert set(CONFIG_NAMES) == set(REGISTRY)


def test_every_registered_rule_builds_from_a_config_that_names_it():
    for name in CONFIG_NAMES:
        cfg = make_cfg(aggregation=name)
        rule = get_aggregation(cfg.federation.aggregation, cfg)
        assert isinstance(rule, REGISTRY[name])
