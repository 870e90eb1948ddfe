"""DP-SGD step engines: one optimiser step from a batch's per-example losses.

Exact DP-SGD semantics, whichever engine runs:
  1. the batch is a Poisson sample (each example independently with rate q; Opacus's
     ``UniformWithReplacementSampler``, see :mod:`common.privacy.training`);
  2. each example's gradient is clipped to L2 norm ``C`` (over all parameters jointly);
  3. the clipped gradients are summed, Gaussian noise N(0, (sigma*C)^2 I) is added
     (Opacus's ``DPOptimizer`` noise code), and the sum is divided by the expected
     batch size q*n before the optimiser step.

Engines (``dp.engine``; the interface and registry are in :mod:`.base`):
  * ``fast`` (default, :mod:`.fast`): privfed's fused single-backward clipping for models
    built from the layer types in :mod:`.rules` (``nn.Linear``, ``nn.Embedding``).
  * ``opacus`` (:mod:`.opacus_hooks`): Opacus's ``GradSampleModule`` (hooks) +
    ``DPOptimizer``; the reference implementation, and the fallback for other layers.
A plan without noise (``dp.enabled = false``) gets :class:`.nonprivate.NonPrivateStep`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from common.privacy.accounting import NO_DP, RoundPlan
from common.privacy.engines.base import ENGINES, StepEngine, register_engine
from common.privacy.engines.fast import FastDPStep
from common.privacy.engines.nonprivate import NonPrivateStep
from common.privacy.engines.opacus_hooks import OpacusDPStep
from common.privacy.engines.shared import validate_private_model

__all__ = [
    "ENGINES",
    "FastDPStep",
    "NonPrivateStep",
    "OpacusDPStep",
    "StepEngine",
    "make_engine",
    "register_engine",
    "validate_private_model",
]


def make_engine(
    name: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    plan: RoundPlan,
    generator: torch.Generator | None = None,
    secure_mode: bool = False,
    person_local: Sequence[nn.Module] = (),
) -> StepEngine:
    """The step engine for a round: non-private when the plan has no noise. ``person_local``:
    user-level DP's per-person site-local layers, which the engine leaves alone (fast only)."""
    if plan.accountant == NO_DP:
        return NonPrivateStep(model, optimizer)
    if person_local:
        return ENGINES[name](
            model, optimizer, plan, generator=generator, secure_mode=secure_mode, person_local=person_local
        )
    return ENGINES[name](model, optimizer, plan, generator=generator, secure_mode=secure_mode)
