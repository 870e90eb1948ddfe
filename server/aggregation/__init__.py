"""Aggregation rules, one file per rule, behind a registry (``federation.aggregation``)."""

from __future__ import annotations

from typing import Any

from server.aggregation import fedavg, krum, qfedavg, trimmed_mean  # noqa: F401  (registers the rules)
from server.aggregation.base import AGGREGATIONS, Aggregation, RoundInputs, Staged, Usable, register_aggregation

__all__ = ["AGGREGATIONS", "Aggregation", "RoundInputs", "Staged", "Usable", "get_aggregation", "register_aggregation"]


def get_aggregation(name: str, cfg: Any) -> Aggregation:
    """The rule called ``name`` (config validation has checked it exists)."""
    return AGGREGATIONS[name](cfg)
