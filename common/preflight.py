"""Checks that need the data, run before anything starts (no run dir, no Flower)."""

from __future__ import annotations

from common.config import MAX_STEPS, RunConfig
from common.errors import ConfigError
from common.privacy.accounting import LIFETIME_ACCOUNTANT, RoundPlan, epsilon
from common.privacy.metrics_dp import metrics_mechanism
from common.privacy.plan import plan_round
from common.privacy.secagg_stats import secure_statistics
from common.progress import SILENT, Stages
from common.tasks import Task, get_task


def preflight(cfg: RunConfig, key: bytes | None = None, stages: Stages = SILENT) -> Task:
    """Load and split the data, then plan one round for every site.

    ``stages`` hears of the two slow steps: loading the data, and (with a target epsilon)
    the noise search, seconds per distinct site size (cached for the rest of the process).

    Raises ConfigError / DataError (one line, naming the key or file) for a missing or
    corrupt data file, more sites than the data can hold, or a delta >= 1/n at some site.

    A task whose sites pseudonymise with the federation key cannot be checked without
    it; the server never holds the key, so there only the config is checked and each
    site checks its own data when it starts.
    """
    stages.stage(f"loading the data ({cfg.federation.num_sites} sites) and checking the config")
    task = get_task(cfg.task)(cfg, key)
    secure_statistics(task.sum_keys(), cfg.secagg)  # SecAgg+ settings that cannot carry them exactly
    if task.needs_key and key is None:
        return task
    # The simulation launcher declares each site's n-hat = its training-split size (it made the
    # partition), so these are the sizes the sites will plan with (client.app, declared_sizes).
    sizes = task.site_sizes()
    search = cfg.dp.enabled and cfg.dp.target_epsilon > 0  # else sigma is the config's: nothing to search
    if search:
        stages.stage(
            f"choosing each site's noise σ for target ε={cfg.dp.target_epsilon:g} over {cfg.federation.rounds} "
            f"rounds ({len(set(sizes))} site sizes)"
        )
    for i, declared in enumerate(sizes, 1):
        if search:
            stages.detail(f"noise search: site {i} of {len(sizes)} (n̂={declared})")
        plan = plan_round(cfg, declared)
        if plan.steps * cfg.federation.rounds > MAX_STEPS:
            raise ConfigError(
                "train.local-epochs", f"plans {plan.steps * cfg.federation.rounds} steps per site, above {MAX_STEPS}"
            )
        try:  # the whole planned run must be accountable, or no site could ever check its budget
            planned = epsilon([plan.mechanism] * cfg.federation.rounds, plan.delta, plan.accountant)
        except (ArithmeticError, ValueError, MemoryError) as exc:
            raise ConfigError(
                "dp.noise-multiplier", f"the accountant cannot compute epsilon for this plan ({exc})"
            ) from None
        if search:
            check_target_fits_budget(cfg, plan, planned)
        if cfg.metrics.dp and cfg.dp.enabled:
            check_metrics_budget(cfg, plan, planned)
    return task


def check_target_fits_budget(cfg: RunConfig, plan: RoundPlan, planned: float) -> None:
    """dp.target-epsilon promises that every site spends its target over all the planned rounds.
    A site checks each round against its budget under the run's accountant *and* under the
    lifetime accountant (RDP, which composes every run of its dataset). PRV's tighter ε lets a
    target equal to the budget fail the RDP check rounds before the end (a run stopped after 27
    of 30). Refused here, before anything starts, naming the key to change."""
    rounds = cfg.federation.rounds
    lifetime = (
        planned
        if plan.accountant == LIFETIME_ACCOUNTANT
        else epsilon([plan.mechanism] * rounds, plan.delta, LIFETIME_ACCOUNTANT)
    )
    worst = max(planned, lifetime)
    if worst > cfg.dp.epsilon_budget:
        raise ConfigError(
            "dp.epsilon-budget",
            f"is {cfg.dp.epsilon_budget:g}, but {rounds} rounds at dp.target-epsilon {cfg.dp.target_epsilon:g} "
            f"({plan.accountant}) spend eps={lifetime:.4g} under the {LIFETIME_ACCOUNTANT} accountant that bounds "
            f"each site's lifetime budget: sites would stop before the last round; raise dp.epsilon-budget to "
            f"{worst:.4g} or more, or use dp.accountant={LIFETIME_ACCOUNTANT}",
        )


def check_metrics_budget(cfg: RunConfig, plan: RoundPlan, planned: float) -> None:
    """metrics.dp: a site's planned DP-SGD rounds composed with one metrics release per round
    must fit its budget, or the noise of the metrics makes the budget unreachable (the site
    would stop before the last round). Refused here, before anything starts."""
    rounds = cfg.federation.rounds
    release = metrics_mechanism(cfg.metrics.noise_multiplier)
    total = epsilon([plan.mechanism] * rounds + [release] * rounds, plan.delta, plan.accountant)
    if total > cfg.dp.epsilon_budget:
        raise ConfigError(
            "metrics.noise-multiplier",
            f"is {cfg.metrics.noise_multiplier:g}: {rounds} rounds of DP-SGD (eps={planned:.3g}) and "
            f"{rounds} noisy metrics releases compose to eps={total:.3g} > dp.epsilon-budget "
            f"{cfg.dp.epsilon_budget:g}; raise it, lower dp.target-epsilon, or set metrics.dp = false",
        )
