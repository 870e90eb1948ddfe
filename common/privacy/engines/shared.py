"""What both DP engines share: the model checks and Opacus's optimiser settings.

The check refuses models whose training would let un-noised information about examples
out (layers mixing examples within a batch break the per-example sensitivity ``C``;
buffers are sent without noise). The settings make Opacus's ``DPOptimizer`` add
N(0, (sigma*C)^2) per coordinate to the sum of clipped gradients and divide by the
expected batch size q*n, which is what the accountant assumes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from opacus.validators import ModuleValidator
from torch import nn

from common.errors import ConfigError
from common.privacy.accounting import RoundPlan


def noise_kwargs(plan: RoundPlan, generator: torch.Generator | None, secure_mode: bool) -> dict:
    """Opacus DPOptimizer settings shared by both engines: noise sigma*C on the sum of
    clipped gradients, then division by the expected (not realised) batch size q*n."""
    return dict(
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=plan.max_grad_norm,
        expected_batch_size=plan.sample_rate * plan.dataset_size,
        loss_reduction="mean",
        generator=generator,
        secure_mode=secure_mode,
    )


def validate_private_model(model: nn.Module) -> None:
    """Refuse models whose training would let un-noised information about examples out.

    Opacus's ModuleValidator flags layers that mix examples within a batch (BatchNorm)
    and other unsupported modules. Buffers are refused too: they are part of the state a
    site sends, and nothing noises them.
    """
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise ConfigError("dp.engine", f"model is not DP-compatible: {errors[0]}")
    buffers = [name for name, _ in model.named_buffers()]
    if buffers:
        raise ConfigError("dp.engine", f"model has buffers ({', '.join(buffers[:3])}), which DP-SGD does not noise")


def refuse_unclipped_parameters(
    model: nn.Module, engine: str, clipped: Callable[[nn.Module], frozenset[str] | None]
) -> None:
    """Refuse a trainable parameter that the engine's per-layer code would not clip.

    ``clipped(module)`` names the parameters the engine computes per-example gradients
    for in ``module`` (None: all of them). Another trainable parameter on such a layer
    (``lin.scale = nn.Parameter(...)``) would get no per-example gradient: the engine would
    release a gradient for it that is not a clipped sum, or crash mid-round. One line, naming
    the parameter by its path in the model.
    """
    for path, module in model.named_modules():
        names = clipped(module)
        if names is None:
            continue
        for pname, p in module.named_parameters(recurse=False):
            if p.requires_grad and pname not in names:
                where = f"{path}.{pname}" if path else pname
                raise ConfigError(
                    "dp.engine",
                    f"{engine} engine clips only {' and '.join(sorted(names, reverse=True))} of "
                    f"{type(module).__name__}; {where} is another trainable parameter "
                    "(freeze it, or give it a module of its own)",
                )
