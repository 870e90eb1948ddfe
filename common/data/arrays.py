"""Loading site data and splitting it across simulated sites.

Everything here is deterministic given the seed (and the split key), so the server and
every client compute the same split independently and no data has to be shipped around.

Two kinds of split live here:

* **The simulation's data generation** (seeded): the server-held test split and the
  partition of the rest across simulated sites. No deployed site runs these.
* **A site's own train/validation split** (keyed, :func:`keyed_split`): each record's
  side is decided by ``HMAC-SHA256(split key, domain || record)`` alone, so adding or
  removing one record moves no other record between training and validation. The DP
  neighbouring relation (add/remove one training image) then holds for the site's whole
  dataset: a neighbour differs in that one record's training or validation membership
  and in nothing else. (A seeded permutation, as before, moved about 13 of 200 images
  when one image was added: the real protection was group privacy over all of them.)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from cryptography.hazmat.primitives import hashes, hmac

from common.config import DataConfig
from common.config.limits import SITE_PARTITION  # noqa: F401 (re-exported: its old home)
from common.errors import ConfigError, DataError

_D = TypeVar("_D", bound="ArrayData")

# The npz file's role in a site's error to the coordinator (common.errors.DataError.public_location).
IMAGE_ARCHIVE = "image archive"


@dataclass(frozen=True)
class ArrayData:
    """In-memory examples: ``x`` float32 in [0, 1], ``y`` int64 labels or None.

    ``person``: for data with a person key, each record's person as a local index
    (int64, 0..persons-1) at the site; user-level DP (``dp.unit = "user"``) samples and
    clips by it. None when the records carry no person key.
    """

    x: torch.Tensor
    y: torch.Tensor | None
    person: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def subset(self, idx: np.ndarray) -> ArrayData:
        t = torch.as_tensor(idx, dtype=torch.long)
        return ArrayData(self.x[t], _take(self.y, t), _take(self.person, t))


def _take(t: torch.Tensor | None, idx: torch.Tensor) -> torch.Tensor | None:
    return None if t is None else t[idx]


def capped_per_person(data: _D, cap: int) -> _D:
    """``data`` with only the first ``cap`` records of each person (in the data's order).

    User-level DP evaluation: a person then adds at most ``cap`` records to any sum, and
    which of their records count depends on their own records only.
    """
    if data.person is None:
        raise ValueError("capped_per_person needs the records' person key")
    person = data.person
    order = torch.argsort(person, stable=True)
    sizes = torch.bincount(person)
    starts = torch.cumsum(sizes, 0) - sizes
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel()) - starts[person[order]]
    keep = rank < cap
    if bool(keep.all()):
        return data
    return dataclasses.replace(data, x=data.x[keep], y=_take(data.y, keep), person=person[keep])


def to_device(batch: ArrayData, device: torch.device) -> ArrayData:
    """The batch with its tensors on ``device``."""

    def move(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(device)

    return ArrayData(batch.x.to(device), move(batch.y), move(batch.person))


@dataclass(frozen=True)
class FederatedSplit:
    """A server-held test split and one (train, validation) pair per site.

    ``test`` is the whole server-held test split. It is itself divided (keyed, stable per
    record) into ``classifier``, the images the evaluation classifier of
    :mod:`common.metrics.image_quality` trains on, and ``quality``, the images FID, TSTR
    and the class distribution are measured on, so no metric is scored on the
    classifier's own training images and no site image ever reaches the classifier.
    """

    test: ArrayData
    sites: tuple[tuple[ArrayData, ArrayData], ...]
    classifier: ArrayData
    quality: ArrayData

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
        raise DataError(p, "not found", role=IMAGE_ARCHIVE, code=DataError.MISSING)
    arrays = _read_npz(p)
    if "x" not in arrays:
        raise DataError(
            p, "has no array 'x' (an .npz of images needs x, and optionally y)", role=IMAGE_ARCHIVE, column="x"
        )
    for name in ("x", "y"):  # a member that is not an .npy file comes back as its raw bytes
        if name in arrays and not isinstance(arrays[name], np.ndarray):
            raise DataError(p, f"member '{name}' is not a NumPy array (.npy)", role=IMAGE_ARCHIVE, column=name)
    x, yy = arrays["x"], arrays.get("y")
    assert isinstance(x, np.ndarray) and (yy is None or isinstance(yy, np.ndarray))  # checked just above
    if x.ndim < 2 or x.shape[0] == 0 or x[0].size == 0:
        raise DataError(
            p,
            f"'x' must have shape (N, ...) with N >= 1 and at least one value per example, got {x.shape}",
            role=IMAGE_ARCHIVE,
            column="x",
        )
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / 255.0
    elif np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer):
        x = x.astype(np.float32)
        if not np.isfinite(x).all():
            raise DataError(p, "'x' contains NaN or Inf", role=IMAGE_ARCHIVE, column="x", code=DataError.PARSE)
        if x.min() < 0 or x.max() > 1:  # the values are not echoed: they are the site's data
            raise DataError(
                p, "'x' values must lie in [0, 1] (or be uint8)", role=IMAGE_ARCHIVE, column="x", code=DataError.PARSE
            )
    else:
        raise DataError(p, f"'x' must be numeric, got dtype {x.dtype}", role=IMAGE_ARCHIVE, column="x")
    y = None
    if yy is not None:
        if yy.shape != (x.shape[0],) or not np.issubdtype(yy.dtype, np.integer):
            raise DataError(
                p,
                f"'y' must be integers of shape ({x.shape[0]},), got {yy.dtype} {yy.shape}",
                role=IMAGE_ARCHIVE,
                column="y",
            )
        y = torch.as_tensor(yy.astype(np.int64))
    return ArrayData(torch.as_tensor(x.reshape(x.shape[0], -1)), y)


# What an .npz starts with: a zip's first local header, or an empty zip's end record.
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_NPY_MAGIC = b"\x93NUMPY"
_HOW_TO_WRITE = "an .npz is a zip of .npy arrays: write one with numpy.savez(path, x=..., y=...)"


def _read_npz(p: Path) -> dict[str, np.ndarray | bytes]:
    """The archive's ``x`` and ``y`` members; a DataError naming the file and what is wrong.

    The file's first bytes are looked at before numpy is: numpy's own error for a file that
    is neither a zip nor an .npy (a CSV, say) is that it "contains pickled data" and can be
    loaded "unsafely", advice that must never reach a site operator (pickle runs code). No
    message repeats the file's bytes; a parser's message may quote them, so only its class
    is named."""
    try:
        with p.open("rb") as fh:
            head = fh.read(512)
    except OSError as exc:
        raise DataError(p, f"cannot be read ({type(exc).__name__})", role=IMAGE_ARCHIVE) from None
    if not head:
        raise DataError(p, f"is empty, not an .npz archive; {_HOW_TO_WRITE}", role=IMAGE_ARCHIVE)
    if head.startswith(_NPY_MAGIC):  # np.load would read a single-array .npy file
        raise DataError(
            p,
            "is a single .npy array, not an .npz archive; write one with numpy.savez(path, x=..., y=...)",
            role=IMAGE_ARCHIVE,
        )
    if not head.startswith(_ZIP_MAGIC):
        what = "is text (a CSV or the like)" if _looks_like_text(head) else "is not a zip file"
        raise DataError(p, f"{what}, so not an .npz archive; {_HOW_TO_WRITE}", role=IMAGE_ARCHIVE)
    try:
        with np.load(p, allow_pickle=False) as z:
            names = z.zip.namelist()
            if not any(n.endswith(".npy") for n in names):
                raise DataError(
                    p,
                    f"is a zip file with no .npy array in it, not an .npz archive; {_HOW_TO_WRITE}",
                    role=IMAGE_ARCHIVE,
                )
            arrays: dict[str, np.ndarray | bytes] = {}
            # Only the members privfed reads: another member is never decompressed (its size is
            # the file's business) and its name never reaches an error line.
            for k in (name for name in ("x", "y") if name in z.files):
                try:
                    arrays[k] = z[k]
                except Exception as exc:  # noqa: BLE001 - zipfile, zlib or the .npy parser, in many types
                    raise _member_error(p, z, k, exc) from None
            return arrays
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - a damaged zip fails in zipfile or zlib, in many types
        raise DataError(
            p, f"is a damaged zip file, not a readable .npz archive ({type(exc).__name__})", role=IMAGE_ARCHIVE
        ) from None


def _member_error(p: Path, z: np.lib.npyio.NpzFile, key: str, exc: Exception) -> DataError:
    """Why member ``key`` did not load: object arrays (never loaded), or a damaged .npy."""
    # A member name comes from the file: only the names the loader knows are repeated.
    which = f"member '{key}'" if key in ("x", "y") else "a member"
    column = key if key in ("x", "y") else None
    if _holds_objects(z, key):
        why = (
            f"{which} holds Python objects (an object array), which privfed never loads; "
            "save plain numeric arrays with numpy.savez(path, x=..., y=...)"
        )
    else:
        why = f"{which} is not a readable .npy array ({type(exc).__name__})"
    return DataError(p, why, role=IMAGE_ARCHIVE, column=column)


def _holds_objects(z: np.lib.npyio.NpzFile, key: str) -> bool:
    """Whether the member's .npy header declares an object dtype (read from the header only)."""
    fmt = np.lib.format
    if z.zip is None:  # closed: nothing to read
        return False
    try:
        with z.zip.open(key + ".npy") as fh:
            version = fmt.read_magic(fh)
            read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            return bool(read(fh)[2].hasobject)
    except Exception:  # noqa: BLE001 - a header that does not parse holds no object dtype we can name
        return False


def _looks_like_text(head: bytes) -> bool:
    """UTF-8 without NUL bytes (a CSV, a JSON file), allowing a character cut at the end."""
    import codecs

    if b"\x00" in head:
        return False
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return False
    return True


def load_images(cfg: DataConfig) -> ArrayData:
    if cfg.source == "digits":
        return load_digits_data()
    if cfg.source == "npz":
        return load_npz_images(cfg.path)
    raise ConfigError("data.source", f"is not an image source: {cfg.source!r}")


# ---------------------------------------------------------------- partitioning

# A deployed site whose data file holds only its own data (set from its site config).


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
    """Seeded split of ``range(n)`` into (rest, held-out fraction): the simulation's own
    test split only (data generation, not a site step; see :func:`keyed_split`)."""
    perm = np.random.default_rng(seed).permutation(n)
    k = int(round(n * fraction))
    return np.sort(perm[k:]), np.sort(perm[:k])


# Domain separation of every keyed hash in this module (the key itself is domain-separated too).
_KEY_DOMAIN = b"privfed/image-split-key/v1"
VALIDATION_DOMAIN = b"privfed/image-split/validation/v1"
CLASSIFIER_DOMAIN = b"privfed/image-split/eval-classifier/v1"
# The share of the server-held test split that trains the evaluation classifier; the rest
# (the "quality" part) is where the classifier's metrics are measured.
CLASSIFIER_FRACTION = 0.5


def split_key(seed: int, secret: bytes | None = None) -> bytes:
    """The 256-bit key of :func:`keyed_split`.

    With a site-local ``secret`` (a deployed site's federation key, when its task has one)
    the key is ``HMAC(secret, domain)``: nobody without the secret can tell which of a
    site's images are held out, and it does not depend on the run config, so a dataset's
    split stays the same from run to run. Without one, ``HMAC(domain, seed)`` from
    ``federation.seed``: a simulation's split is then reproducible like the rest of its
    data generation, and whoever knows the seed and an image can compute which side it is
    on (which says nothing about whether the image is at the site at all).
    """
    if secret:
        mac = hmac.HMAC(secret, hashes.SHA256())
        mac.update(_KEY_DOMAIN + b"\x00site-secret")
    else:
        mac = hmac.HMAC(_KEY_DOMAIN, hashes.SHA256())
        mac.update(b"seed\x00" + str(int(seed)).encode())
    return mac.finalize()


def record_positions(data: ArrayData, key: bytes, domain: bytes) -> np.ndarray:
    """Per record, a position in [0, 1) that depends on that record and the key alone.

    ``HMAC-SHA256(key, domain || 0x00 || len(image) || image || label)``, the image as its
    float32 little-endian bytes, the label as 0x01 + int64 (0x00 when unlabelled): an
    injective encoding, so two records share a position only when they are equal. The
    first 53 bits of the digest give the position (a float64 represents them exactly).
    """
    x = np.ascontiguousarray(data.x.numpy(), dtype="<f4")
    y = None if data.y is None else data.y.numpy().astype("<i8")
    base = hmac.HMAC(key, hashes.SHA256())
    base.update(domain + b"\x00" + int(x[0].nbytes if len(x) else 0).to_bytes(8, "little"))
    out = np.empty(len(x), dtype=np.float64)
    for i in range(len(x)):
        mac = base.copy()
        mac.update(x[i].tobytes())
        mac.update(b"\x00" if y is None else b"\x01" + y[i].tobytes())
        out[i] = (int.from_bytes(mac.finalize()[:8], "big") >> 11) / 2.0**53
    return out


def keyed_split(data: ArrayData, fraction: float, key: bytes, domain: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(rest, held out): a record is held out when its keyed position is below ``fraction``.

    Stable per record: adding or removing one record changes no other record's side, and
    the held-out share is ``fraction`` in expectation (Binomial, not exact).
    """
    held = record_positions(data, key, domain) < fraction
    return np.flatnonzero(~held), np.flatnonzero(held)


def _site_split(site: ArrayData, cfg: DataConfig, key: bytes, who: str) -> tuple[ArrayData, ArrayData]:
    """A site's (train, validation) by :func:`keyed_split`; one line when either is too small.

    Validation examples must never be training examples (they are reported without
    noise), and DP needs a real training set.
    """
    tr, va = keyed_split(site, cfg.val_fraction, key, VALIDATION_DOMAIN)
    require_split(who, "examples", len(tr), len(va), cfg.min_site_size)
    return site.subset(tr), site.subset(va)


def require_split(who: str, noun: str, train: int, validation: int, min_size: int) -> None:
    """A site's train/validation split must leave >= 1 validation record and a real training set."""
    if validation == 0 or train < min_size:
        raise ConfigError(
            "data.val-fraction",
            f"{who} has {train + validation} {noun}: {train} train / {validation} validation; "
            f"need >= {min_size} train (data.min-site-size) and >= 1 validation",
        )


def federate(
    data: ArrayData, cfg: DataConfig, num_sites: int, seed: int, secret: bytes | None = None
) -> FederatedSplit:
    """Server test split, then per-site partitions, then each site's validation split.

    ``data.partition = "site"`` (a deployed site's own file): all of it is this site's,
    split into train and validation only; there is no server test split. The
    train/validation split is keyed (:func:`split_key` from ``secret`` or ``seed``); the
    test split and the partition are the simulation's seeded data generation.
    """
    key = split_key(seed, secret)
    if cfg.partition == SITE_PARTITION:
        own = _site_split(data, cfg, key, "this site's data")
        empty = data.subset(np.zeros(0, dtype=np.int64))
        return FederatedSplit(test=empty, sites=(own,) * num_sites, classifier=empty, quality=empty)
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
    sites = tuple(_site_split(pool.subset(part), cfg, key, f"site {i}") for i, part in enumerate(parts))
    test = data.subset(test_idx)
    # The evaluation classifier's images: server-held, never a site's (finding 7 of issue 18).
    quality_idx, classifier_idx = keyed_split(test, CLASSIFIER_FRACTION, key, CLASSIFIER_DOMAIN)
    return FederatedSplit(
        test=test, sites=sites, classifier=test.subset(classifier_idx), quality=test.subset(quality_idx)
    )


@lru_cache(maxsize=4)
def cached_federated_split(cfg: DataConfig, num_sites: int, seed: int, secret: bytes | None = None) -> FederatedSplit:
    """One split per process: simulated clients share a worker, so load once."""
    return federate(load_images(cfg), cfg, num_sites, seed, secret)
