"""One round of local training at a site, with the sampling that the accounting assumes."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch import nn

from common.config import RunConfig
from common.config.schema import USER_UNIT
from common.data.arrays import ArrayData, to_device
from common.privacy.accounting import NO_DP, RoundPlan
from common.privacy.engines import StepEngine, make_engine
from common.privacy.engines.rules import PersonGroups

# Site-local only (the SuperNode's own log).
_LOG = logging.getLogger("privfed.site")

# name -> tensor: "<parameter name>/<state key>", e.g. "item_bias.weight/exp_avg".
OptimizerState = dict[str, torch.Tensor]
# The per-parameter state keys an optimiser keeps (checked on load; others: whatever was saved).
# SGD without momentum keeps none, so nothing saved under another optimiser is loaded into it.
_ADAM_KEYS = {"step", "exp_avg", "exp_avg_sq"}
_STATE_KEYS: dict[type, set[str]] = {
    torch.optim.Adam: _ADAM_KEYS,
    torch.optim.AdamW: _ADAM_KEYS,  # train.weight-decay > 0: the same moments
    torch.optim.SGD: set(),
}


class PersonSampler:
    """User-level batches: Poisson sampling over persons, then up to ``cap`` records of each.

    Each step samples every person independently with rate q (Opacus's sampler, over the
    site's persons rather than its records) and takes up to ``cap`` of each sampled
    person's records: all of them when they have at most ``cap``, else a window of ``cap``
    consecutive records, at a uniformly random start, in an order shuffled once per round.
    Which records a person contributes depends only on that person's own records and the
    sampler's randomness, and the engine clips the person's summed gradient as a whole, so
    adding or removing one person changes the step's sum by at most C (sensitivity over
    persons; the cap bounds the work and nothing in the guarantee).
    """

    def __init__(self, person: torch.Tensor, cap: int, generator: torch.Generator | None) -> None:
        n = person.shape[0]
        shuffled = torch.randperm(n, generator=generator)
        # Records grouped by person (stable sort keeps the shuffle inside each person).
        self.order = shuffled[torch.argsort(person[shuffled], stable=True)]
        _, self.sizes = torch.unique_consecutive(person[self.order], return_counts=True)
        self.starts = torch.cumsum(self.sizes, 0) - self.sizes
        self.cap, self.generator = cap, generator

    @property
    def persons(self) -> int:
        return int(self.sizes.numel())

    def take(self, sampled: torch.Tensor) -> tuple[torch.Tensor, PersonGroups]:
        """The records of the sampled persons (indices into the data), and their person groups."""
        sizes = self.sizes[sampled]
        take = sizes.clamp(max=self.cap)
        count = int(sampled.numel())
        owner = torch.repeat_interleave(torch.arange(count), take)  # batch-local person of each record
        first = torch.cumsum(take, 0) - take
        j = torch.arange(owner.numel()) - first[owner]  # 0..take-1 within the person
        offset = (torch.rand(count, generator=self.generator) * sizes).long()  # window start
        pos = self.starts[sampled][owner] + (offset[owner] + j) % sizes[owner]
        return self.order[pos], PersonGroups(owner, count, j, int(take.max()) if count else 0)


class LocalSession:
    """Hands a task its batches and takes exactly one optimiser step per batch.

    Under DP the batches are Poisson samples with rate ``plan.sample_rate`` (Opacus's
    sampler), and there are ``plan.steps`` of them: of records, or under user-level DP of
    persons (:class:`PersonSampler`, given as ``persons``), whose groups the session hands
    the engine with the batch's losses. The session counts the noisy steps actually taken;
    that count, not the plan, is what the ledger records. Taking two steps on one sampled
    batch would break the accounting, so it raises.
    """

    def __init__(
        self,
        data: ArrayData,
        plan: RoundPlan,
        batch_size: int,
        engine: StepEngine,
        device: torch.device,
        generator: torch.Generator | None,
        persons: PersonSampler | None = None,
        local_optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        self.data, self.plan, self.batch_size = data, plan, batch_size
        self.engine, self.device, self.generator = engine, device, generator
        self.persons, self.local_optimizer = persons, local_optimizer
        self.steps_taken = 0
        self._batch_pending = False
        self._groups: PersonGroups | None = None

    def batches(self) -> Iterator[ArrayData]:
        if self.plan.accountant == NO_DP:
            index_batches: Iterator = self._shuffled()
        elif self.persons is not None:
            index_batches = self._by_person(self.persons)
        else:
            sampler = UniformWithReplacementSampler(
                num_samples=len(self.data),
                sample_rate=self.plan.sample_rate,
                generator=self.generator,
                steps=self.plan.steps,
            )
            index_batches = (torch.as_tensor(idx, dtype=torch.long) for idx in sampler)
        d = self.data
        for idx in index_batches:
            self._batch_pending = True
            yield to_device(ArrayData(d.x[idx], None if d.y is None else d.y[idx]), self.device)

    def _by_person(self, persons: PersonSampler) -> Iterator[torch.Tensor]:
        sampler = UniformWithReplacementSampler(
            num_samples=persons.persons,
            sample_rate=self.plan.sample_rate,
            generator=self.generator,
            steps=self.plan.steps,
        )
        for sampled in sampler:
            idx, groups = persons.take(torch.as_tensor(sampled, dtype=torch.long))
            self._groups = groups.to(self.device)
            yield idx

    def _shuffled(self) -> Iterator[torch.Tensor]:
        """Non-private baseline: plain shuffled minibatches, the same number of steps."""
        n, done = len(self.data), 0
        while True:
            perm = torch.randperm(n, generator=self.generator)
            for start in range(0, n, self.batch_size):
                if done == self.plan.steps:
                    return
                done += 1
                yield perm[start : start + self.batch_size]

    def step(self, per_sample_loss: torch.Tensor) -> None:
        if not self._batch_pending:
            raise RuntimeError("LocalSession.step: one optimiser step per sampled batch (DP accounting)")
        if self.steps_taken >= self.plan.steps:
            raise RuntimeError(f"LocalSession.step: the round's plan allows {self.plan.steps} steps (DP accounting)")
        self._batch_pending = False
        if self.local_optimizer is None:
            self.engine.step(per_sample_loss, self._groups)
        else:  # the same backward gives the person-local layers their exact gradient
            self.local_optimizer.zero_grad(set_to_none=True)
            self.engine.step(per_sample_loss, self._groups)
            self.local_optimizer.step()
        self.steps_taken += 1


class LocalTrainer(Protocol):
    """What :func:`run_local_round` needs of a task (:class:`common.tasks.base.Task` has it).

    A protocol, not the Task class: tasks depend on this module (they train through a
    :class:`LocalSession`), so this module must not depend on them.
    """

    cfg: RunConfig

    def private_module(self, model: nn.Module) -> nn.Module: ...

    def person_local_modules(self, model: nn.Module) -> list[nn.Module]: ...

    def no_decay_parameters(self, model: nn.Module) -> list[torch.Tensor]: ...

    def train(self, model: nn.Module, session: LocalSession) -> dict[str, float]: ...


@dataclass(frozen=True)
class RoundOutcome:
    metrics: dict[str, float]
    steps_taken: int
    # The DP-trained optimiser's per-parameter state after the round (train.keep-optimizer-state;
    # else None). Site-local: never in a reply.
    optimizer_state: OptimizerState | None = None


def optimizer_state(optimizer: torch.optim.Optimizer, module: nn.Module) -> OptimizerState:
    """``optimizer``'s per-parameter state (Adam: ``step``, ``exp_avg``, ``exp_avg_sq``) keyed
    by ``module``'s parameter names, on CPU. Never the param groups (the lr is the round's)."""
    out: OptimizerState = {}
    for name, p in module.named_parameters():
        for key, value in optimizer.state.get(p, {}).items():
            if isinstance(value, torch.Tensor):
                out[f"{name}/{key}"] = value.detach().to("cpu", copy=True)
    return out


def _sane(key: str, value: torch.Tensor) -> bool:
    """A state value Adam could have produced: finite, and no negative step count or second moment.
    Anything else (a divergent round, a damaged file) would make every later step NaN."""
    if not bool(torch.isfinite(value).all()):
        return False
    return key not in ("step", "exp_avg_sq", "max_exp_avg_sq") or bool((value >= 0).all())


def load_optimizer_state(optimizer: torch.optim.Optimizer, module: nn.Module, saved: OptimizerState) -> bool:
    """Put ``saved`` (from :func:`optimizer_state`) into ``optimizer``'s fresh per-parameter state.

    Only if it fits exactly: the same parameter names, each with the same state keys, every
    per-parameter tensor shaped like its parameter, every value finite (and no negative step
    count or second moment). Anything else (the config changed: another model, dimension or
    optimiser; a divergent round; a damaged file) is dropped and the round starts fresh; it is
    an optimisation aid, not data. The param groups (this round's lr) are never touched.
    """
    names = {id(p): name for name, p in module.named_parameters()}
    trained = [(names[id(p)], p) for group in optimizer.param_groups for p in group["params"]]
    by_param: dict[str, dict[str, torch.Tensor]] = {}
    for full, value in saved.items():
        name, _, key = full.rpartition("/")
        by_param.setdefault(name, {})[key] = value
    expected = _STATE_KEYS.get(type(optimizer))

    def fits(name: str, p: nn.Parameter) -> bool:
        got = by_param.get(name, {})
        if not got or (expected is not None and set(got) != expected):
            return False
        return all(v.shape == (torch.Size([]) if k == "step" else p.shape) and _sane(k, v) for k, v in got.items())

    if set(by_param) != {name for name, _ in trained} or not all(fits(name, p) for name, p in trained):
        _LOG.debug("saved optimiser state does not fit this model and optimiser; starting it fresh")
        return False
    for name, p in trained:
        optimizer.state[p] = {
            # Adam keeps its step count on CPU (as torch's own load_state_dict does).
            k: v.to("cpu", torch.float32).clone() if k == "step" else v.to(p.device, p.dtype).clone()
            for k, v in by_param[name].items()
        }
    return True


def make_optimizer(
    model: nn.Module,
    name: str,
    lr: float,
    only: Sequence[nn.Parameter] | None = None,
    but: Iterable[int] = (),
    weight_decay: float = 0.0,
    no_decay: Iterable[int] = (),
) -> torch.optim.Optimizer:
    """The run's optimiser over ``model``'s trainable parameters (or ``only`` these), except
    those whose ``id`` is in ``but``.

    ``weight_decay`` (``train.weight-decay``) > 0: decoupled decay on every parameter whose
    ``id`` is not in ``no_decay``; each step is ``p <- (1 - lr * weight_decay) * p - lr * u``
    with ``u`` the optimiser's usual update from the noised gradient (AdamW; for plain SGD
    the coupled and decoupled forms are the same map). It runs inside the optimiser's step,
    after the DP engine clipped and noised the gradient, and reads only the weights, so it
    changes neither the clipping nor the noise.
    """
    skip = set(but)
    params = [p for p in (model.parameters() if only is None else only) if p.requires_grad and id(p) not in skip]
    if weight_decay == 0:
        return torch.optim.Adam(params, lr=lr) if name == "adam" else torch.optim.SGD(params, lr=lr)
    keep = set(no_decay)
    # One group per run of neighbouring parameters with the same decay, so that the groups
    # list the parameters in the model's order: the DP engines draw the noise parameter by
    # parameter in that order, and a seeded run must not move noise between tables when
    # the decay is turned on.
    groups: list[dict[str, Any]] = []
    for p in params:
        wd = 0.0 if id(p) in keep else weight_decay
        if not groups or groups[-1]["weight_decay"] != wd:
            groups.append({"params": [], "weight_decay": wd})
        groups[-1]["params"].append(p)
    return torch.optim.AdamW(groups, lr=lr) if name == "adam" else torch.optim.SGD(groups, lr=lr)


def task_optimizer(
    task: LocalTrainer, model: nn.Module, lr: float, only: Sequence[nn.Parameter] | None = None, but: Iterable[int] = ()
) -> torch.optim.Optimizer:
    """:func:`make_optimizer` as a site's round builds it: ``train.optimizer`` and
    ``train.weight-decay``, with the task's exemptions (:meth:`Task.no_decay_parameters`)."""
    t = task.cfg.train
    exempt = [id(p) for p in task.no_decay_parameters(model)]
    return make_optimizer(model, t.optimizer, lr, only, but, t.weight_decay, exempt)


def run_local_round(
    task: LocalTrainer,
    model: nn.Module,
    data: ArrayData,
    plan: RoundPlan,
    device: torch.device,
    seed: int | None,
    lr_scale: float = 1.0,
    optimizer_state_in: OptimizerState | None = None,
) -> RoundOutcome:
    """Train ``model`` in place for one round.

    ``seed`` makes sampling, noise and the task's own randomness repeat exactly
    (simulation). ``seed=None`` (``dp.secure-rng``) seeds every generator from 128 bits of
    OS entropy and turns on Opacus's ``secure_mode`` noise (robust to floating-point
    attacks). That is unpredictable, but it is torch's Mersenne Twister seeded securely,
    not a cryptographic stream: Opacus's CSPRNG needs ``torchcsprng``, which has no build
    for current torch.

    ``lr_scale`` multiplies ``train.lr`` this round (the schedule's factor,
    :func:`common.config.schema.lr_factor`; data-independent, so no privacy cost).

    ``train.keep-optimizer-state``: ``optimizer_state_in`` (the previous round's
    ``RoundOutcome.optimizer_state``, or None) seeds the DP-trained optimiser's
    per-parameter state (Adam's moments and step count; not the person-local layers'
    optimiser, and never the lr, which is this round's), and the outcome carries the new
    state. A site takes only a few noisy steps per round, so an Adam restarted every round
    spends nearly all of them in its bias-corrected start, where each coordinate moves by
    about lr in the sign of a mostly-noise gradient. Privacy: the moments are functions of
    the clipped and noised gradients the DP engine already released to the optimiser, so
    keeping them is post-processing, and DP-SGD's adaptive composition lets every step
    depend on all earlier outputs; the accounting and the ledger are unchanged. The state
    stays at the site (client.state, file 0600) and is never sent. A state that does not
    fit the model (names, keys or shapes; the config changed) is dropped and the round
    starts fresh.
    """
    cfg = task.cfg
    model.to(device).train()
    private = task.private_module(model)  # e.g. only the GAN's discriminator
    user_level = cfg.dp.unit == USER_UNIT and plan.accountant != NO_DP
    # Joint DP (user-level only): the layers whose rows each belong to one person and stay at
    # the site train on their exact gradient, outside the DP engine (docs/PRIVACY.md).
    local = task.person_local_modules(private) if user_level else []
    local_params = [p for m in local for p in m.parameters() if p.requires_grad]
    lr = cfg.train.lr * lr_scale
    optimizer = task_optimizer(task, private, lr, but=map(id, local_params))
    local_optimizer = task_optimizer(task, private, lr, only=local_params) if local else None
    keep = cfg.train.keep_optimizer_state
    if keep and optimizer_state_in:
        load_optimizer_state(optimizer, private, optimizer_state_in)
    secure = seed is None
    # Three independent streams (noise, Poisson sampling, the task's own randomness).
    entropy = secrets.randbits(128) if secure else seed
    noise_seed, sample_seed, task_seed = (
        int(s >> 1) for s in np.random.SeedSequence(entropy).generate_state(3, dtype=np.uint64)
    )
    noise_gen = torch.Generator(device=device).manual_seed(noise_seed)
    engine = make_engine(
        cfg.dp.engine, private, optimizer, plan, generator=noise_gen, secure_mode=secure, person_local=local
    )
    # The sampler draws on CPU; keep its generator there.
    sample_gen = torch.Generator().manual_seed(sample_seed)
    persons = None
    if user_level:
        if data.person is None:  # Task.unit_count refuses this first, naming dp.unit
            raise RuntimeError("user-level DP needs the records' person key")
        persons = PersonSampler(data.person, cfg.dp.max_records_per_user, sample_gen)
    session = LocalSession(data, plan, cfg.train.batch_size, engine, device, sample_gen, persons, local_optimizer)
    # Tasks draw their own randomness (VAE reparameterisation, GAN latents) from torch's
    # global RNG; seed it inside a forked RNG state so the caller's state is untouched.
    devices = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(task_seed)
            metrics = task.train(model, session)
    finally:
        engine.close()
    kept = optimizer_state(optimizer, private) if keep else None
    if kept and not all(_sane(name.rpartition("/")[2], v) for name, v in kept.items()):
        # A divergent round: keep nothing, or every later round of the run would step on NaN.
        _LOG.debug("the optimiser state is not finite after this round; not keeping it")
        kept = {}
    return RoundOutcome(metrics=metrics, steps_taken=session.steps_taken, optimizer_state=kept)
