"""``dp.engine = opacus``: Opacus's hooks-based per-sample gradients and ``DPOptimizer``.

The reference implementation, and the fallback for layers the fast engine does not
support. Opacus computes every per-example gradient, clips each to ``C`` over all
parameters jointly (sensitivity ``C``), sums, adds N(0, (sigma*C)^2 I) and divides by q*n.

Like the fast engine, it captures only forwards in training mode with grad enabled: a task
may run the private module in eval mode outside the DP step (the GAN's steps on generated
images), and those backward passes are plain autograd. Opacus's forward hook already skips
eval mode; its backward hook did not, and popped an activation that was never stored
(``IndexError: pop from empty list``). Before each optimiser step the engine checks that
the per-example gradients account for the whole gradient: a parameter used outside its
module's forward (``F.linear(h, emb.weight)``) has a gradient path no hook sees, which
Opacus would silently drop, so it is refused.
"""

from __future__ import annotations

import warnings

import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from torch import nn

from common.errors import ConfigError
from common.privacy.accounting import RoundPlan
from common.privacy.engines.base import StepEngine, register_engine
from common.privacy.engines.rules.base import PersonGroups
from common.privacy.engines.shared import noise_kwargs, refuse_unclipped_parameters, validate_private_model

# Torch warns when a full backward hook fires and no input of the module requires grad (the
# data never does; the GAN's label embedding on generated images). Opacus's hooks only need
# the output gradient, so the warning is noise in a site's log, wherever the backward runs.
warnings.filterwarnings(
    "ignore", message="Full backward hook is firing when gradients are computed with respect to module outputs"
)

# Relative tolerance of "the per-example gradients sum to autograd's gradient": float32
# summation error is ~1e-6 of the summed per-example norms; a dropped path is not.
_SUM_RTOL = 1e-3


class _TrainModeGradSampleModule(GradSampleModule):
    """Opacus's ``GradSampleModule`` whose backward hook, like its forward hook, skips a
    module in eval mode (whose forward stored no activations)."""

    def capture_backprops_hook(self, module, _forward_input, forward_output, loss_reduction, batch_first):
        if not module.training:
            return
        if self.hooks_enabled and not getattr(module, "activations", None):
            raise RuntimeError(
                f"opacus DP engine: a {type(module).__name__} layer ran backward in training mode without a "
                "training-mode forward (do not switch a module's mode between forward and backward)"
            )
        super().capture_backprops_hook(module, _forward_input, forward_output, loss_reduction, batch_first)


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
        # Opacus's hand-written per-layer samplers compute weight and bias only; modules
        # without one get functorch per-sample gradients of every parameter.
        refuse_unclipped_parameters(
            model,
            "opacus",
            lambda m: frozenset({"weight", "bias"}) if type(m) in GradSampleModule.GRAD_SAMPLERS else None,
        )
        # loss_reduction="sum": we backward the summed per-example losses, so the
        # captured per-sample gradients need no rescaling.
        self.gsm = _TrainModeGradSampleModule(model, batch_first=True, loss_reduction="sum")
        self.optimizer = DPOptimizer(optimizer, **noise_kwargs(plan, generator, secure_mode))
        names = {id(p): name for name, p in model.named_parameters()}
        self.named = [(names[id(p)], p) for p in self.optimizer.params]

    def step(self, per_sample_loss: torch.Tensor, groups: PersonGroups | None = None) -> None:
        if groups is not None:  # the config refuses this pairing; never clip per example by mistake
            raise ConfigError("dp.engine", "opacus clips per example; user-level DP (dp.unit = user) needs fast")
        self.optimizer.zero_grad(set_to_none=True)
        per_sample_loss.sum().backward()
        self._check_captured()
        self.optimizer.step()

    def _check_captured(self) -> None:
        """Refuse a step whose per-example gradients do not account for the whole gradient."""
        for module in self.gsm.modules():
            left = getattr(module, "activations", None)
            if left:
                left.clear()
                raise RuntimeError(
                    f"opacus DP engine: a {type(module).__name__} layer ran forward in training mode without its "
                    "output reaching the DP loss (run other forwards in eval mode)"
                )
        for name, p in self.named:
            gs = getattr(p, "grad_sample", None)
            if p.grad is None:
                continue
            if not isinstance(gs, torch.Tensor):
                raise RuntimeError(f"opacus DP engine: {name} got a gradient but no per-example gradient")
            with torch.no_grad():
                gap = float((gs.sum(0) - p.grad).norm())
                scale = float(gs.flatten(1).norm(dim=1).sum())
            if gap > _SUM_RTOL * scale + 1e-12:
                raise RuntimeError(
                    f"opacus DP engine: {name} is used outside its module's forward (e.g. F.linear(h, emb.weight)); "
                    "per-example clipping cannot see that use, so use the parameter only through its module"
                )

    def close(self) -> None:
        self.gsm._close()
