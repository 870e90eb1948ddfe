"""A site's DP plan for one round: Poisson rate, steps, noise multiplier and delta.

The plan is the accountant's whole input (:class:`common.privacy.accounting.RoundPlan`):
the ledger records it, the budget check spends it, and the step engines
(:mod:`common.privacy.engines`) and the sampler (:mod:`common.privacy.training`) carry it
out. Sensitivity: each noisy step releases a sum of per-example gradients clipped to
``max_grad_norm``, so one example changes it by at most ``C``; sigma is in units of ``C``.

Neighbouring relation: add or remove one example (under ``dp.unit = "user"``: one person,
all of their records; n-hat then counts persons and q samples persons). It holds because the plan depends on
the site's *declared* size n-hat only, a public constant fixed before the run, never on
the real number of records n: adding or removing a record changes the Poisson samples
and nothing else (docs/PRIVACY.md, "Dataset sizes are public by declaration").
"""

from __future__ import annotations

import math

from common.config import MAX_STEPS, RunConfig
from common.errors import ConfigError
from common.privacy.accounting import (  # noqa: F401  (known_noise, remember_noise: re-exported)
    NO_DP,
    NoiseKey,
    RoundPlan,
    auto_delta,
    cached_noise_for_target,
    known_noise,
    remember_noise,
)


def plan_round(cfg: RunConfig, declared_size: int) -> RoundPlan:
    """A site's accountant inputs for one round, from the config and its declared size n-hat.

    q = batch_size / n-hat (Poisson rate over the site's real records), steps =
    ceil(local_epochs / q), delta = dp.delta or auto_delta(n-hat). With a target epsilon,
    sigma is chosen so that ``rounds * steps`` such steps spend exactly the target. Pass
    n-hat, never ``len(train_data)``: the plan is sent and ledgered.
    """
    n = declared_size
    q = min(1.0, cfg.train.batch_size / n)
    ratio = cfg.train.local_epochs / q
    if not math.isfinite(ratio) or ratio > MAX_STEPS:
        raise ConfigError("train.local-epochs", f"gives more than {MAX_STEPS} steps per round at q={q:.3g}")
    steps = max(1, math.ceil(ratio))
    dp = cfg.dp
    if not dp.enabled:
        return RoundPlan(n, q, steps, 0.0, 0.0, 0.0, NO_DP)
    delta = dp.delta or auto_delta(n)
    unit = "person" if dp.unit == "user" else "record"
    if delta >= 1.0 / n:
        raise ConfigError(
            "dp.delta", f"is {delta:g} but must be < 1/n = {1.0 / n:.3g} for a site with n={n} {unit}s (declared)"
        )
    if dp.target_epsilon > 0:
        sigma = _cached_noise(dp.target_epsilon, delta, q, steps * cfg.federation.rounds, dp.accountant)
    else:
        sigma = dp.noise_multiplier
    return RoundPlan(n, q, steps, sigma, dp.max_grad_norm, delta, dp.accountant)


def check_real_size(plan: RoundPlan, real_size: int) -> None:
    """Refuse, at the site and before training, a real size the plan's delta does not cover.

    delta must stay below 1/n for the real n (a mechanism that publishes one random record
    is (0, 1/n)-DP), and delta came from n-hat. The message names the key and never the
    real n: it can reach the coordinator as the site's failure.
    """
    if plan.accountant != NO_DP and plan.delta * real_size >= 1.0:
        raise ConfigError(
            "declared-size",
            f"is too far below this site's real training-set size for delta={plan.delta:g} (delta must be < 1/n): "
            "declare a size closer to the real one, or set a smaller dp.delta (docs/PRIVACY.md)",
        )


# The noise search is cached in common.privacy.accounting (one cache for sample- and
# client-level DP); known_noise / remember_noise are re-exported from there.
def _cached_noise(target: float, delta: float, q: float, steps: int, accountant: str) -> float:
    try:
        return cached_noise_for_target(target, delta, q, steps, accountant)
    except ValueError as exc:  # Opacus: "The privacy budget is too low."
        raise ConfigError(
            "dp.target-epsilon", f"{target:g} is not reachable with q={q:.3g} over {steps} steps ({exc})"
        ) from None
