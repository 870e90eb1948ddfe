"""Checks that need the data, run before anything starts (no run dir, no Flower)."""

from __future__ import annotations

from common.config import RunConfig
from common.dp import plan_round
from common.tasks import Task, get_task


def preflight(cfg: RunConfig) -> Task:
    """Load and split the data, then plan one round for every site.

    Raises ConfigError / DataError (one line, naming the key or file) for a missing or
    corrupt data file, more sites than the data can hold, or a delta >= 1/n at some site.
    """
    task = get_task(cfg.task)(cfg)
    for n in task.site_sizes():
        plan_round(cfg, n)
    return task
