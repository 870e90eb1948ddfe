"""The server's half of client-level DP: noise, budget and the ledger row (see common.privacy.client_level)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from common.privacy.accounting import RoundPlan
from common.privacy.client_level import CENTRAL_SITE_ID, CENTRAL_UNIT, add_noise
from server.ledger import Ledger, LedgerRow, SiteSpend


class CentralRelease:
    """Adds N(0, (zC)^2) to each round's sum and divides by the expected sample, q N."""

    def __init__(
        self, plan: RoundPlan, budget: float, rng: np.random.Generator | Callable[[int], np.random.Generator]
    ) -> None:
        """``rng``: one generator, or a function giving each round its own (see server.app)."""
        self.plan = plan
        self.budget = budget
        self.rng = rng

    @property
    def clip_norm(self) -> float:
        return self.plan.max_grad_norm

    @property
    def expected_sites(self) -> float:
        return self.plan.sample_rate * self.plan.dataset_size

    def can_release(self, ledger: Ledger) -> bool:
        """Whether one more round stays within the central budget."""
        p = self.plan
        return ledger.projected_total(CENTRAL_SITE_ID, p.mechanism, p.delta, p.accountant) <= self.budget

    def release(
        self, rnd: int, total: list[np.ndarray], ledger: Ledger, *, empty: bool
    ) -> tuple[list[np.ndarray], LedgerRow]:
        """Ledger the round's mechanism, then return the noised step (sum + noise) / (q N).

        ``empty``: no sum this round (nobody, or too few, took part); the noise is released alone.

        The row is written first and whatever the sample: the mechanism runs every round,
        including rounds in which no site (or too few for SecAgg+) took part.
        """
        spend = SiteSpend(
            site_id=CENTRAL_SITE_ID,
            unit=CENTRAL_UNIT,
            plan=self.plan,
            steps_taken=1,
            eps_budget=self.budget,
            used=not empty,
            status="noise_only" if empty else "released",
        )
        (row,) = ledger.record_round(rnd, [spend])
        rng = self.rng(rnd) if callable(self.rng) else self.rng
        noisy = add_noise(total, self.plan.noise_multiplier * self.clip_norm, rng)
        return [n / self.expected_sites for n in noisy], row
