"""The server's half of client-level DP: budget, the ledger row, and the per-round noise generator.

The mechanism itself (noise, then /qN) is the client-level DP stage of the update pipeline
(common.pipeline.stages.client_level_dp); this class holds what needs the ledger.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from common.config import RunConfig
from common.identifiers import CENTRAL_SITE_ID
from common.privacy.accounting import RoundPlan
from common.privacy.client_level import CENTRAL_UNIT, central_plan
from common.seeds import RNG_OS, RNG_SEEDED, central_noise_rng
from server.ledger import Ledger, LedgerRow, SiteSpend


def noise_rng(cfg: RunConfig, rnd: int) -> np.random.Generator:
    """Central-DP noise of one round: seeded for reproducible simulations, OS entropy with
    dp.secure-rng. Derived per round, so a resumed run never repeats an earlier round's noise."""
    if cfg.dp.secure_rng:
        return np.random.default_rng()
    return central_noise_rng(cfg.federation.seed, rnd)


class CentralRelease:
    """Adds N(0, (zC)^2) to each round's sum and divides by the expected sample, q N."""

    def __init__(
        self,
        plan: RoundPlan,
        budget: float,
        rng: np.random.Generator | Callable[[int], np.random.Generator],
        rng_kind: str,
    ) -> None:
        """``rng``: one generator, or a function giving each round its own (see :func:`noise_rng`);
        ``rng_kind``: what it draws from (the ledger row's ``rng``)."""
        self.plan = plan
        self.budget = budget
        self.rng = rng
        self.rng_kind = rng_kind

    @classmethod
    def from_config(cls, cfg: RunConfig) -> CentralRelease:
        kind = RNG_OS if cfg.dp.secure_rng else RNG_SEEDED
        return cls(central_plan(cfg), cfg.central_dp.epsilon_budget, lambda rnd: noise_rng(cfg, rnd), kind)

    @property
    def clip_norm(self) -> float:
        return self.plan.max_grad_norm

    def noise_rng(self, rnd: int) -> np.random.Generator:
        return self.rng(rnd) if callable(self.rng) else self.rng

    def can_release(self, ledger: Ledger) -> bool:
        """Whether one more round stays within the central budget."""
        p = self.plan
        return ledger.projected_total(CENTRAL_SITE_ID, p.mechanism, p.delta, p.accountant) <= self.budget

    def ledger_row(self, rnd: int, ledger: Ledger, *, empty: bool) -> LedgerRow:
        """Ledger the round's mechanism, whatever the sample: it runs every round, including
        rounds in which no site (or too few for SecAgg+) took part (``empty``)."""
        spend = SiteSpend(
            site_id=CENTRAL_SITE_ID,
            unit=CENTRAL_UNIT,
            plan=self.plan,
            steps_taken=1,
            eps_budget=self.budget,
            used=not empty,
            status="noise_only" if empty else "released",
            rng=self.rng_kind,
            mechanism="dp-fedavg",
        )
        (row,) = ledger.record_round(rnd, [spend])
        return row
