"""Cross-section rules: settings that are valid alone but not together.

Each section validates its own keys (:mod:`common.config.schema`); here are the rules
that read several sections (secure aggregation x central DP x aggregation x faults) or
the task plug-in's declarations (its data sources, partitions, and whether its sites
report a loss). The central-DP rule is a privacy argument: the run is
(eps, delta + p)-DP where p is the all-or-nothing probability of
:func:`common.privacy.client_level.all_or_nothing_probability`, so p must stay below delta,
under the worst case of the failures the config allows (injected dropouts, crashes, lost
uploads, sample-level budgets that run out); where no p can be bounded, the config is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from common.config.limits import AUTO_DELTA_CAP, MIN_SECURE_SITES
from common.config.limits import require as _require
from common.config.run import RunSections
from common.errors import ConfigError

# The accountants (Opacus, ~2.5 s to import) load only when a rule needs them, so a command
# that only reads a config (`privfed site init`, `site approve`) does not pay for them.


@dataclass(frozen=True)
class TaskSpec:
    """What the config needs from a task plug-in: its ``[name]`` table and its declarations.

    Each plug-in package declares one, as ``SPEC`` in its light ``common/tasks/<name>/config.py``
    (no torch), so a config is read and checked without importing any model code; the
    plug-in's Task class gets these declarations from it (``common.tasks.register_task``).
    """

    name: str
    # The dataclass of the task's own ``[name]`` table (its ``validate()`` checks it).
    config_cls: type
    # Values of data.source the task can load.
    data_sources: tuple[str, ...]
    # Values of data.partition the task understands.
    partitions: tuple[str, ...]
    # The evaluation metric that is "the" utility (lower is better), centrally and at sites.
    primary_metric: str = "loss"
    # Sites report primary_metric on their validation data, as a loss >= 0: q-fedavg
    # weighs sites by it (server.aggregation.qfedavg), and is refused for a task without it.
    site_primary_loss: bool = True
    # The data sources whose records carry a person key (``dp.unit = "user"`` is refused on
    # the others); a source may still lack one in a given file (``Task.has_person_key``).
    person_sources: tuple[str, ...] = ()


def check_rules(cfg: RunSections, task: TaskSpec) -> None:
    """Every cross-section rule; raises the first violation as a one-line ConfigError."""
    check_secure(cfg)
    check_task(cfg, task)
    check_metrics(cfg)


def check_deployment(cfg: RunSections) -> None:
    """The rules for a run under a real SuperLink, which a simulation need not follow.

    Every wait for the sites has a limit (issue 20, finding 2): with ``round-timeout = 0``
    one silent site hangs the federation for ever, and with ``secagg.timeout = 0`` (secure
    rounds only) so does one site that stops mid-protocol. A simulation's sites are this
    machine's processes, so its runs may wait without a limit (the launcher's tests do).
    The ServerApp calls this when its grid is not Flower's in-memory (simulation) grid.
    """
    fed = cfg.federation
    _require(
        fed.round_timeout > 0,
        "round-timeout",
        f"must be > 0 in a deployment (0 waits for ever on a silent site), got {fed.round_timeout:g}; "
        "the default is 900 seconds",
    )
    if cfg.secagg.enabled:
        _require(
            cfg.secagg.timeout > 0,
            "secagg.timeout",
            f"must be > 0 in a deployment (0 waits for ever on a silent site), got {cfg.secagg.timeout:g}; "
            "the default is 900 seconds",
        )


def check_metrics(cfg: RunSections) -> None:
    """metrics.dp: its releases are charged to the sites' DP-SGD ledger, so they need DP-SGD's
    accountant, and their planned spend alone must leave room in the budget.

    One release per round is (z, q = 1, 1 step); over the planned rounds their epsilon alone
    (at the largest delta a site can use, which gives the smallest epsilon) must stay below
    ``dp.epsilon-budget``, or no site could train a single round and release its metrics.
    The per-site check with the DP-SGD plan composed in is in :mod:`common.preflight`.
    """
    m, dp = cfg.metrics, cfg.dp
    if not m.dp:
        return
    _require(
        dp.enabled,
        "metrics.dp",
        "needs dp.enabled = true (the metrics releases are charged to the sites' DP-SGD ledger); "
        "set metrics.dp = false for a non-private run",
    )
    from common.privacy.accounting import epsilon
    from common.privacy.metrics_dp import metrics_mechanism

    delta = dp.delta or AUTO_DELTA_CAP
    z, q, _ = metrics_mechanism(m.noise_multiplier)
    alone = epsilon([(z, q, cfg.federation.rounds)], delta, dp.accountant)
    _require(
        alone < dp.epsilon_budget,
        "metrics.noise-multiplier",
        f"is {m.noise_multiplier:g}: {cfg.federation.rounds} noisy metrics releases alone spend eps={alone:.3g} "
        f">= dp.epsilon-budget {dp.epsilon_budget:g}; raise it (more noise) or set metrics.dp = false",
    )


def check_task(cfg: RunSections, task: TaskSpec) -> None:
    """The task's declarations against the data and aggregation settings."""
    _require(
        cfg.federation.aggregation != "q-fedavg" or task.site_primary_loss,
        "aggregation",
        f"q-fedavg weighs sites by their validation {task.primary_metric}, "
        f"which task {task.name!r} does not get from its sites",
    )
    _require(
        cfg.data.source in task.data_sources,
        "data.source",
        f"must be one of {', '.join(task.data_sources)} for task {task.name!r}, got {cfg.data.source!r}",
    )
    _require(
        not (cfg.dp.enabled and cfg.dp.unit == "user") or cfg.data.source in task.person_sources,
        "dp.unit",
        f"is user, but task {task.name!r} with data.source {cfg.data.source!r} has no person key "
        f"(user-level DP needs one: {', '.join(task.person_sources) or 'no source of this task has one'})",
    )
    # "column:NAME" is the column partition naming its column (tasks that offer "column").
    partition = cfg.data.partition
    base = "column" if partition.startswith("column:") and len(partition) > len("column:") else partition
    _require(
        base in task.partitions,
        "data.partition",
        f"must be one of {', '.join(task.partitions)} for task {task.name!r}, got {cfg.data.partition!r}",
    )


def check_secure(cfg: RunSections) -> None:
    """Settings of secure aggregation and central DP that only make sense together."""
    fed, sa, cdp = cfg.federation, cfg.secagg, cfg.central_dp
    if fed.aggregation != "fedavg":
        # Robust rules and q-fedavg need each update in the clear (q-fedavg also each
        # site's loss), and their sensitivity is not the sum's: neither SecAgg+ (the
        # server sees only the sum) nor central DP fits.
        _require(
            not sa.enabled,
            "aggregation",
            f"{fed.aggregation} needs each site's update; under secure aggregation the server sees only their sum",
        )
        _require(
            not cdp.enabled,
            "aggregation",
            f"{fed.aggregation} is not covered by the central-DP analysis, which assumes a noised sum",
        )
    if sa.enabled:
        _require(
            cfg.faults.corrupt_rate == 0,
            "faults.corrupt-rate",
            "cannot be used with secure aggregation: a corrupted masked update cannot be seen or removed "
            "(SecAgg+ assumes sites follow the protocol)",
        )
        _require(
            fed.weighting != "examples",
            "weighting",
            "must be uniform or auto under secure aggregation: SecAgg+ quantizes with a fixed absolute step, "
            "so scaling updates by small example weights would lose their precision",
        )
        # Poisson sampling (central DP) can take every site in a round.
        most = fed.num_sites if cdp.enabled else fed.sampled_per_round
        _require(
            fed.sampled_per_round >= MIN_SECURE_SITES,
            "fraction-fit",
            f"samples {fed.sampled_per_round} site(s) per round; secure aggregation needs >= {MIN_SECURE_SITES} "
            "(with 2, each site learns the other's update from the sum)",
        )
        if not cdp.enabled and sa.num_shares:
            _require(
                sa.num_shares <= most,
                "secagg.num-shares",
                f"is {sa.num_shares} but only {most} sites are sampled per round",
            )
        if sa.reconstruction_threshold:
            _require(
                sa.reconstruction_threshold < min(sa.num_shares or most, most),
                "secagg.reconstruction-threshold",
                f"is {sa.reconstruction_threshold} but a round has only {min(sa.num_shares or most, most)} shares "
                "per site: no dropout could be tolerated and the protocol refuses it",
            )
        _require(
            most * sa.quantization_range < sa.modulus_range,
            "secagg.modulus-range",
            f"is {sa.modulus_range} but {most} sites x quantization-range {sa.quantization_range} can exceed it: "
            "the masked sum would wrap around",
        )
    if cdp.enabled:
        check_all_or_nothing(cfg)
        _require(
            cfg.uniform_weights,
            "weighting",
            "must be uniform or auto with central DP (each site's weight is bounded by clip-norm)",
        )
        if sa.enabled:
            _require(
                cdp.clip_norm <= sa.clipping_range,
                "central-dp.clip-norm",
                f"is {cdp.clip_norm} but secagg.clipping-range is {sa.clipping_range}: "
                "clipped updates would be clipped again, per coordinate",
            )
        check_budget_outlasts_run(cfg)


def _why_minimum(cfg: RunSections) -> str:
    from common.privacy.client_level import min_round_sites

    m = min_round_sites(cfg)
    why = "secagg.enabled" if cfg.secagg.enabled and m == 3 else f"min-fit-sites={cfg.federation.min_fit_sites}"
    return f"central-dp.enabled releases a round's sum only with >= {m} sites ({why})"


def check_all_or_nothing(cfg: RunSections) -> None:
    """delta0, the chance that one site decides whether a round's sum is released, under the
    worst case of the failures the config allows, must stay below central-dp delta."""
    from common.privacy.client_level import all_or_nothing_probability, allowed_failures, min_round_sites

    fed = cfg.federation
    failures, fault_key = allowed_failures(cfg)
    if min_round_sites(cfg) > 1 and failures is None:
        raise ConfigError(
            fault_key,
            f"lets any number of sampled sites fail in a round, and {_why_minimum(cfg)}: one site could decide whether "
            "the others' updates are released at all, which no delta bounds (name the sites with faults.dropout-sites "
            "and keep delta0 below central-dp delta, or drop the minimum)",
        )
    flip = all_or_nothing_probability(cfg)
    delta = cfg.central_dp.site_delta(fed.num_sites)
    failing = f" and up to {failures} sampled site(s) failing ({fault_key})" if failures else ""
    _require(
        flip <= delta,
        fault_key or "fraction-fit",
        f"with num-sites={fed.num_sites}, fraction-fit={fed.fraction_fit:g}{failing}, one site decides with "
        f"probability {flip:.2g} over {fed.rounds} rounds whether a round's sum is released at all "
        f"({_why_minimum(cfg)}); that must stay below central-dp delta={delta:.2g}: "
        + ("allow fewer failures" if failures else "sample more sites"),
    )


def check_budget_outlasts_run(cfg: RunSections) -> None:
    """With all-or-nothing rounds, a site whose sample-level budget runs out mid-run stops
    contributing, and then its presence can decide a round: the config must rule that out."""
    from common.privacy.client_level import min_round_sites

    dp = cfg.dp
    if min_round_sites(cfg) <= 1 or not dp.enabled or dp.target_epsilon or math.isinf(dp.epsilon_budget):
        return
    raise ConfigError(
        "dp.target-epsilon",
        f"is 0, and {_why_minimum(cfg)}: a site whose dp.epsilon-budget runs out before the last round stops "
        "contributing and can then decide whether a round is released; set dp.target-epsilon (<= dp.epsilon-budget, "
        "so no site runs out) or dp.enabled=false",
    )
