"""The update pipeline: an ordered list of stages, run forward at the site, in reverse at the server.

Shaped like pfl-research's postprocessor chain: each transform of an update is one
:class:`Stage`, with a site-side method and server-side methods. The list itself is built in
one place, :func:`common.pipeline.build.build_pipeline`, which is where the privacy-critical
order can be read; a new feature is a new entry there, not a new ``if`` in the client or the
strategy.

Server side there are three moments, because the server sees different things:

* :meth:`Stage.check`: one reply's update, in plain rounds only (under SecAgg+ the server
  sees only the sum);
* :meth:`Stage.server`: the round's aggregate as Flower hands it over (SecAgg+: the
  unmasked mean), before it is validated and staged;
* :meth:`Stage.release`: the staged sum when the round ends (``end_fit``), turned into the
  step added to the global model.

Each runs over the list in reverse, so a stage undoes (or accounts for) what it did at the
site after the stages that ran after it there have been undone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class SiteUpdate:
    """What a site is about to send: the update (a delta), its weight, and extra arrays."""

    arrays: list[np.ndarray]
    num_examples: int
    extras: list[np.ndarray] = field(default_factory=list)  # appended after the update (evaluation sums)

    def payload(self) -> list[np.ndarray]:
        return self.arrays + self.extras


@dataclass
class SiteContext:
    """What the site-side stages may know about the round."""

    site_index: int
    server_round: int
    # False for a budget-exhausted site's zero update: it only carries its evaluation sums.
    trained: bool = True
    # The site's evaluation of the model it received, before training (or None).
    evaluate: Callable[[], dict[str, float]] | None = None
    is_sum_key: Callable[[str], bool] | None = None
    sums: list[np.ndarray] = field(default_factory=list)  # filled by before_training
    # metrics.dp: the noise generator of this release, whether the site's budget allows it,
    # and the release itself (common.privacy.metrics_dp.NoisyMetrics, set by the metrics_dp stage).
    metrics_rng: np.random.Generator | None = None
    metrics_allowed: bool = True
    release: Any = None


@dataclass
class Aggregate:
    """The server's view of a round's updates: a sum (or a rule's result) and its divisor."""

    arrays: list[np.ndarray]
    divisor: float = 1.0
    count: int = 0  # replies in a secure sum (Flower hands over their mean)


@dataclass
class ServerContext:
    """What the server-side stages may know about the round."""

    round: int
    global_arrays: list[np.ndarray]
    failures: list[str] = field(default_factory=list)
    sums: dict[str, float] | None = None  # evaluation sums split off a secure aggregate
    sums_std: dict[str, float] | None = None  # their noise std under metrics.dp (the report's error bars)
    central: Any = None  # the client-level DP release (plan, per-round noise generator), or None


class Stage:
    """One transform of an update. Every method defaults to doing nothing."""

    name = "stage"

    def before_training(self, ctx: SiteContext) -> None:
        """At the site, before local training changes the model it received."""

    def site(self, update: SiteUpdate, ctx: SiteContext) -> SiteUpdate:
        return update

    def check(self, arrays: list[np.ndarray], num_examples: int, dataset_size: int, ctx: ServerContext) -> str:
        """Why one site's update (plain rounds) cannot be aggregated, or ''."""
        return ""

    def check_round(self, usable: dict[str, tuple[list[np.ndarray], float]], rejected: dict[str, str]) -> None:
        """Round-level checks over every usable update; drops from ``usable`` into ``rejected``."""

    def server(self, agg: Aggregate, ctx: ServerContext) -> Aggregate:
        return agg

    def release(self, agg: Aggregate, ctx: ServerContext) -> Aggregate:
        return agg


class Pipeline:
    """The ordered stages; site methods run forward, server methods in reverse."""

    def __init__(self, stages: list[Stage]) -> None:
        self.stages = list(stages)

    def __iter__(self) -> Iterator[Stage]:
        return iter(self.stages)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.stages]

    def get(self, name: str) -> Any:
        """The stage called ``name``, or None when this run's pipeline does not have it."""
        return next((s for s in self.stages if s.name == name), None)

    def before_training(self, ctx: SiteContext) -> None:
        for stage in self.stages:
            stage.before_training(ctx)

    def site(self, update: SiteUpdate, ctx: SiteContext) -> SiteUpdate:
        for stage in self.stages:
            update = stage.site(update, ctx)
        return update

    def check(self, arrays: list[np.ndarray], num_examples: int, dataset_size: int, ctx: ServerContext) -> str:
        for stage in reversed(self.stages):
            reason = stage.check(arrays, num_examples, dataset_size, ctx)
            if reason:
                return reason
        return ""

    def check_round(self, usable: dict[str, tuple[list[np.ndarray], float]], rejected: dict[str, str]) -> None:
        for stage in reversed(self.stages):
            stage.check_round(usable, rejected)

    def server(self, agg: Aggregate, ctx: ServerContext) -> Aggregate:
        for stage in reversed(self.stages):
            agg = stage.server(agg, ctx)
        return agg

    def release(self, agg: Aggregate, ctx: ServerContext) -> Aggregate:
        for stage in reversed(self.stages):
            agg = stage.release(agg, ctx)
        return agg
