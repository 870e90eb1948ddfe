"""Shared data plumbing for image tasks (digits or bring-your-own .npz)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from common.config import RunConfig
from common.data.arrays import ArrayData, cached_federated_split
from common.tasks.base import Task

if TYPE_CHECKING:
    from torch import nn


class ImageTask(Task):
    """A task whose sites hold images: the seeded federated split of common.data.arrays."""

    unit_of_privacy = "image"
    data_sources = ("digits", "npz")
    partitions = ("dirichlet", "iid", "site")
    # The evaluation classifier, cached by common.metrics.image_quality.pooled_classifier on first
    # use (declared, not assigned; typed as its base class: naming it here would be an import cycle).
    _eval_classifier: nn.Module

    def __init__(self, cfg: RunConfig, key: bytes | None = None) -> None:
        super().__init__(cfg, key)
        self._split = cached_federated_split(cfg.data, cfg.federation.num_sites, cfg.federation.seed)

    @property
    def input_dim(self) -> int:
        return int(self._split.test.x.shape[1])

    def site_data(self, site_index: int) -> tuple[ArrayData, ArrayData]:
        return self._split.sites[site_index]

    def server_test_data(self) -> ArrayData:
        return self._split.test

    def site_sizes(self) -> list[int]:
        return self._split.site_sizes()
