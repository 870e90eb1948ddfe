"""Run policies the round loop consults at the end of each round and of the run.

The recorder (:mod:`server.recorder`) only writes; what a round *means* is decided here,
one policy per module: :mod:`.budget_stop` (stop once no budget covers another round),
:mod:`.divergence` (every site's update was NaN/Inf: the run fails) and
:mod:`.membership_inference` (the loss-threshold attack, per round and at the end).
:class:`server.workflow.RoundLoop` calls them in this order each round: ``round_metrics``
(extra keys for the metrics line), ``round_failure`` (the line is then written without a
checkpoint, and the failure raised), ``stop_reason`` (after the round is recorded).
A callback only reads what it is given; the round's record is the strategy's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from common.errors import TrainingFailure

if TYPE_CHECKING:
    import torch

    from server.ledger import Ledger
    from server.strategy import RoundRecord


@dataclass(frozen=True)
class RoundOutcome:
    """Round ``rnd`` as the server ended it: its record, the global model after it, the ledger."""

    rnd: int
    record: RoundRecord
    model: torch.nn.Module
    ledger: Ledger


class RunCallback:
    """A run policy; every hook defaults to "nothing to add"."""

    def round_metrics(self, out: RoundOutcome) -> dict[str, Any]:
        """Extra keys for round ``out.rnd``'s metrics line."""
        return {}

    def round_failure(self, out: RoundOutcome) -> TrainingFailure | None:
        """A failure that ends the run after this round (its line is still written, no checkpoint)."""
        return None

    def stop_reason(self, out: RoundOutcome) -> str | None:
        """Why the run stops cleanly after this (recorded) round, or None to go on."""
        return None

    def run_stop_reason(self) -> str:
        """The summary's stop reason once the run is over ("" when it ran all its rounds)."""
        return ""

    def run_metrics(self, model: torch.nn.Module, ledger: Ledger, failure: TrainingFailure | None) -> dict[str, float]:
        """Metrics of the final model for the summary (e.g. membership inference)."""
        return {}
