"""Loading site data and splitting it across simulated sites.

Everything here is deterministic given the seed, so the server and every client
compute the same split independently and no data has to be shipped around.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from common.config import DataConfig
from common.errors import ConfigError, DataError


@dataclass(frozen=True)
class ArrayData:
    """In-memory examples: ``x`` float32 in [0, 1], ``y`` int64 labels or None."""

    x: torch.Tensor
    y: torch.Tensor | None

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def subset(self, idx: np.ndarray) -> ArrayData:
        t = torch.as_tensor(idx, dtype=torch.long)
        return ArrayData(self.x[t], None if self.y is None else self.y[t])


def to_device(batch: ArrayData, device: torch.device) -> ArrayData:
    """The batch with its tensors on ``device``."""
    return ArrayData(batch.x.to(device), None if batch.y is None else batch.y.to(device))


@dataclass(frozen=True)
class FederatedSplit:
    """A server-held test split and one (train, validation) pair per site."""

    test: ArrayData
    sites: tuple[tuple[ArrayData, ArrayData], ...]

    def site_sizes(self) -> list[int]:
        return [len(train) for train, _ in self.sites]


# ---------------------------------------------------------------- loaders


def load_digits_data() -> ArrayData:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images; no download)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.data / 16.0, dtype=torch.float32)
    y = torch.tensor(bunch.target, dtype=torch.long)
    return ArrayData(x, y)


def load_npz_images(path: str | Path) -> ArrayData:
    """Bring-your-own images: an ``.npz`` with ``x`` (N, ...) and optional integer ``y`` (N,).

    ``x`` is flattened per example. uint8 images are scaled by 1/255; float images must
    already lie in [0, 1].
    """
    p = Path(path)
    if not str(path):
        raise ConfigError("data.path", "is required when data.source is npz")
    if not p.is_file():
        raise DataError(p, "not found")
    try:
        loaded = np.load(p, allow_pickle=False)
        if isinstance(loaded, np.ndarray):  # np.load also reads a single-array .npy file
            raise DataError(
                p, "is a single .npy array, not an .npz archive; write one with numpy.savez(path, x=..., y=...)"
            )
        with loaded as z:
            arrays = {k: z[k] for k in z.files}
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - a damaged archive fails in zipfile, zlib or the .npy parser, in many types
        raise DataError(p, f"not a readable .npz archive ({type(exc).__name__}: {exc})") from None
    if "x" not in arrays:
        raise DataError(p, f"has no array 'x' (found: {', '.join(sorted(arrays)) or 'none'})")
    for name in ("x", "y"):  # a member that is not an .npy file comes back as its raw bytes
        if name in arrays and not isinstance(arrays[name], np.ndarray):
            raise DataError(p, f"member '{name}' is not a NumPy array (.npy)")
    x = arrays["x"]
    if x.ndim < 2 or x.shape[0] == 0 or x[0].size == 0:
        raise DataError(
            p, f"'x' must have shape (N, ...) with N >= 1 and at least one value per example, got {x.shape}"
        )
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / 255.0
    elif np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer):
        x = x.astype(np.float32)
        if not np.isfinite(x).all():
            raise DataError(p, "'x' contains NaN or Inf")
        if x.min() < 0 or x.max() > 1:
            raise DataError(p, f"'x' values must lie in [0, 1] (or be uint8), got [{x.min():g}, {x.max():g}]")
    else:
        raise DataError(p, f"'x' must be numeric, got dtype {x.dtype}")
    y = None
    if "y" in arrays:
        yy = arrays["y"]
        if yy.shape != (x.shape[0],) or not np.issubdtype(yy.dtype, np.integer):
            raise DataError(p, f"'y' must be integers of shape ({x.shape[0]},), got {yy.dtype} {yy.shape}")
        y = torch.as_tensor(yy.astype(np.int64))
    return ArrayData(torch.as_tensor(x.reshape(x.shape[0], -1)), y)


def load_images(cfg: DataConfig) -> ArrayData:
    if cfg.source == "digits":
        return load_digits_data()
    if cfg.source == "npz":
        return load_npz_images(cfg.path)
    raise ConfigError("data.source", f"is not an image source: {cfg.source!r}")


# ---------------------------------------------------------------- partitioning

# A deployed site whose data file holds only its own data (set from its site config).
SITE_PARTITION = "site"


def dirichlet_partition(
    labels: np.ndarray, num_sites: int, alpha: float, seed: int, min_size: int, max_tries: int = 100
) -> list[np.ndarray]:
    """Non-IID label split: for each class, site shares ~ Dirichlet(alpha).

    Resamples (up to ``max_tries``) until every site has at least ``min_size`` examples,
    the usual way to keep small-alpha splits usable.
    """
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _ in range(max_tries):
        parts: list[list[int]] = [[] for _ in range(num_sites)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            shares = rng.dirichlet(np.full(num_sites, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for site, chunk in enumerate(np.split(idx, cuts)):
                parts[site].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise ConfigError(
        "data.alpha",
        f"no Dirichlet(alpha={alpha}) split of {len(labels)} examples gave all {num_sites} sites "
        f">= {min_size} examples in {max_tries} tries; raise data.alpha or lower num-sites",
    )


def iid_partition(n: int, num_sites: int, seed: int) -> list[np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    return [np.sort(p) for p in np.array_split(perm, num_sites)]


def split_indices(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of ``range(n)`` into (rest, held-out fraction)."""
    perm = np.random.default_rng(seed).permutation(n)
    k = int(round(n * fraction))
    return np.sort(perm[k:]), np.sort(perm[:k])


def federate(data: ArrayData, cfg: DataConfig, num_sites: int, seed: int) -> FederatedSplit:
    """Server test split, then per-site partitions, then each site's validation split.

    ``data.partition = "site"`` (a deployed site's own file): all of it is this site's,
    split into train and validation only; there is no server test split.
    """
    if cfg.partition == SITE_PARTITION:
        tr, va = split_indices(len(data), cfg.val_fraction, seed + 1)
        if len(va) == 0 or len(tr) < cfg.min_site_size:
            raise ConfigError(
                "data.val-fraction",
                f"this site's data has {len(data)} examples: {len(tr)} train / {len(va)} validation; "
                f"need >= {cfg.min_site_size} train (data.min-site-size) and >= 1 validation",
            )
        own = (data.subset(tr), data.subset(va))
        return FederatedSplit(test=data.subset(np.zeros(0, dtype=np.int64)), sites=(own,) * num_sites)
    min_total = num_sites * (cfg.min_site_size + 1)
    if len(data) * (1 - cfg.test_fraction) < min_total:
        raise ConfigError(
            "num-sites",
            f"{num_sites} sites need >= {min_total} training examples "
            f"({cfg.min_site_size} + 1 validation each) but the data has {len(data)} in all",
        )
    train_idx, test_idx = split_indices(len(data), cfg.test_fraction, seed)
    pool = data.subset(train_idx)
    # A site's partition holds its train + validation examples.
    min_part = int(np.ceil((cfg.min_site_size + 1) / (1 - cfg.val_fraction)))
    if cfg.partition == "dirichlet" and pool.y is not None:
        parts = dirichlet_partition(pool.y.numpy(), num_sites, cfg.alpha, seed, min_part)
    else:
        parts = iid_partition(len(pool), num_sites, seed)
    sites = []
    for i, part in enumerate(parts):
        site = pool.subset(part)
        tr, va = split_indices(len(site), cfg.val_fraction, seed + 1 + i)
        # Validation examples must never be training examples (they are reported
        # without noise), and DP needs a real training set.
        if len(va) == 0 or len(tr) < cfg.min_site_size:
            raise ConfigError(
                "data.val-fraction",
                f"site {i} has {len(site)} examples: {len(tr)} train / {len(va)} validation; "
                f"need >= {cfg.min_site_size} train (data.min-site-size) and >= 1 validation",
            )
        sites.append((site.subset(tr), site.subset(va)))
    return FederatedSplit(test=data.subset(test_idx), sites=tuple(sites))


@lru_cache(maxsize=4)
def cached_federated_split(cfg: DataConfig, num_sites: int, seed: int) -> FederatedSplit:
    """One split per process: simulated clients share a worker, so load once."""
    return federate(load_images(cfg), cfg, num_sites, seed)
