"""Checks that need the data, run before anything starts (no run dir, no Flower)."""

from __future__ import annotations

from common.config import MAX_STEPS, RunConfig
from common.errors import ConfigError
from common.privacy.accounting import epsilon
from common.privacy.plan import plan_round
from common.privacy.secagg_stats import secure_statistics
from common.tasks import Task, get_task


def preflight(cfg: RunConfig, key: bytes | None = None) -> Task:
    """Load and split the data, then plan one round for every site.

    Raises ConfigError / DataError (one line, naming the key or file) for a missing or
    corrupt data file, more sites than the data can hold, or a delta >= 1/n at some site.

    A task whose sites pseudonymise with the federation key cannot be checked without
    it; the server never holds the key, so there only the config is checked and each
    site checks its own data when it starts.
    """
    task = get_task(cfg.task)(cfg, key)
    secure_statistics(task.sum_keys(), cfg.secagg)  # SecAgg+ settings that cannot carry them exactly
    if task.needs_key and key is None:
        return task
    # The simulation launcher declares each site's n-hat = its training-split size (it made the
    # partition), so these are the sizes the sites will plan with (client.app, declared_sizes).
    for declared in task.site_sizes():
        plan = plan_round(cfg, declared)
        if plan.steps * cfg.federation.rounds > MAX_STEPS:
            raise ConfigError(
                "train.local-epochs", f"plans {plan.steps * cfg.federation.rounds} steps per site, above {MAX_STEPS}"
            )
        try:  # the whole planned run must be accountable, or no site could ever check its budget
            epsilon([plan.mechanism] * cfg.federation.rounds, plan.delta, plan.accountant)
        except (ArithmeticError, ValueError, MemoryError) as exc:
            raise ConfigError(
                "dp.noise-multiplier", f"the accountant cannot compute epsilon for this plan ({exc})"
            ) from None
    return task
