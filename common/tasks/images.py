"""Shared data plumbing for image tasks (digits or bring-your-own .npz)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from common.config import RunConfig
from common.data.arrays import ArrayData, cached_federated_split
from common.tasks.base import Task

if TYPE_CHECKING:
    from torch import nn


class ImageTask(Task):
    """A task whose sites hold images: the federated split of common.data.arrays (seeded test
    split and partition, keyed per-record train/validation split at each site). Its plug-ins
    declare the sources and partitions it implements (common.config.limits.IMAGE_SOURCES,
    IMAGE_PARTITIONS) in their SPEC."""

    unit_of_privacy = "image"
    # The evaluation classifier, cached by common.metrics.image_quality.server_classifier on first
    # use (declared, not assigned; typed as its base class: naming it here would be an import cycle).
    _eval_classifier: nn.Module

    def __init__(self, cfg: RunConfig, key: bytes | None = None) -> None:
        super().__init__(cfg, key)
        # A site-local secret, when the site has one, keys its train/validation split.
        self._split = cached_federated_split(cfg.data, cfg.federation.num_sites, cfg.federation.seed, key)

    @property
    def input_dim(self) -> int:
        return int(self._split.test.x.shape[1])

    def site_data(self, site_index: int) -> tuple[ArrayData, ArrayData]:
        return self._split.sites[site_index]

    def server_test_data(self) -> ArrayData:
        return self._split.test

    def classifier_data(self) -> ArrayData:
        """The part of the server's test split that trains the evaluation classifier."""
        return self._split.classifier

    def quality_data(self) -> ArrayData:
        """The rest of the server's test split: where the classifier's metrics are measured."""
        return self._split.quality

    def site_sizes(self) -> list[int]:
        return self._split.site_sizes()
