"""An independent check of the ledger's ε that does not trust the code that produced it.

:func:`cross_check` recomputes each site's cumulative epsilon from the ledger's recorded
inputs (sigma, q, steps per round) with Google's ``dp-accounting`` PLD accountant (an
independent, tight numerical accountant) and flags a recorded epsilon that is *lower*
than that by more than a tolerance, i.e. an under-statement. It reads only the ledger.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from common.privacy.accounting import NO_DP, _merge
from server.ledger import LedgerRow

# The recorded epsilon may fall below the independent PLD value by at most this much
# (PLD discretisation). Above it is fine: RDP is an upper bound, normally a looser one.
TOLERANCE = 0.05


@dataclass(frozen=True)
class CrossCheck:
    site_id: str
    accountant: str
    delta: float
    eps_recorded: float
    eps_independent: float
    method: str

    @property
    def shortfall(self) -> float:
        """Signed: how far the recorded epsilon lies *below* the independent one (>0 is bad)."""
        if math.isinf(self.eps_recorded):
            return 0.0  # nothing is under-stated by an infinite claim
        if math.isinf(self.eps_independent):
            return 1.0  # a finite claim where the independent accountant says infinite
        return (self.eps_independent - self.eps_recorded) / max(abs(self.eps_independent), 1e-12)

    @property
    def ok(self) -> bool:
        """One-sided: a ledger may over-state epsilon (RDP does), never under-state it."""
        return self.shortfall <= TOLERANCE


def independent_epsilon(history: list[tuple[float, float, int]], delta: float) -> tuple[float, str]:
    """Epsilon of a site's (sigma, q, steps) history with dp-accounting's PLD accountant.

    PLD (privacy loss distributions) is a tight numerical accountant implemented
    independently of Opacus, so it checks both the arithmetic and the method: a recorded
    RDP or PRV epsilon below it would be an under-statement.
    """
    import dp_accounting
    from dp_accounting.pld import PLDAccountant

    hist = _merge([(s, q, k) for s, q, k in history if k > 0])
    if not hist:
        return 0.0, "none"
    events = [
        dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(s)), k)
        for s, q, k in hist
    ]
    from dp_accounting.privacy_accountant import NeighboringRelation

    # The relation every ledger row names (``add-remove``; Ledger.verify fails any other).
    acc = PLDAccountant(NeighboringRelation.ADD_OR_REMOVE_ONE)
    acc.compose(dp_accounting.ComposedDpEvent(events))
    return float(acc.get_epsilon(delta)), "dp-accounting PLD"


def cross_check(rows: list[LedgerRow]) -> list[CrossCheck]:
    """One check per site, on its final cumulative epsilon (private sites only)."""
    histories: dict[str, list[tuple[float, float, int]]] = {}
    last: dict[str, LedgerRow] = {}
    for r in rows:
        if r.accountant == NO_DP:
            continue
        histories.setdefault(r.site_id, []).append((r.noise_multiplier, r.sample_rate, r.steps))
        last[r.site_id] = r
    out = []
    for site, row in sorted(last.items()):
        eps, method = independent_epsilon(histories[site], row.delta)
        out.append(CrossCheck(site, row.accountant, row.delta, row.eps_total, eps, method))
    return out
