"""Loss-threshold membership inference on the global model, every few rounds and at the end.

Simulation only: the attack needs the server-held test split as non-members and reads
the sites' training data as members (:mod:`server.membership_inference`). Its result is
compared with the bound the ledger's largest ε implies; it spends no privacy (the server
already holds both sets in a simulation) and never changes the model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from common.config import RunConfig
from common.errors import TrainingFailure
from common.tasks import Task
from server.callbacks import RoundOutcome, RunCallback
from server.ledger import Ledger
from server.membership_inference import mia_for_run


class MembershipInference(RunCallback):
    def __init__(self, cfg: RunConfig, task: Task, *, at_end: bool, aggregated_any: Callable[[], bool]) -> None:
        """``at_end``: attack the final model (needs central evaluation's test split);
        ``aggregated_any()``: whether any round changed the model (else there is nothing to attack)."""
        self.cfg, self.task = cfg, task
        self.at_end, self.aggregated_any = at_end, aggregated_any

    def round_metrics(self, out: RoundOutcome) -> dict[str, Any]:
        every = self.cfg.audit.mia_every
        if self.cfg.audit.mia and every and out.rnd % every == 0 and self.task.server_test_data() is not None:
            return {"mia": mia_for_run(self.task, out.model, out.ledger.rows(), self.cfg.federation.seed)}
        return {}

    def run_metrics(self, model: torch.nn.Module, ledger: Ledger, failure: TrainingFailure | None) -> dict[str, float]:
        if failure is None and self.cfg.audit.mia and self.at_end and self.aggregated_any():
            return mia_for_run(self.task, model, ledger.rows(), self.cfg.federation.seed)
        return {}
