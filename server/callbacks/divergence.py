"""Failure detection: a round in which every site that trained sent NaN or Inf.

Such a round has no usable update, and the next would start from the same model: the
run has diverged. The round's privacy spend is already in the ledger; the round loop
writes its metrics line and keeps the last good checkpoint. (A GAN's total mode collapse
is detected by the task's evaluation, ``common.tasks.gan``, which raises the same
TrainingFailure from inside the round.)
"""

from __future__ import annotations

from common.errors import TrainingFailure
from server.callbacks import RoundOutcome, RunCallback


class Divergence(RunCallback):
    def round_failure(self, out: RoundOutcome) -> TrainingFailure | None:
        rec = out.record
        diverged = [s for s, why in rec.rejected.items() if "NaN or Inf" in why]
        if rec.trained and not rec.aggregated and len(diverged) == len(rec.trained):
            return TrainingFailure(f"training diverged in round {out.rnd}: every site's update contains NaN or Inf")
        return None
