"""Partitioning: disjoint, complete, seeded, non-IID as configured; each site's
train/validation split keyed and stable per record; the evaluation classifier's images
server-held only."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from common.config import DataConfig
from common.data.arrays import (
    VALIDATION_DOMAIN,
    ArrayData,
    dirichlet_partition,
    federate,
    iid_partition,
    keyed_split,
    load_digits_data,
    load_npz_images,
    split_key,
)
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


# ------------------------------------------------------------------ keyed, per-record split


def _rows(data: ArrayData) -> set[bytes]:
    """Each record as bytes (image and label), to compare sets of records."""
    assert data.y is not None
    return {x.numpy().tobytes() + bytes([int(y)]) for x, y in zip(data.x, data.y)}


def _sides(data: ArrayData, key: bytes) -> dict[bytes, bool]:
    """record -> held out for validation?"""
    assert data.y is not None
    _, va = keyed_split(data, 0.15, key, VALIDATION_DOMAIN)
    held = set(va.tolist())
    return {x.numpy().tobytes() + bytes([int(y)]): i in held for i, (x, y) in enumerate(zip(data.x, data.y))}


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(2, 120),
    seed=st.integers(0, 2**31),
    at=st.integers(0, 10**6),
    remove=st.booleans(),
    data_seed=st.integers(0, 2**31),
)
def test_adding_or_removing_one_record_moves_no_other_record(n, seed, at, remove, data_seed):
    rng = np.random.default_rng(data_seed)
    x = torch.as_tensor(rng.random((n, 6)), dtype=torch.float32)
    y = torch.as_tensor(rng.integers(0, 10, n))
    base = ArrayData(x, y)
    i = at % n
    if remove:  # the neighbour without record i
        keep = np.delete(np.arange(n), i)
        other = base.subset(keep)
    else:  # the neighbour with one new record inserted at position i
        new = torch.as_tensor(rng.random((1, 6)), dtype=torch.float32)
        other = ArrayData(torch.cat([x[:i], new, x[i:]]), torch.cat([y[:i], torch.tensor([3]), y[i:]]))
    key = split_key(seed)
    before, after = _sides(base, key), _sides(other, key)
    for record in set(before) & set(after):
        assert before[record] == after[record]


def test_one_more_image_at_a_site_changes_no_other_training_image():
    """The issue's case: one image added to a 200-image site moved 13 training images."""
    digits = load_digits_data()
    cfg = DataConfig(partition="site")
    site = digits.subset(np.arange(200))
    plus = digits.subset(np.arange(201))
    (train, val), (train2, val2) = federate(site, cfg, 1, 0).sites[0], federate(plus, cfg, 1, 0).sites[0]
    extra = _rows(digits.subset(np.array([200])))
    assert _rows(train2) - extra == _rows(train) and _rows(val2) - extra == _rows(val)
    assert len(train2) + len(val2) == 201


def test_split_key_comes_from_the_seed_or_the_site_secret():
    assert split_key(0) == split_key(0) != split_key(1)
    secret = bytes(range(32))
    # a site secret alone decides the key: the split does not move with the run's seed
    assert split_key(0, secret) == split_key(7, secret) != split_key(0)
    assert len(split_key(0)) == 32


def test_every_demo_site_gets_training_and_validation_images():
    """The demo config: 8 sites of load_digits, Dirichlet(0.5), the keyed split."""
    split = federate(load_digits_data(), DataConfig(), num_sites=8, seed=0)
    for train, val in split.sites:
        assert len(val) >= 1 and len(train) >= DataConfig().min_site_size
    shares = [len(v) / (len(t) + len(v)) for t, v in split.sites]
    assert 0.1 < sum(len(v) for _, v in split.sites) / sum(len(t) + len(v) for t, v in split.sites) < 0.2, shares


def test_a_site_whose_split_leaves_no_validation_image_gets_one_clear_error():
    x = torch.full((4, 3), 0.5)
    with pytest.raises(ConfigError) as info:
        federate(ArrayData(x, torch.zeros(4, dtype=torch.long)), DataConfig(partition="site"), 1, 0)
    msg = str(info.value)
    assert info.value.key == "data.val-fraction" and len(msg.splitlines()) == 1
    assert "4 examples" in msg and "0.5" not in msg  # counts, never a data value


def test_eval_classifier_images_are_server_held_and_disjoint_from_every_site():
    n = 600
    x = torch.arange(n, dtype=torch.float32).unsqueeze(1).repeat(1, 4) / n  # every row unique
    data = ArrayData(x, torch.as_tensor(_labels(n)))
    split = federate(data, DataConfig(), num_sites=5, seed=1)
    clf, quality = _rows(split.classifier), _rows(split.quality)
    sites = set().union(*(_rows(t) | _rows(v) for t, v in split.sites))
    assert clf and quality and not clf & quality and clf | quality == _rows(split.test)
    assert not clf & sites and not quality & sites
    # the classifier's images do not depend on the sites' data: other site data, same part
    moved = dataclasses.replace(DataConfig(), alpha=5.0, val_fraction=0.3)
    assert _rows(federate(data, moved, num_sites=3, seed=1).classifier) == clf
