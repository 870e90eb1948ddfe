"""``dp.engine = fast`` (the default): privfed's fused per-example clipping.

For models built from the layer types in :mod:`common.privacy.engines.rules`
(``nn.Linear``, ``nn.Embedding``). During the one ordinary backward pass it keeps each
layer's input ``a`` and output gradient ``g`` instead of computing the weight gradient.
A per-example gradient of a linear layer is the outer product ``g_i a_i^T``, so its
squared norm is ``|g_i|^2 |a_i|^2`` (plus ``|g_i|^2`` for the bias) and the clipped sum is
one matmul ``(c * g)^T a``. That is one forward and one backward pass, where Opacus's
ghost clipping needs two backward passes and its hooks mode materialises every
per-example gradient. Opacus has no single-pass mode, hence this code; noise, scaling
and the optimiser step are Opacus's (:mod:`common.privacy.engines.flat_optimizer`).

Sensitivity: each example's gradient is clipped to ``C`` over all trained parameters
jointly (squared norms summed over layers), so the released sum moves by at most ``C``
when one example is added or removed. That holds only if every trained parameter belongs
to a layer with a rule and is one the rule clips (a ``Linear``'s weight and bias, an
``Embedding``'s weight), each layer runs once per step, no parameter is used outside its
layer's forward (``F.linear(h, emb.weight)``: that gradient would bypass the rule), and each
example is one row; the engine checks all of these and refuses otherwise. Gradient buffers
start at zero, so nothing a rule did not write can carry old memory into the release.

User-level DP (``groups``): a person's loss is the sum of their examples' losses, so their
gradient is the sum of the per-example gradients; each rule returns that sum's squared norm
per person (:class:`~common.privacy.engines.rules.base.PersonGroups`), the person's clip
factor scales every one of their examples, and the clipped sum is written as before. One
person then moves the release by at most ``C`` (add/remove one person).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from common.errors import ConfigError
from common.privacy.accounting import RoundPlan
from common.privacy.engines.base import StepEngine, register_engine
from common.privacy.engines.flat_optimizer import FreshGradOptimizer
from common.privacy.engines.rules import RULES, LayerRule, PersonGroups
from common.privacy.engines.shared import noise_kwargs, refuse_unclipped_parameters, validate_private_model


@register_engine("fast")
class FastDPStep(StepEngine):
    """Single-backward per-example clipping for models built from ``nn.Linear`` and ``nn.Embedding``."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        plan: RoundPlan,
        generator: torch.Generator | None = None,
        secure_mode: bool = False,
        person_local: Sequence[nn.Module] = (),
    ) -> None:
        """``person_local`` (user-level DP only): layers whose rows each belong to one person and
        never leave the site (the recommender's user table). The engine leaves them alone: not
        clipped, not noised, not in its optimiser; autograd gives them their exact gradient,
        which only that person's records reach, and the caller steps them (joint DP:
        docs/PRIVACY.md, "User-level DP")."""
        validate_private_model(model)
        skip = {id(m) for m in person_local}
        # Unsupported layer types are refused below; on a supported one, only its rule's parameters.
        refuse_unclipped_parameters(
            model,
            "fast",
            lambda m: RULES[type(m)].param_names if type(m) in RULES and id(m) not in skip else None,
        )
        self.layers: list[tuple[nn.Module, LayerRule, list]] = []
        seen: set[int] = set()
        for name, module in model.named_modules():
            own = [p for p in module.parameters(recurse=False) if p.requires_grad]
            if not own or id(module) in skip:
                continue
            rule = RULES.get(type(module))
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
        self.optimizer = FreshGradOptimizer(optimizer, **noise_kwargs(plan, generator, secure_mode))
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
        names = {id(p): name for name, p in model.named_parameters()}
        self.names = [names[id(p)] for p in self.params]

    def clipped_grad_sum(self, per_sample_loss: torch.Tensor, groups: PersonGroups | None = None) -> None:
        """Backward once, then write sum_i clip_C(grad_i) into each parameter's ``.grad``; with
        ``groups``, sum_u clip_C(sum_{i in u} grad_i) over the batch's persons u."""
        for _, _, slot in self.layers:
            slot.clear()
        batch = per_sample_loss.shape[0]
        per_sample_loss.sum().backward()
        # The capture functions give the rules' parameters no autograd gradient, so one here
        # came from a use outside the layer's forward, which no rule clipped: refuse it
        # rather than overwrite (drop) it.
        for name, p in zip(self.names, self.params):
            if p.grad is not None:
                raise RuntimeError(
                    f"fast DP engine: {name} is used outside its layer's forward (e.g. F.linear(h, emb.weight)); "
                    "per-example clipping cannot see that use, so use the parameter only through its layer"
                )
        if groups is not None and groups.index.shape[0] != batch:
            raise RuntimeError(f"fast DP engine: {groups.index.shape[0]} person indices for {batch} examples")
        units = batch if groups is None else groups.count
        sq_norms = torch.zeros(units, device=per_sample_loss.device, dtype=per_sample_loss.dtype)
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
            sq_norms = sq_norms + rule.sq_norms(module, a, g, groups)
        scale = (self.max_grad_norm / (sq_norms.sqrt() + 1e-6)).clamp(max=1.0)  # Opacus's clip factor
        if groups is not None:  # every example of a person carries the person's clip factor
            scale = scale[groups.index]
        # A fresh buffer each step: nobody else can hold last step's gradients through it.
        ref = self.params[0]
        flat = torch.zeros(sum(self.sizes), dtype=ref.dtype, device=ref.device)
        out = {p: v.view_as(p) for p, v in zip(self.params, flat.split(self.sizes))}
        with torch.no_grad():  # saved activations may require grad; out= refuses autograd
            for module, rule, slot in self.layers:
                a, g = slot.pop()
                rule.write_grad(module, a, g, scale, out)
        for p in self.params:
            p.grad = out[p]
        self.optimizer.flat = flat

    def step(self, per_sample_loss: torch.Tensor, groups: PersonGroups | None = None) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.clipped_grad_sum(per_sample_loss, groups)
        self.optimizer.step()

    def close(self) -> None:
        for module, _, _ in self.layers:
            del module.forward  # back to the class's forward
