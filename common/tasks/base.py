"""The task interface: everything that differs between the VAE, the GAN and the recommender.

The client and the server only talk to a task through this class. A task decides
what a site's data is, what the model is, what one example's loss is, how to evaluate
and which artifacts (sample grids) it can draw. DP, accounting, aggregation and the
ledger are the same for every task and live elsewhere.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, TypeVar

import numpy as np
import torch
from torch import nn

from common.config.schema import USER_UNIT
from common.errors import ConfigError

if TYPE_CHECKING:
    from common.config import RunConfig
    from common.data.arrays import ArrayData
    from common.privacy.metrics_dp import MetricBounds
    from common.privacy.training import LocalSession


_D = TypeVar("_D", bound="ArrayData")


class Task(ABC):
    """One kind of model a federation can train. Subclass in ``common/tasks/<name>/task.py``,
    then ``@register_task("name")``; the plug-in's SPEC (``config.py``) declares the rest."""

    # The plug-in's declarations, which the config reads without importing this class: set
    # from its SPEC (common.config.rules.TaskSpec, in common/tasks/<name>/config.py) by
    # register_task, and declared only there.
    name: ClassVar[str]
    config_cls: ClassVar[type]
    data_sources: ClassVar[tuple[str, ...]]
    person_sources: ClassVar[tuple[str, ...]]
    partitions: ClassVar[tuple[str, ...]]
    primary_metric: ClassVar[str]
    site_primary_loss: ClassVar[bool]
    # What one DP "record" is for this task; written to every ledger row.
    unit_of_privacy: ClassVar[str] = "example"
    # True when sites pseudonymise identifiers with the federation key (common.deploy.keys).
    needs_key: ClassVar[bool] = False
    # Where the "test" metrics of a round come from (shown in the run summary).
    test_description: ClassVar[str] = "server-held split"
    # Further test metrics (besides the primary) plotted per round in quality.png.
    plot_metrics: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg: RunConfig, key: bytes | None = None) -> None:
        self.cfg = cfg
        self.params = cfg.task_params
        self.key = key
        # The run directory, when the server has one (for artifacts a task caches).
        self.artifacts_dir: Path | None = None

    # ----------------------------------------------------------------- data
    @abstractmethod
    def site_data(self, site_index: int) -> tuple[ArrayData, ArrayData]:
        """(train, validation) for one site of the simulated federation."""

    @abstractmethod
    def server_test_data(self) -> ArrayData | None:
        """The server-held test split (simulation only), or None."""

    def has_person_key(self) -> bool:
        """True when every training record carries its person (``ArrayData.person``), so that
        ``dp.unit = "user"`` can sample and clip per person. Default: no person key."""
        return False

    @property
    def privacy_unit(self) -> str:
        """The unit of privacy of this run, as every ledger row names it: the task's record
        (:attr:`unit_of_privacy`), or ``user`` under ``dp.unit = "user"``."""
        return USER_UNIT if self.cfg.dp.unit == USER_UNIT else self.unit_of_privacy

    def unit_count(self, data: ArrayData) -> int:
        """How many privacy units ``data`` holds: its records, or its distinct persons under
        ``dp.unit = "user"`` (the n that q, delta and the site's declared size count)."""
        if self.cfg.dp.unit != USER_UNIT:
            return len(data)
        if data.person is None or not self.has_person_key():
            raise ConfigError(
                "dp.unit", f"is user, but this site's {self.name} records carry no person key (use dp.unit = record)"
            )
        return int(torch.unique(data.person).numel())

    def records_per_unit(self) -> int:
        """How many evaluation records one privacy unit may add to a released sum: 1 (a record),
        or ``dp.max-records-per-user`` under user-level DP (each person's first ones, :meth:`unit_rows`)."""
        return self.cfg.dp.max_records_per_user if self.cfg.dp.unit == USER_UNIT else 1

    def unit_rows(self, data: _D) -> _D:
        """The records a site's evaluation sums read: all of them, or under user-level DP each
        person's first :meth:`records_per_unit` (which depends on that person's records only)."""
        from common.data.arrays import capped_per_person

        return capped_per_person(data, self.records_per_unit()) if self.cfg.dp.unit == USER_UNIT else data

    def site_sizes(self) -> list[int]:
        """Privacy units (:meth:`unit_count`) in every site's training split; the simulation
        declares them as the sites' sizes n-hat, and delta is validated against them."""
        return [self.unit_count(self.site_data(i)[0]) for i in range(self.cfg.federation.num_sites)]

    # ---------------------------------------------------------------- model
    @abstractmethod
    def build_model(self, site_index: int | None = None) -> nn.Module:
        """A freshly initialised model (seeded by the caller).

        ``site_index`` is None on the server; a site passes its own index, for models
        whose site-local part (user embeddings) is sized by the site's data.
        """

    def private_module(self, model: nn.Module) -> nn.Module:
        """The part of the model trained with DP-SGD on the site's data (default: all of it)."""
        return model

    def person_local_modules(self, model: nn.Module) -> list[nn.Module]:
        """Under user-level DP: layers of ``model`` whose rows each belong to one person and never
        leave the site (the recommender's user table). They train on their exact gradient,
        outside DP-SGD: the released shared state stays user-level DP (joint DP, docs/PRIVACY.md),
        predictions at the site do not. Each row must be reached only by its own person's
        records, and none may be in :meth:`shared_keys`. Default: none."""
        return []

    def no_decay_parameters(self, model: nn.Module) -> list[torch.Tensor]:
        """Parameters of ``model`` that ``train.weight-decay`` must not shrink toward zero (a
        location such as the recommender's global mean rating, or a table with its own decay).
        The decay acts only in the site's DP-step optimiser (and, under user-level DP, the
        person-local tables' optimiser), never in a task's own optimisers such as the GAN's
        generator. Default: none, every parameter those optimisers train decays."""
        return []

    def frozen_entries(self) -> tuple[tuple[int, ...], tuple[str, ...]]:
        """Positions (in :meth:`shared_keys` order, the wire format) and keys of the federated
        parameters that never train (``requires_grad = False``: random features, adapter bases).
        The server keeps them as initialised (:mod:`common.pipeline.stages.frozen`)."""
        with torch.random.fork_rng(devices=[]):  # building draws weights: leave the seeded stream alone
            model = self.build_model()
        frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
        pairs = [(i, k) for i, k in enumerate(self.shared_keys(model)) if k in frozen]
        return tuple(i for i, _ in pairs), tuple(k for _, k in pairs)

    def shared_keys(self, model: nn.Module) -> list[str]:
        """state_dict keys that are federated; the rest stay at the site (e.g. user embeddings)."""
        return list(model.state_dict().keys())

    # ------------------------------------------------------------- training
    @abstractmethod
    def per_sample_loss(self, model: nn.Module, batch: ArrayData) -> torch.Tensor:
        """Loss of each example in the batch, shape (B,). DP clips the gradient of each entry."""

    def train(self, model: nn.Module, session: LocalSession) -> dict[str, float]:
        """One round of local training. Tasks with several networks (GAN) override this."""
        total, count = 0.0, 0
        for batch in session.batches():
            losses = self.per_sample_loss(model, batch)
            session.step(losses)
            total += float(losses.detach().sum())
            count += len(batch)
        return {"train_loss": total / max(count, 1)}

    # ----------------------------------------------------------- evaluation
    @abstractmethod
    def evaluate(self, model: nn.Module, data: ArrayData) -> dict[str, float]:
        """Metrics on held-out data; must include :attr:`primary_metric`."""

    def combine_metrics(self, results: list[tuple[int, dict[str, float]]]) -> dict[str, float]:
        """Combine sites' evaluation metrics into federation-wide ones (example-weighted mean).

        Used when there is no server-held test split; tasks whose metrics are not means
        (RMSE, group metrics) override this and combine sufficient statistics instead.
        """
        total = sum(n for n, _ in results)
        if total <= 0:
            return {}

        def numeric(m: dict) -> set[str]:  # not site_id or other strings, not flags
            return {k for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}

        keys = set.intersection(*(numeric(m) for _, m in results))
        return {k: sum(n * m[k] for n, m in results) / total for k in sorted(keys)}

    # ------------------------------------------------- secure evaluation sums
    def sum_keys(self) -> tuple[str, ...]:
        """The evaluation metrics that are sums over sites, as a fixed, public, ordered schema.

        Under SecAgg+ every site sends exactly these values (0 for a group it lacks or
        withholds), in this order, inside its masked fit vector (:mod:`common.privacy.secagg_stats`),
        and the server gets only their sum, from which :meth:`combine_sums` must give every
        federation metric. It must not depend on any site's data. () (the default): the task
        has none, or the server evaluates on its own test split; nothing is appended.
        """
        return ()

    def is_sum_key(self, key: str) -> bool:
        """True for an evaluation metric that is a sum over sites (may match keys outside the
        schema, so that a site refuses to leave out a sum the schema forgot)."""
        return key in self.sum_keys()

    def combine_sums(self, sums: dict[str, float]) -> dict[str, float]:
        """Federation metrics from the secure sum over sites of the :meth:`sum_keys` values."""
        return self.combine_metrics([(1, sums)])

    # ------------------------------------------------ private metrics (metrics.dp)
    def metric_bounds(self) -> MetricBounds:
        """What a site may release under ``metrics.dp``: a fixed public schema of sums over its
        validation records, each key's per-record bound, and how many keys one record touches
        (:mod:`common.privacy.metrics_dp`). Default: nothing (every statistic withheld)."""
        from common.privacy.metrics_dp import MetricBounds

        return MetricBounds({}, 0)

    def dp_evaluate(self, model: nn.Module, data: ArrayData) -> dict[str, float]:
        """The site's values of :meth:`metric_bounds`'s keys, each record clipped to its bound
        (default: :meth:`evaluate`, whose keys outside the schema are withheld)."""
        return self.evaluate(model, data)

    def save_samples(self, model: nn.Module, path: Path, caption: str | None = None) -> Path | None:
        """Draw a sample grid PNG if the task generates data; None otherwise. ``caption``: the
        privacy claim the samples were made under (the server's :meth:`RunRecorder.sample_caption`)."""
        return None


def get_state(model: nn.Module, keys: list[str]) -> list[np.ndarray]:
    """Selected state_dict entries as numpy arrays, in ``keys`` order (the wire format)."""
    state = model.state_dict()
    return [state[k].detach().cpu().numpy().copy() for k in keys]


def set_state(model: nn.Module, keys: list[str], arrays: list[np.ndarray]) -> None:
    state = model.state_dict()
    if len(arrays) != len(keys):
        raise ValueError(f"expected {len(keys)} arrays, got {len(arrays)}")
    for k, a in zip(keys, arrays):
        if tuple(a.shape) != tuple(state[k].shape):
            raise ValueError(f"array for {k!r} has shape {tuple(a.shape)}, expected {tuple(state[k].shape)}")
        state[k].copy_(torch.as_tensor(a))
