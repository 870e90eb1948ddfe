"""DP-SGD step engines and the per-round DP plan of a site.

Exact DP-SGD semantics, whichever engine runs:
  1. the batch is a Poisson sample (each example independently with rate q; Opacus's
     ``UniformWithReplacementSampler``, see :mod:`common.privacy.training`);
  2. each example's gradient is clipped to L2 norm ``C`` (over all parameters jointly);
  3. the clipped gradients are summed, Gaussian noise N(0, (sigma*C)^2 I) is added
     (Opacus's ``DPOptimizer`` noise code), and the sum is divided by the expected
     batch size q*n before the optimiser step.

Engines:
  * ``fast`` (default): privfed's fused clipping for models built from ``nn.Linear``
    and ``nn.Embedding`` (rules per layer type below). During the one
    ordinary backward pass it keeps each layer's input ``a`` and output gradient ``g``
    instead of computing the weight gradient. A per-example gradient of a linear layer
    is the outer product ``g_i a_i^T``, so its squared norm is ``|g_i|^2 |a_i|^2`` (plus
    ``|g_i|^2`` for the bias) and the clipped sum is one matmul ``(c * g)^T a``. That is
    one forward and one backward pass, where Opacus's ghost clipping needs two backward
    passes and its hooks mode materialises every per-example gradient. Opacus has no
    single-pass mode, hence this code; noise, scaling and the optimiser step are Opacus's.
  * ``opacus``: Opacus's ``GradSampleModule`` (hooks) + ``DPOptimizer``; the reference
    implementation, and the fallback for layers the fast engine does not support.
"""

from __future__ import annotations

import math
import types
import warnings
from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _generate_noise
from opacus.optimizers.optimizer_fast_gradient_clipping import DPOptimizerFastGradientClipping
from opacus.validators import ModuleValidator
from torch import nn

from common.config import RunConfig
from common.errors import ConfigError
from common.privacy.accounting import (  # noqa: F401  (known_noise, remember_noise: re-exported)
    NO_DP,
    NoiseKey,
    RoundPlan,
    auto_delta,
    cached_noise_for_target,
    known_noise,
    remember_noise,
)


def plan_round(cfg: RunConfig, dataset_size: int) -> RoundPlan:
    """A site's accountant inputs for one round, from the config and its dataset size.

    q = batch_size / n (Poisson rate), steps = ceil(local_epochs / q). With a target
    epsilon, sigma is chosen so that ``rounds * steps`` such steps spend exactly the target.
    """
    n = dataset_size
    q = min(1.0, cfg.train.batch_size / n)
    steps = max(1, math.ceil(cfg.train.local_epochs / q))
    dp = cfg.dp
    if not dp.enabled:
        return RoundPlan(n, q, steps, 0.0, 0.0, 0.0, NO_DP)
    delta = dp.delta or auto_delta(n)
    if delta >= 1.0 / n:
        raise ConfigError("dp.delta", f"is {delta:g} but must be < 1/n = {1.0 / n:.3g} for a site with n={n} examples")
    if dp.target_epsilon > 0:
        sigma = _cached_noise(dp.target_epsilon, delta, q, steps * cfg.federation.rounds, dp.accountant)
    else:
        sigma = dp.noise_multiplier
    return RoundPlan(n, q, steps, sigma, dp.max_grad_norm, delta, dp.accountant)


# The noise search is cached in common.privacy.accounting (one cache for sample- and
# client-level DP); known_noise / remember_noise are re-exported from there.
def _cached_noise(target: float, delta: float, q: float, steps: int, accountant: str) -> float:
    try:
        return cached_noise_for_target(target, delta, q, steps, accountant)
    except ValueError as exc:  # Opacus: "The privacy budget is too low."
        raise ConfigError(
            "dp.target-epsilon", f"{target:g} is not reachable with q={q:.3g} over {steps} steps ({exc})"
        ) from None


# --------------------------------------------------------------------------- engines


class StepEngine(ABC):
    """One optimiser step from a vector of per-example losses."""

    @abstractmethod
    def step(self, per_sample_loss: torch.Tensor) -> None: ...

    def close(self) -> None:
        """Undo any changes made to the model (hooks, patched forwards)."""


class NonPrivateStep(StepEngine):
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def step(self, per_sample_loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if per_sample_loss.numel():
            per_sample_loss.mean().backward()
            self.optimizer.step()


class _CaptureLinear(torch.autograd.Function):
    """``F.linear`` whose backward records (input, grad_output) instead of weight grads."""

    @staticmethod
    def forward(ctx, x, weight, bias, slot):  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.slot = slot
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        ctx.slot.append((x, grad_out))
        grad_x = grad_out @ weight if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None


class _CaptureEmbedding(torch.autograd.Function):
    """``F.embedding`` whose backward records (indices, grad_output) instead of the table grad."""

    @staticmethod
    def forward(ctx, idx, weight, slot):  # type: ignore[override]
        ctx.save_for_backward(idx)
        ctx.slot = slot
        return F.embedding(idx, weight)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        (idx,) = ctx.saved_tensors
        ctx.slot.append((idx, grad_out))
        return None, None, None


class _LinearRule:
    """Per-example gradient of ``y = a W^T + b`` is ``g a^T`` (and ``g``):
    squared norm ``|g|^2 |a|^2 (+ |g|^2)``, clipped sum ``(c * g)^T a``."""

    @staticmethod
    def check(name: str, module: nn.Module) -> None:
        if not module.weight.requires_grad:
            raise ConfigError(
                "dp.engine", f"fast engine: {name} has a frozen weight and a trainable bias (use dp.engine=opacus)"
            )

    @staticmethod
    def install(module: nn.Linear, slot: list) -> None:
        def forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
            if not (torch.is_grad_enabled() and self.training):
                return F.linear(x, self.weight, self.bias)
            if x.dim() != 2:
                raise RuntimeError(f"fast DP engine needs (batch, features) inputs to Linear, got {tuple(x.shape)}")
            return _CaptureLinear.apply(x, self.weight, self.bias, slot)

        module.forward = types.MethodType(forward, module)

    @staticmethod
    def sq_norms(module: nn.Linear, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        bias_term = 1.0 if _trainable_bias(module) else 0.0
        return torch.linalg.vecdot(g, g) * (torch.linalg.vecdot(a, a) + bias_term)

    @staticmethod
    def write_grad(module: nn.Linear, a: torch.Tensor, g: torch.Tensor, scale: torch.Tensor, out: dict) -> None:
        gc = g * scale.unsqueeze(1)
        torch.mm(gc.t(), a, out=out[module.weight])
        if _trainable_bias(module):
            torch.sum(gc, 0, out=out[module.bias])


class _EmbeddingRule:
    """Each example looks up exactly one row ``idx_i``: its gradient is ``g_i`` in that row
    and zero elsewhere, so the squared norm is ``|g_i|^2`` and the clipped sum is an
    ``index_add`` of ``c_i g_i``. (Several lookups per example could hit the same row, and
    their gradients would add before the norm; those models need dp.engine=opacus.)"""

    @staticmethod
    def check(name: str, module: nn.Embedding) -> None:
        if module.padding_idx is not None or module.max_norm is not None or module.scale_grad_by_freq or module.sparse:
            raise ConfigError(
                "dp.engine",
                f"fast engine supports plain nn.Embedding (no padding_idx, max_norm, scale_grad_by_freq or sparse); "
                f"{name} is not (use dp.engine=opacus)",
            )

    @staticmethod
    def install(module: nn.Embedding, slot: list) -> None:
        def forward(self: nn.Embedding, idx: torch.Tensor) -> torch.Tensor:
            if not (torch.is_grad_enabled() and self.training):
                return F.embedding(idx, self.weight)
            if idx.dim() != 1:
                raise RuntimeError(
                    f"fast DP engine needs one index per example for Embedding, got shape {tuple(idx.shape)} (use dp.engine=opacus)"
                )
            return _CaptureEmbedding.apply(idx, self.weight, slot)

        module.forward = types.MethodType(forward, module)

    @staticmethod
    def sq_norms(module: nn.Embedding, idx: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vecdot(g, g)

    @staticmethod
    def write_grad(module: nn.Embedding, idx: torch.Tensor, g: torch.Tensor, scale: torch.Tensor, out: dict) -> None:
        out[module.weight].zero_().index_add_(0, idx, g * scale.unsqueeze(1))


# Exactly these classes: a subclass may compute something else in its forward.
_RULES: dict[type, type] = {nn.Linear: _LinearRule, nn.Embedding: _EmbeddingRule}


class FastDPStep(StepEngine):
    """Single-backward per-example clipping for models built from ``nn.Linear`` and ``nn.Embedding``."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        plan: RoundPlan,
        generator: torch.Generator | None = None,
        secure_mode: bool = False,
    ) -> None:
        validate_private_model(model)
        self.layers: list[tuple[nn.Module, type, list]] = []
        seen: set[int] = set()
        for name, module in model.named_modules():
            own = [p for p in module.parameters(recurse=False) if p.requires_grad]
            if not own:
                continue
            rule = _RULES.get(type(module))
            if rule is None:
                raise ConfigError(
                    "dp.engine",
                    f"fast engine supports plain nn.Linear and nn.Embedding only; {name or 'model'} is "
                    f"{type(module).__name__} (use dp.engine=opacus)",
                )
            rule.check(name, module)
            if any(id(p) in seen for p in own):
                raise ConfigError(
                    "dp.engine", f"fast engine: {name} shares a parameter with another layer (use dp.engine=opacus)"
                )
            seen.update(id(p) for p in own)
            slot: list = []
            rule.install(module, slot)
            self.layers.append((module, rule, slot))
        self.max_grad_norm = plan.max_grad_norm
        self.optimizer = _FreshGradOptimizer(optimizer, **_noise_kwargs(plan, generator, secure_mode))
        # Every gradient lives in one flat buffer, so noise and scaling are one call each
        # instead of one per tensor (the per-tensor Python overhead dominated small models).
        self.params = list(self.optimizer.params)
        trainable = {id(p) for m, _, _ in self.layers for p in m.parameters(recurse=False) if p.requires_grad}
        if {id(p) for p in self.params} != trainable:
            raise ConfigError(
                "dp.engine", "fast engine: the optimiser must train exactly the model's trainable parameters"
            )
        if len({(p.dtype, p.device) for p in self.params}) > 1:
            raise ConfigError(
                "dp.engine",
                "fast engine needs every trainable parameter on one device with one dtype (use dp.engine=opacus)",
            )
        self.sizes = [p.numel() for p in self.params]

    def clipped_grad_sum(self, per_sample_loss: torch.Tensor) -> None:
        """Backward once, then write sum_i clip_C(grad_i) into each parameter's ``.grad``."""
        for _, _, slot in self.layers:
            slot.clear()
        batch = per_sample_loss.shape[0]
        per_sample_loss.sum().backward()
        sq_norms = torch.zeros(batch, device=per_sample_loss.device, dtype=per_sample_loss.dtype)
        for module, rule, slot in self.layers:
            if len(slot) != 1:
                raise RuntimeError(
                    f"fast DP engine: a {type(module).__name__} layer ran {len(slot)} times in one step; "
                    "weight sharing needs dp.engine=opacus"
                )
            a, g = slot[0]
            # One row per example, or the norms below would be per row, not per example.
            if a.shape[0] != batch or g.shape[0] != batch:
                raise RuntimeError(
                    f"fast DP engine: a {type(module).__name__} layer saw {a.shape[0]} rows for {batch} examples; "
                    "models that reshape the batch need dp.engine=opacus"
                )
            sq_norms = sq_norms + rule.sq_norms(module, a, g)
        scale = (self.max_grad_norm / (sq_norms.sqrt() + 1e-6)).clamp(max=1.0)  # Opacus's clip factor
        # A fresh buffer each step: nobody else can hold last step's gradients through it.
        ref = self.params[0]
        flat = torch.empty(sum(self.sizes), dtype=ref.dtype, device=ref.device)
        out = {p: v.view_as(p) for p, v in zip(self.params, flat.split(self.sizes))}
        with torch.no_grad():  # saved activations may require grad; out= refuses autograd
            for module, rule, slot in self.layers:
                a, g = slot.pop()
                rule.write_grad(module, a, g, scale, out)
        for p in self.params:
            p.grad = out[p]
        self.optimizer.flat = flat

    def step(self, per_sample_loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.clipped_grad_sum(per_sample_loss)
        self.optimizer.step()

    def close(self) -> None:
        for module, _, _ in self.layers:
            del module.forward  # back to the class's forward


def _noise_kwargs(plan: RoundPlan, generator: torch.Generator | None, secure_mode: bool) -> dict:
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


def _trainable_bias(module: nn.Linear) -> bool:
    return module.bias is not None and module.bias.requires_grad


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


class _FreshGradOptimizer(DPOptimizerFastGradientClipping):
    """Opacus's DP optimiser, with noise and scaling on :class:`FastDPStep`'s flat buffer.

    Opacus's own ``pre_step`` deep-copies each ``p.grad`` into ``p.summed_grad`` (it cannot
    know who else holds ``p.grad``) and then noises and scales tensor by tensor. Here every
    ``p.grad`` is a view of one buffer written fresh each step, so neither is needed.
    """

    flat: torch.Tensor | None = None  # set by FastDPStep: every p.grad is a view of it

    def pre_step(self, closure=None) -> bool:  # type: ignore[no-untyped-def]
        """Opacus's ``pre_step`` (skip check, ``add_noise``, ``scale_grad``; no ``accumulate``
        copy) on the flat buffer: one ``_generate_noise`` call and one division instead of
        one per tensor.

        The noise has the same distribution (i.i.d. N(0, (sigma*C)^2) per coordinate, secure
        mode included); only how many calls draw it differs. Opacus's per-tensor "already
        used" flags guard against reusing a gradient without ``zero_grad``; here the buffer
        is fresh each step and is dropped once used, which guarantees the same.
        """
        flat, self.flat = self.flat, None
        if flat is None:
            raise RuntimeError("fast DP engine: an optimiser step without a fresh clipped gradient sum")
        if self._check_skip_next_step():
            self._is_last_step_skipped = True
            return False
        std = getattr(self, "_adjusted_noise_multiplier", self.noise_multiplier) * self.max_grad_norm
        flat.add_(_generate_noise(std=std, reference=flat, generator=self.generator, secure_mode=self.secure_mode))
        if self.loss_reduction == "mean":
            flat.div_(self.expected_batch_size * self.accumulated_iterations)
        if self.step_hook:
            self.step_hook(self)
        self._is_last_step_skipped = False
        return True


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
        self.optimizer = DPOptimizer(optimizer, **_noise_kwargs(plan, generator, secure_mode))

    def step(self, per_sample_loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            # Inputs (data) never require grad; Opacus's hooks are correct regardless.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            per_sample_loss.sum().backward()
        self.optimizer.step()

    def close(self) -> None:
        self.gsm._close()


ENGINES: dict[str, type[StepEngine]] = {"fast": FastDPStep, "opacus": OpacusDPStep}


def make_engine(
    name: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    plan: RoundPlan,
    generator: torch.Generator | None = None,
    secure_mode: bool = False,
) -> StepEngine:
    """The step engine for a round: non-private when the plan has no noise."""
    if plan.accountant == NO_DP:
        return NonPrivateStep(model, optimizer)
    return ENGINES[name](model, optimizer, plan, generator=generator, secure_mode=secure_mode)
