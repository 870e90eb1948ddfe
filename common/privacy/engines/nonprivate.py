"""The non-private step (``dp.enabled = false``): the mean loss, no clipping, no noise.

Nothing here is private; the plan's accountant is ``none`` and the ledger records no epsilon.
"""

from __future__ import annotations

import torch
from torch import nn

from common.privacy.engines.base import StepEngine
from common.privacy.engines.rules.base import PersonGroups


class NonPrivateStep(StepEngine):
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def step(self, per_sample_loss: torch.Tensor, groups: PersonGroups | None = None) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if per_sample_loss.numel():
            per_sample_loss.mean().backward()
            self.optimizer.step()
