"""Ratings data for the recommender: loaders, pseudonymisation, generalisation, site split.

Every loader ends in :func:`pseudonymise`, the only place raw identifiers exist: it
replaces each user id by its HMAC pseudonym and each item id by its shared-table bucket
(:mod:`common.deploy.keys`), and generalises the quasi-identifiers (exact age -> age bucket,
zip code -> zip region) before anything else sees them. What leaves this module holds
no raw identifier, age or zip code.

Sources:
  * ``movielens``: the MovieLens 100K files ``u.data`` (user, item, rating, timestamp;
    tab-separated), ``u.user`` (id|age|gender|occupation|zip) and, when present,
    ``u.item`` (the catalogue: every item id, ranked in HR/NDCG even if unrated);
  * ``csv``: bring-your-own ``user,item,rating[,timestamp]`` with a header, plus an optional
    user-attributes CSV ``user[,gender][,age][,zip]``;
  * ``synthetic``: an embedded generator (latent factors + user-group effects), for demos
    and tests; it is synthetic, not real behaviour.

Each rating is held out or trained on by its own keyed draw (:func:`held_out_mask`): HMAC
of its (user, item) under the federation key, below ``data.test-fraction`` (0.2) = held
out. Adding or removing a rating moves no other rating, and file order does not matter.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from common.data.arrays import ArrayData
from common.deploy.keys import Pseudonymizer
from common.errors import ConfigError, DataError

AGE_BUCKETS = ((0, "<18"), (18, "18-24"), (25, "25-34"), (35, "35-44"), (45, "45-49"), (50, "50-55"), (56, "56+"))
ATTRIBUTES = ("gender", "age", "region")
UNKNOWN = "unknown"


def age_bucket(age: int | None) -> str:
    """Exact age -> the MovieLens-1M age groups (a generalised quasi-identifier)."""
    if age is None:
        return UNKNOWN
    label = AGE_BUCKETS[0][1]
    for lower, name in AGE_BUCKETS:
        if age >= lower:
            label = name
    return label


def zip_region(zipcode: str | None) -> str:
    """A US zip code -> its first digit (one of ten national areas); anything else -> other."""
    if not zipcode:
        return UNKNOWN
    z = zipcode.strip()
    return f"zip{z[0]}" if len(z) == 5 and z.isdigit() else "other"


def gender_label(value: str | None) -> str:
    v = (value or "").strip().upper()
    return v if v in ("M", "F") else UNKNOWN


@dataclass(frozen=True)
class Ratings:
    """Pseudonymised ratings of one data source (every user, before the site split).

    ``user`` indexes users in pseudonym order (sorting HMACs reveals nothing about raw ids);
    ``item`` is the shared-table bucket; ``attrs[a][u]`` is user u's generalised attribute;
    ``split_draw`` is each rating's keyed draw in [0, 1) (:meth:`Pseudonymizer.split_draw`).

    ``catalogue`` holds the buckets of the source's *declared* item list (MovieLens
    ``u.item``, the synthetic generator's items; none for ``csv``), never the rated items:
    the evaluation ranks over it, so it must not depend on which ratings exist.
    """

    user: np.ndarray  # int64 (N,)
    item: np.ndarray  # int64 (N,) bucket
    rating: np.ndarray  # float32 (N,)
    split_draw: np.ndarray  # float64 (N,) in [0, 1)
    num_users: int
    attrs: dict[str, np.ndarray]  # attribute -> (num_users,) str
    catalogue: np.ndarray  # int64 sorted unique buckets of the declared catalogue (may be empty)
    num_items: int  # distinct items of the declared catalogue
    colliding_items: int  # of those, items that share a bucket with another

    @property
    def collision_rate(self) -> float:
        return self.colliding_items / max(self.num_items, 1)


def pseudonymise(
    users: Iterable[str],
    items: Iterable[str],
    ratings: np.ndarray,
    user_attrs: dict[str, tuple[str | None, int | None, str | None]],
    catalogue_items: Iterable[str],
    pseudo: Pseudonymizer,
    num_buckets: int,
) -> Ratings:
    """Raw rows -> :class:`Ratings`. The raw ids passed in are not kept anywhere.

    ``user_attrs`` maps a raw user id to (gender, exact age, zip); they are generalised here.
    ``catalogue_items`` is the declared item list (public, not a function of the ratings).
    Each rating's split draw is keyed by its raw (user, item) pair, the one identity that is
    unique per rating and stable when other ratings come or go (a user's rank moves when
    users are added; a bucket is shared by colliding items); only the draw is kept.
    """
    raw_users = np.asarray(list(users), dtype=object)
    raw_items = np.asarray(list(items), dtype=object)
    uniq_u, inv_u = np.unique(raw_users, return_inverse=True)
    uniq_i, inv_i = np.unique(raw_items, return_inverse=True)
    macs = [pseudo.user(str(u)) for u in uniq_u]
    order = np.argsort(np.asarray(macs, dtype=object))  # users in pseudonym order
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    item_bucket = np.asarray([pseudo.item_bucket(str(i), num_buckets) for i in uniq_i], dtype=np.int64)
    declared = sorted(set(map(str, catalogue_items)))
    buckets_all = np.asarray([pseudo.item_bucket(i, num_buckets) for i in declared], dtype=np.int64)
    occupied, counts = np.unique(buckets_all, return_counts=True)
    # One HMAC per distinct (user, item) pair (a repeated pair lands on one side).
    pairs, pair_of_row = np.unique(np.stack([inv_u, inv_i]), axis=1, return_inverse=True)
    draws = np.asarray([pseudo.split_draw(str(uniq_u[a]), str(uniq_i[b])) for a, b in pairs.T], dtype=np.float64)
    attrs = {a: np.full(len(uniq_u), UNKNOWN, dtype=object) for a in ATTRIBUTES}
    for raw, r in zip(uniq_u, rank):
        gender, age, zipcode = user_attrs.get(str(raw), (None, None, None))
        attrs["gender"][r] = gender_label(gender)
        attrs["age"][r] = age_bucket(age)
        attrs["region"][r] = zip_region(zipcode)
    return Ratings(
        user=rank[inv_u],
        item=item_bucket[inv_i],
        rating=np.asarray(ratings, dtype=np.float32),
        split_draw=draws[np.asarray(pair_of_row).reshape(-1)],
        num_users=len(uniq_u),
        attrs=attrs,
        catalogue=occupied,
        num_items=len(declared),
        colliding_items=int(counts[counts > 1].sum()),
    )


# ------------------------------------------------------------------- loaders


# The roles a loader names its files by: what a site's error tells the coordinator
# instead of the path (common.errors.DataError.public_location).
RATINGS_FILE = "ratings file"
USERS_FILE = "users file"
ITEMS_FILE = "item list"
MOVIELENS_FOLDER = "MovieLens folder"


def _check_rating(path: Path, role: str, line: int, text: str, lo: float, hi: float) -> float:
    # Names the line and column, never the value: a site's error reaches the coordinator
    # as its code, role, line and column (client.mods.failure_text).
    try:
        value = float(text)
    except ValueError:
        raise DataError(
            path,
            f"line {line}: column rating is not a number",
            role=role,
            line=line,
            column="rating",
            code=DataError.PARSE,
        ) from None
    if not math.isfinite(value) or not lo <= value <= hi:
        raise DataError(
            path,
            f"line {line}: column rating is outside [{lo:g}, {hi:g}] (recsys.rating-min/max)",
            role=role,
            line=line,
            column="rating",
            code=DataError.PARSE,
        )
    return value


def _read_rows(path: Path, role: str, delimiter: str, encoding: str = "utf-8") -> list[tuple[int, list[str]]]:
    if not path.is_file():
        raise DataError(path, "not found", role=role, code=DataError.MISSING)
    line = 0
    try:
        with path.open(newline="", encoding=encoding) as fh:
            reader = csv.reader(fh, delimiter=delimiter)
            rows = []
            for row in reader:
                line = reader.line_num
                if row and any(row):
                    rows.append((line, row))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        # The class only: a decode error's message quotes the offending byte. The line is the
        # last one read whole (a decode error is in the block after it, not necessarily the line).
        raise DataError(path, f"cannot be read ({type(exc).__name__})", role=role) from None
    if not rows:
        raise DataError(path, "is empty", role=role, code=DataError.MISSING)
    return rows


def _parse_age(path: Path, role: str, line: int, text: str) -> int | None:
    if not text.strip():
        return None
    try:
        age = int(text)
    except ValueError:
        raise DataError(
            path, f"line {line}: column age is not an integer", role=role, line=line, column="age", code=DataError.PARSE
        ) from None
    if not 0 <= age <= 130:  # the value is not echoed
        raise DataError(
            path, f"line {line}: age is out of range [0, 130]", role=role, line=line, column="age", code=DataError.PARSE
        )
    return age


def load_movielens(
    folder: str | Path, pseudo: Pseudonymizer, num_buckets: int, rating_range: tuple[float, float]
) -> Ratings:
    """MovieLens 100K (``u.data``, ``u.user``, optional ``u.item``) from ``folder``."""
    root = Path(folder)
    if not root.is_dir():
        raise DataError(
            root,
            "MovieLens folder not found (set data.path to the ml-100k folder)",
            role=MOVIELENS_FOLDER,
            code=DataError.MISSING,
        )
    lo, hi = rating_range
    users: list[str] = []
    items: list[str] = []
    values: list[float] = []
    for line, row in _read_rows(root / "u.data", RATINGS_FILE, "\t"):
        if len(row) < 3:
            raise DataError(
                root / "u.data",
                f"line {line}: expected user, item, rating, timestamp; got {len(row)} field(s)",
                role=RATINGS_FILE,
                line=line,
            )
        users.append(row[0].strip())
        items.append(row[1].strip())
        values.append(_check_rating(root / "u.data", RATINGS_FILE, line, row[2], lo, hi))
    attrs: dict[str, tuple[str | None, int | None, str | None]] = {}
    for line, row in _read_rows(root / "u.user", USERS_FILE, "|"):
        if len(row) < 5:
            raise DataError(
                root / "u.user",
                f"line {line}: expected id|age|gender|occupation|zip; got {len(row)} field(s)",
                role=USERS_FILE,
                line=line,
            )
        attrs[row[0].strip()] = (row[2], _parse_age(root / "u.user", USERS_FILE, line, row[1]), row[4])
    catalogue: list[str] = []
    if (root / "u.item").is_file():  # titles are Latin-1
        catalogue = [row[0].strip() for _, row in _read_rows(root / "u.item", ITEMS_FILE, "|", encoding="latin-1")]
    return pseudonymise(users, items, np.asarray(values), attrs, catalogue, pseudo, num_buckets)


def load_ratings_csv(
    path: str | Path,
    pseudo: Pseudonymizer,
    num_buckets: int,
    rating_range: tuple[float, float],
    users_path: str | Path = "",
) -> Ratings:
    """Bring-your-own ratings: a CSV with header ``user,item,rating[,timestamp]``."""
    p = Path(path)
    rows = _read_rows(p, RATINGS_FILE, ",")
    header = [h.strip().lower() for h in rows[0][1]]
    missing = [c for c in ("user", "item", "rating") if c not in header]
    if missing:
        raise DataError(
            p,
            f"line {rows[0][0]}: header lacks column(s) {', '.join(missing)} (need user,item,rating[,timestamp])",
            role=RATINGS_FILE,
            line=rows[0][0],
            column=missing[0],
        )
    cu, ci, cr = header.index("user"), header.index("item"), header.index("rating")
    lo, hi = rating_range
    users, items, values = [], [], []
    for line, row in rows[1:]:
        if len(row) < len(header):
            raise DataError(
                p, f"line {line}: expected {len(header)} fields, got {len(row)}", role=RATINGS_FILE, line=line
            )
        for name, index in (("user", cu), ("item", ci)):
            if not row[index].strip():
                raise DataError(
                    p,
                    f"line {line}: column {name} is empty",
                    role=RATINGS_FILE,
                    line=line,
                    column=name,
                    code=DataError.PARSE,
                )
        users.append(row[cu].strip())
        items.append(row[ci].strip())
        values.append(_check_rating(p, RATINGS_FILE, line, row[cr], lo, hi))
    if not users:
        raise DataError(p, "has a header but no ratings", role=RATINGS_FILE, code=DataError.MISSING)
    attrs: dict[str, tuple[str | None, int | None, str | None]] = {}
    if users_path:
        up = Path(users_path)
        urows = _read_rows(up, USERS_FILE, ",")
        uh = [h.strip().lower() for h in urows[0][1]]
        if "user" not in uh:
            raise DataError(
                up,
                f"line {urows[0][0]}: header lacks column user (need user[,gender][,age][,zip])",
                role=USERS_FILE,
                line=urows[0][0],
                column="user",
            )
        col = {c: uh.index(c) for c in ("user", "gender", "age", "zip") if c in uh}
        for line, row in urows[1:]:
            if len(row) < len(uh):
                raise DataError(
                    up, f"line {line}: expected {len(uh)} fields, got {len(row)}", role=USERS_FILE, line=line
                )
            age = _parse_age(up, USERS_FILE, line, row[col["age"]]) if "age" in col else None
            attrs[row[col["user"]].strip()] = (
                row[col["gender"]] if "gender" in col else None,
                age,
                row[col["zip"]] if "zip" in col else None,
            )
    return pseudonymise(users, items, np.asarray(values), attrs, [], pseudo, num_buckets)


def synthetic_ratings(
    seed: int,
    num_users: int,
    num_items: int,
    per_user: int,
    pseudo: Pseudonymizer,
    num_buckets: int,
    rating_range: tuple[float, float] = (1.0, 5.0),
    center: float = 3.5,
    noise: float = 0.5,
    skew: float = 0.0,
) -> Ratings:
    """Synthetic ratings with latent structure and user groups (documented as synthetic).

    rating = clip(round(center + b_u + b_i + g_group + p_u.q_i + noise)), rank-4 factors,
    item popularity Zipf-like, and group effects by gender and age so that group
    metrics have something to find. Raw ids look like ``user-000042``; they go through the
    same pseudonymisation as real files.

    The noise has mean 0 and standard deviation ``noise``: Gaussian (``skew = 0``, the
    default, the same draws as before these options existed), else skew-normal with shape
    ``skew`` (< 0: a long tail toward low ratings, as in public rating histograms where
    4 is the mode and 1s outnumber what a symmetric spread gives).
    """
    rng = np.random.default_rng(seed)
    genders = rng.choice(["M", "F"], size=num_users, p=[0.65, 0.35])
    ages = rng.integers(15, 70, size=num_users)
    zips = [f"{d}{rng.integers(0, 10000):04d}" for d in rng.choice(10, size=num_users, p=_region_weights())]
    p = rng.normal(0, 0.45, size=(num_users, 4))
    q = rng.normal(0, 0.45, size=(num_items, 4))
    bu = rng.normal(0, 0.35, size=num_users) + np.where(genders == "F", 0.2, -0.05) + np.where(ages < 25, -0.2, 0.0)
    bi = rng.normal(0, 0.5, size=num_items)
    pop = 1.0 / np.arange(1, num_items + 1) ** 0.8
    pop = pop[rng.permutation(num_items)]
    pop /= pop.sum()
    users: list[str] = []
    items: list[str] = []
    values: list[float] = []
    lo, hi = rating_range
    k = min(per_user, num_items)
    for u in range(num_users):
        chosen = rng.choice(num_items, size=k, replace=False, p=pop)
        r = center + bu[u] + bi[chosen] + q[chosen] @ p[u] + _noise(rng, noise, skew, k)
        values.extend(np.clip(np.round(r), lo, hi).tolist())
        users.extend([f"user-{u:06d}"] * k)
        items.extend(f"item-{i:05d}" for i in chosen)
    attrs: dict[str, tuple[str | None, int | None, str | None]] = {
        f"user-{u:06d}": (str(genders[u]), int(ages[u]), zips[u]) for u in range(num_users)
    }
    catalogue = [f"item-{i:05d}" for i in range(num_items)]
    return pseudonymise(users, items, np.asarray(values), attrs, catalogue, pseudo, num_buckets)


def _noise(rng: np.random.Generator, std: float, skew: float, k: int) -> np.ndarray:
    """``k`` draws of mean 0 and standard deviation ``std``: Gaussian, or skew-normal of shape ``skew``."""
    if skew == 0:
        return rng.normal(0, std, size=k)
    d = skew / math.sqrt(1.0 + skew * skew)
    u0, u1 = rng.standard_normal(size=(2, k))
    z = d * np.abs(u0) + math.sqrt(1.0 - d * d) * u1  # skew-normal(skew)
    mean, sd = d * math.sqrt(2.0 / math.pi), math.sqrt(1.0 - 2.0 * d * d / math.pi)
    return std * (z - mean) / sd


def _region_weights() -> np.ndarray:
    w = np.array([6, 7, 8, 5, 6, 9, 6, 5, 4, 12], dtype=float)
    return w / w.sum()


# ------------------------------------------------------------------- sites


@dataclass(frozen=True)
class RatingData(ArrayData):
    """A site's ratings: ``x`` = (local user, item bucket) int64 pairs, ``y`` = rating.

    Held-out data also carries what the evaluation needs besides the ratings: the users'
    generalised attributes and the declared catalogue. Nothing about the site's *training*
    ratings: evaluation sums leave the site without DP noise (issue 18).
    """

    num_users: int = 0
    attrs: dict[str, np.ndarray] = field(default_factory=dict)
    catalogue: np.ndarray | None = None  # declared item buckets (see Ratings)
    collision_rate: float | None = None  # of the declared catalogue; None without one


def partition_users(data: Ratings, num_sites: int, how: str, seed: int) -> list[np.ndarray]:
    """Assign users to sites: by zip region (whole regions per site) or uniformly.

    ``site``: the data is one deployed site's own file, so every user is this site's.
    """
    if how == "site":
        return [np.arange(data.num_users)] * num_sites
    if how == "region":
        regions, inverse = np.unique(data.attrs["region"].astype(str), return_inverse=True)
        if num_sites > len(regions):
            raise ConfigError(
                "num-sites",
                f"is {num_sites} but the data has only {len(regions)} zip regions; "
                "lower num-sites or use data.partition=iid",
            )
        sizes = np.bincount(inverse, minlength=len(regions))
        load = np.zeros(num_sites, dtype=np.int64)
        owner = np.empty(len(regions), dtype=np.int64)
        for r in sorted(range(len(regions)), key=lambda r: (-sizes[r], regions[r])):  # largest region first
            owner[r] = int(np.argmin(load))
            load[owner[r]] += sizes[r]
        site_of_user = owner[inverse]
        return [np.flatnonzero(site_of_user == s) for s in range(num_sites)]
    if num_sites > data.num_users:
        raise ConfigError("num-sites", f"is {num_sites} but the data has only {data.num_users} users")
    perm = np.random.default_rng(seed).permutation(data.num_users)
    return [np.sort(p) for p in np.array_split(perm, num_sites)]


def held_out_mask(data: Ratings, fraction: float) -> np.ndarray:
    """A rating is held out iff its keyed draw is below ``fraction``: a per-record split.

    Neighbouring relation: add or remove one rating. The draw of a rating depends on its
    own (user, item) and the federation key only, so a neighbouring dataset splits every
    other rating the same way: one rating's protection is not group privacy over the
    ratings it would have moved, and the held-out set is not reshuffled. (A per-user
    quota, round(fraction * n_u), would move others whenever n_u changes.)

    Each user's held-out share is Binomial(n_u, fraction) / n_u: ``fraction`` on average,
    not exactly. A user may end with no held-out rating (not ranked; P = (1 - fraction)^n_u)
    or, rarely, with none in training (P = fraction^n_u: a cold-start user, evaluated with
    a user row that DP-SGD touched only through noise); neither is patched, since moving a
    rating to the other side would depend on the user's other ratings.
    """
    return np.asarray(data.split_draw) < fraction


def site_split(data: Ratings, users: np.ndarray, held: np.ndarray) -> tuple[RatingData, RatingData]:
    """(train, held-out) for the site holding ``users`` (global indices), with local user ids."""
    local = np.full(data.num_users, -1, dtype=np.int64)
    local[users] = np.arange(len(users))
    rows = local[data.user] >= 0
    u, i, r = local[data.user[rows]], data.item[rows], data.rating[rows]
    h = held[rows]
    attrs = {a: v[users] for a, v in data.attrs.items()}

    def make(mask: np.ndarray) -> RatingData:
        x = torch.as_tensor(np.stack([u[mask], i[mask]], axis=1), dtype=torch.long)
        return RatingData(
            x,
            torch.as_tensor(r[mask]),
            x[:, 0],  # the person key: the rating's (pseudonymous, site-local) user
            num_users=len(users),
            attrs=attrs,
            catalogue=data.catalogue,
            collision_rate=data.collision_rate if data.num_items else None,
        )

    return make(~h), make(h)
