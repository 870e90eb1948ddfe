"""``dp.engine = opacus``: Opacus's hooks-based per-sample gradients and ``DPOptimizer``.

The reference implementation, and the fallback for layers the fast engine does not
support. Opacus computes every per-example gradient, clips each to ``C`` over all
parameters jointly (sensitivity ``C``), sums, adds N(0, (sigma*C)^2 I) and divides by q*n.
"""

from __future__ import annotations

import warnings

import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from torch import nn

from common.privacy.accounting import RoundPlan
from common.privacy.engines.base import StepEngine, register_engine
from common.privacy.engines.shared import noise_kwargs, validate_private_model


@register_engine("opacus")
class OpacusDPStep(StepEngine):
    """Opacus's hooks-based per-sample gradients and ``DPOptimizer`` (the reference)."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        plan: RoundPlan,
        generator: torch.Generator | None = None,
        secure_mode: bool = False,
    ) -> None:
        validate_private_model(model)
        # loss_reduction="sum": we backward the summed per-example losses, so the
        # captured per-sample gradients need no rescaling.
        self.gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
        self.optimizer = DPOptimizer(optimizer, **noise_kwargs(plan, generator, secure_mode))

    def step(self, per_sample_loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            # Inputs (data) never require grad; Opacus's hooks are correct regardless.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            per_sample_loss.sum().backward()
        self.optimizer.step()

    def close(self) -> None:
        self.gsm._close()
