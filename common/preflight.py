"""Checks that need the data, run before anything starts (no run dir, no Flower)."""

from __future__ import annotations

from common.config import MAX_STEPS, RunConfig
from common.errors import ConfigError
from common.privacy.accounting import LIFETIME_ACCOUNTANT, Mechanism, RoundPlan, epsilon, round_up
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
            epsilon([plan.mechanism] * cfg.federation.rounds, plan.delta, plan.accountant)
        except (ArithmeticError, ValueError, MemoryError) as exc:
            raise ConfigError(
                "dp.noise-multiplier", f"the accountant cannot compute epsilon for this plan ({exc})"
            ) from None
        if cfg.dp.enabled and (search or cfg.metrics.dp):
            check_plan_fits_budget(cfg, plan)
    return task


def _spend(history: list[Mechanism], plan: RoundPlan) -> float:
    """What a site's per-round check computes (client/app.py): the larger of the run's
    accountant and the lifetime accountant (RDP, which composes every run of its dataset)."""
    return max(epsilon(history, plan.delta, plan.accountant), epsilon(history, plan.delta, LIFETIME_ACCOUNTANT))


def check_plan_fits_budget(cfg: RunConfig, plan: RoundPlan) -> None:
    """The planned rounds, composed as each site composes them before every round (its DP-SGD
    rounds, plus one noisy metrics release per round under ``metrics.dp``; under the run's
    accountant *and* the lifetime accountant), must fit ``dp.epsilon-budget``. Otherwise every
    site would stop before the last round: refused here, before anything starts, naming the key.

    Checked when the run promises its rounds: with ``dp.target-epsilon`` (each site spends the
    target over all of them) or ``metrics.dp`` (whose releases must not eat the budget). A fixed
    noise multiplier without either may run out of budget by design (the budget is a cap).
    PRV's tighter ε lets a target equal to the budget fail the RDP check (a run stopped after
    27 of 30 rounds), hence both accountants."""
    rounds = cfg.federation.rounds
    budget = cfg.dp.epsilon_budget
    sgd = _spend([plan.mechanism] * rounds, plan)
    if cfg.dp.target_epsilon > 0 and sgd > budget:
        raise ConfigError(
            "dp.epsilon-budget",
            f"is {budget:g}, but {rounds} rounds at dp.target-epsilon {cfg.dp.target_epsilon:g} ({plan.accountant}) "
            f"spend eps={sgd:.4g} under the {LIFETIME_ACCOUNTANT} accountant that bounds each site's lifetime "
            f"budget: sites would stop before the last round; raise dp.epsilon-budget to {round_up(sgd, 4):g} or more, "
            f"or use dp.accountant={LIFETIME_ACCOUNTANT}",
        )
    if cfg.metrics.dp:
        release = metrics_mechanism(cfg.metrics.noise_multiplier)
        total = _spend([plan.mechanism] * rounds + [release] * rounds, plan)
        if total > budget:
            raise ConfigError(
                "metrics.noise-multiplier",
                f"is {cfg.metrics.noise_multiplier:g}: {rounds} rounds of DP-SGD (eps={sgd:.3g}) and "
                f"{rounds} noisy metrics releases compose to eps={total:.4g} > dp.epsilon-budget "
                f"{budget:g} (the larger of {plan.accountant} and the lifetime {LIFETIME_ACCOUNTANT}); raise it, raise "
                f"dp.epsilon-budget to {round_up(total, 4):g}, lower dp.target-epsilon, or set metrics.dp = false",
            )
