"""The recommender's site data: ratings loaded, pseudonymised and split across sites (cached).

Raw user and item ids exist only inside :mod:`common.data.ratings` and are replaced by
keyed pseudonyms there; everything here is deterministic given the seed and the key.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from common.data.ratings import (
    MOVIELENS_FOLDER,
    RatingData,
    Ratings,
    held_out_mask,
    load_movielens,
    load_ratings_csv,
    partition_users,
    site_split,
    synthetic_ratings,
)
from common.deploy.keys import Pseudonymizer
from common.errors import ConfigError, DataError
from common.tasks.recsys.config import RecsysConfig


def default_movielens_path() -> Path | None:
    """``../shared/data/ml-100k`` from the working directory or beside the repository."""
    here = Path(__file__).resolve().parents[4]
    for base in (Path.cwd().parent, here):
        p = base / "shared" / "data" / "ml-100k"
        if p.is_dir():
            return p
    return None


@lru_cache(maxsize=4)
def _load(source: str, path: str, users_path: str, params: RecsysConfig, seed: int, key: bytes) -> Ratings:
    pseudo = Pseudonymizer(key)
    rng = (params.rating_min, params.rating_max)
    if source == "synthetic":
        return synthetic_ratings(
            seed,
            params.synthetic_users,
            params.synthetic_items,
            params.synthetic_ratings_per_user,
            pseudo,
            params.num_buckets,
            rng,
            params.synthetic_center,
            params.synthetic_noise,
            params.synthetic_skew,
        )
    if source == "movielens":
        folder = Path(path) if path else default_movielens_path()
        if folder is None:
            raise DataError(
                "../shared/data/ml-100k",
                "MovieLens 100K not found; set data.path to the ml-100k folder",
                role=MOVIELENS_FOLDER,
                code=DataError.MISSING,
            )
        return load_movielens(folder, pseudo, params.num_buckets, rng)
    if not path:
        raise ConfigError("data.path", "is required when data.source is csv")
    return load_ratings_csv(path, pseudo, params.num_buckets, rng, users_path)


@lru_cache(maxsize=4)
def cached_sites(
    source: str,
    path: str,
    users_path: str,
    params: RecsysConfig,
    seed: int,
    key: bytes,
    num_sites: int,
    partition: str,
    fraction: float,
) -> tuple[tuple[RatingData, RatingData], ...]:
    data = _load(source, path, users_path, params, seed, key)
    held = held_out_mask(data, fraction)  # keyed per rating: no seed, stable under add/remove
    return tuple(site_split(data, users, held) for users in partition_users(data, num_sites, partition, seed))
