"""Stop once no privacy budget can cover another round.

The decision is the strategy's (``DeltaFedAvg.should_stop``: every site out of its
sample-level ε budget, or the client-level budget refusing another release); this
callback turns it into the stop and its message. Stopping only ever spends less privacy.
"""

from __future__ import annotations

from typing import Protocol

from common.config import RunConfig
from server.callbacks import RoundOutcome, RunCallback


class BudgetState(Protocol):
    central_exhausted: bool

    def should_stop(self) -> bool: ...


class BudgetStop(RunCallback):
    def __init__(self, cfg: RunConfig, strategy: BudgetState) -> None:
        self.cfg, self.strategy = cfg, strategy

    def stop_reason(self, out: RoundOutcome) -> str | None:
        if not self.strategy.should_stop():
            return None
        if self.strategy.central_exhausted:
            budget = self.cfg.central_dp.epsilon_budget
            return f"another round would exceed the client-level ε budget (central-dp.epsilon-budget={budget:g})"
        budget = self.cfg.dp.epsilon_budget
        return f"no site can train another round within its ε budget (dp.epsilon-budget={budget:g})"

    def run_stop_reason(self) -> str:
        return "budgets exhausted" if self.strategy.should_stop() else ""
