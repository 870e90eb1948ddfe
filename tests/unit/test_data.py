"""Partitioning: disjoint, complete, seeded, non-IID as configured."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.config import DataConfig
from common.data.arrays import ArrayData, dirichlet_partition, federate, iid_partition, load_npz_images
from common.errors import ConfigError


def _labels(n=1000, k=10, seed=0):
    return np.random.default_rng(seed).integers(0, k, size=n)


def test_dirichlet_partition_is_a_partition_and_seeded():
    y = _labels()
    parts = dirichlet_partition(y, 8, alpha=0.5, seed=3, min_size=10)
    allidx = np.concatenate(parts)
    assert sorted(allidx.tolist()) == list(range(len(y)))  # disjoint and complete
    assert min(len(p) for p in parts) >= 10
    again = dirichlet_partition(y, 8, alpha=0.5, seed=3, min_size=10)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = dirichlet_partition(y, 8, alpha=0.5, seed=4, min_size=10)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))


def _label_skew(parts, y):
    """Mean total-variation distance between site label histograms and the global one."""
    glob = np.bincount(y, minlength=10) / len(y)
    tvs = [0.5 * np.abs(np.bincount(y[p], minlength=10) / len(p) - glob).sum() for p in parts]
    return float(np.mean(tvs))


def test_small_alpha_is_more_skewed_than_large_alpha():
    y = _labels(3000)
    skew_small = _label_skew(dirichlet_partition(y, 8, 0.1, 0, 10), y)
    skew_large = _label_skew(dirichlet_partition(y, 8, 100.0, 0, 10), y)
    assert skew_small > 0.4 > 0.1 > skew_large


def test_impossible_min_size_names_alpha():
    with pytest.raises(ConfigError) as info:
        dirichlet_partition(_labels(100), 8, 0.01, 0, min_size=12, max_tries=5)
    assert info.value.key == "data.alpha"


def test_iid_partition_balanced():
    parts = iid_partition(103, 4, 0)
    assert sorted(len(p) for p in parts) == [25, 26, 26, 26]


def test_federate_splits_test_train_val_without_overlap():
    n = 600
    x = torch.arange(n, dtype=torch.float32).unsqueeze(1).repeat(1, 4) / n
    data = ArrayData(x, torch.as_tensor(_labels(n)))
    split = federate(data, DataConfig(), num_sites=5, seed=1)
    seen = [split.test.x[:, 0]]
    for train, val in split.sites:
        assert len(train) >= 10 and len(val) >= 1
        seen += [train.x[:, 0], val.x[:, 0]]
    ids = torch.cat(seen)
    assert len(ids) == n and len(torch.unique(ids)) == n
    assert abs(len(split.test) - 0.2 * n) <= 1


def test_npz_uint8_scaled_and_labels_optional(tmp_path):
    p = tmp_path / "imgs.npz"
    np.savez(p, x=np.full((6, 2, 2), 255, dtype=np.uint8))
    d = load_npz_images(p)
    assert d.y is None and d.x.shape == (6, 4) and float(d.x.max()) == 1.0
