"""Opacus's DP optimiser with noise and scaling on one flat gradient buffer (fast engine).

Privacy: the same mechanism as Opacus's ``pre_step``: i.i.d. N(0, (sigma*C)^2) noise on
every coordinate of the sum of clipped gradients (secure mode included), then division
by the expected batch size q*n. It assumes the buffer holds exactly one step's clipped
sum, written fresh by :class:`common.privacy.engines.fast.FastDPStep`.
"""

from __future__ import annotations

import torch
from opacus.optimizers.optimizer import _generate_noise
from opacus.optimizers.optimizer_fast_gradient_clipping import DPOptimizerFastGradientClipping


class FreshGradOptimizer(DPOptimizerFastGradientClipping):
    """Opacus's DP optimiser, with noise and scaling on :class:`FastDPStep`'s flat buffer.

    Opacus's own ``pre_step`` deep-copies each ``p.grad`` into ``p.summed_grad`` (it cannot
    know who else holds ``p.grad``) and then noises and scales tensor by tensor. Here every
    ``p.grad`` is a view of one buffer written fresh each step, so neither is needed.
    """

    flat: torch.Tensor | None = None  # set by FastDPStep: every p.grad is a view of it

    def pre_step(self, closure=None) -> bool:
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
