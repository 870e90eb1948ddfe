"""The aggregation-rule interface and registry (Opacus-style: a dict, a decorator, one file per rule).

A rule turns the round's usable plain updates into a :class:`Staged` result: a sum with its
divisor (FedAvg), or a finished step with divisor 1 (the robust and fair rules). Under
SecAgg+ no rule runs: the server sees only the sum.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

# {site: (update arrays, weight)}
Usable = dict[str, tuple[list[np.ndarray], float]]


@dataclass
class Staged:
    """A round's validated sum of updates, waiting for end_fit."""

    sites: list[str]
    total: list[np.ndarray]  # weighted sum of the sites' updates (or a rule's step)
    divisor: float  # sum of the weights (1 for a rule's step)


@dataclass
class RoundInputs:
    """What a rule may use besides the updates."""

    round: int
    global_arrays: list[np.ndarray]
    site_val: dict[int, dict[str, dict[str, float]]]  # {round: {site: validation metrics}}
    primary_metric: str


class Aggregation:
    """One rule. ``cfg`` is the run config; ``aggregate`` gets the sites in sorted order."""

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg

    def aggregate(self, sites: list[str], usable: Usable, inputs: RoundInputs) -> tuple[Staged | None, str]:
        raise NotImplementedError


AGGREGATIONS: dict[str, type[Aggregation]] = {}


def register_aggregation(*names: str) -> Callable[[type[Aggregation]], type[Aggregation]]:
    def add(cls: type[Aggregation]) -> type[Aggregation]:
        for name in names:
            AGGREGATIONS[name] = cls
        return cls

    return add


def as_model_dtypes(step: list[np.ndarray], global_arrays: list[np.ndarray]) -> list[np.ndarray]:
    return [np.asarray(a, dtype=g.dtype) for a, g in zip(step, global_arrays)]
