"""Federated recommender: biased matrix factorisation (or a neural variant) over ratings.

Sites are organisations holding their own users' ratings of a shared item catalogue.

Model, for user u and item bucket i (:mod:`common.deploy.keys` maps items to buckets):

    r_hat(u, i) = mu + b_u + b_i + p_u . q_i            (mf)
    r_hat(u, i) = mu + b_u + b_i + p_u . q_i + MLP([p_u, q_i])   (neural)

trained on the squared error (r_hat - r)^2 of each rating.

What is federated and what stays: ``mu``, the item table (``q``, ``b_i``) and the MLP are
shared and averaged by the server; the user table (``p``, ``b_u``) is sized by the
site's own users, never sent, and kept in the SuperNode's state between rounds.

Privacy. The unit of privacy is **one rating**. DP-SGD clips the gradient of each rating's
loss over *all* parameters, user rows included, and noises the sum, so the user table is
itself an output of the DP mechanism and the shared update the site sends is
post-processing of it. (Training the user table without noise would let one rating move
the user's embedding freely, and through it the gradients of that user's other ratings:
the per-rating sensitivity bound would no longer hold.) Rating-level DP is **not**
user-level DP: a user with m ratings is protected with roughly m times the epsilon
(group privacy), which for MovieLens users (20 to 737 ratings) is a weak guarantee.

Evaluation (per site, on the held-out 20% of each user's ratings): RMSE and MAE, and
HR@k / NDCG@k ranking the whole catalogue minus the user's training items, with the
user's held-out items as relevant. Sites send sums and counts (not per-user values);
the server combines them (:meth:`RecsysTask.combine_metrics`); under SecAgg+ they travel
inside the masked fit vector (:meth:`RecsysTask.sum_keys`), so the server learns only
their sums over sites. Group metrics
(gender, age bucket) are sent only for groups of at least ``recsys.min-group-size`` users
and reported only when the combined group reaches it too, with complementary suppression
(:func:`suppressed_groups`) so that no small group can be recovered by subtraction.

Fairness (math in :mod:`common.metrics.fairness`, design in ``docs/FAIRNESS.md``):

* per group: RMSE, MAE, NDCG@k (exact from summed group sums);
* Yao & Huang's unfairness for gender (F vs M): ``unfairness.gender.{value, absolute,
  underestimation, overestimation, non_parity}``. Non-parity is exact. The four
  item-level ones average per-item terms over (site, item) cells: each site computes the
  per-item group means from its own ratings and sends only the sum of each term over
  its items and the number of items (``yh.gender.*``); no per-item value leaves it.
  That equals the centralised metric when no item has held-out ratings at two sites,
  and is a pooled-over-sites estimate otherwise;
* popularity bias: mean popularity of the top-k recommended items (``pop_at_k``) and of
  held-out items (``pop_held_out``), and their ratio ``pop_lift``; an item's popularity is
  the share of the site's users who rated it in training (site-local, so sums suffice);
* catalogue coverage, a union over sites, bounded from sums: ``coverage_site_mean``
  (the sites' mean coverage, a lower bound) and ``coverage_upper`` (an upper bound).

Bias correction (``recsys.correction = "group-offset"``, docs/FAIRNESS.md): an
offset ``b[g(u), i]`` per (gender group, item bucket) added to the prediction, shared like
the item table and trained by the same per-rating loss, so DP-SGD clips and noises it
with everything else (one more lookup per rating); after every local step the table
decays by a fixed factor (``recsys.correction-lambda``), a data-independent map with no
privacy cost. The user -> group map stays at the site.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from common.data.arrays import ArrayData
from common.data.ratings import (
    AGE_BUCKETS,
    UNKNOWN,
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
from common.errors import ConfigError, DataError, PrivfedError
from common.metrics.fairness import (
    YAO_HUANG_SUMS,
    coverage,
    item_popularity,
    popularity_bias,
    sum_statistics,
    yao_huang,
    yao_huang_sums,
)
from common.tasks import register_task
from common.tasks.base import Task

if TYPE_CHECKING:
    from common.privacy.training import LocalSession

GROUP_ATTRIBUTES = ("gender", "age")
# Sums a site sends (all additive over sites; see docs/FAIRNESS.md).
SUM_KEYS = (
    "sse",
    "sae",
    "n_ratings",
    "n_ranked",
    "hits",
    "dcg",
    "groups_suppressed",
    "pop_at_k_sum",
    "pop_at_k_n",
    "pop_held_out_sum",
    "coverage_sum",
    "coverage_sites",
)
# Per reported group: squared and absolute errors, predictions, ratings, users, NDCG.
GROUP_SUMS = ("sse", "sae", "pred", "n", "users", "dcg")
# Yao & Huang's metrics are for a binary attribute: gender, F against M.
YH_ATTRIBUTE, YH_GROUPS = "gender", ("F", "M")
YH_PREFIX = f"yh.{YH_ATTRIBUTE}."  # a site's sums: items, and one sum per term
# Every value a group attribute can take after generalisation (common.data.ratings): the public
# vocabulary of the secure-sum schema (RecsysTask.sum_keys).
GROUP_VALUES = {"gender": ("F", "M", UNKNOWN), "age": (*(name for _, name in AGE_BUCKETS), UNKNOWN)}


CORRECTIONS = ("none", "group-offset")


@dataclass(frozen=True)
class RecsysConfig:
    model: str = "mf"  # mf | neural
    dim: int = 8
    hidden_dim: int = 32
    # Rows of the shared item table; items are hashed into them (collision rate ~ items/buckets).
    num_buckets: int = 131072
    init_std: float = 0.1
    # L2 penalty per rating on the embeddings and biases it touches (classic MF regularisation).
    l2: float = 0.0
    rating_min: float = 1.0
    rating_max: float = 5.0
    top_k: int = 10
    # k: smaller groups are not sent by sites nor reported by the server.
    min_group_size: int = 10
    synthetic_users: int = 600
    synthetic_items: int = 300
    synthetic_ratings_per_user: int = 40
    # Bias correction: none | group-offset (a gender x item offset trained inside DP-SGD).
    correction: str = "none"
    # Decay of the offset table after every local step, b <- b / (1 + lr * lambda): offsets
    # without a consistent signal (rare cells, DP noise) fade to 0. 0 = no decay.
    correction_lambda: float = 0.1

    def validate(self) -> None:
        def need(cond: bool, key: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"recsys.{key}", msg)

        need(self.model in MODELS, "model", f"must be one of {', '.join(MODELS)}, got {self.model!r}")
        need(self.dim >= 1, "dim", f"must be >= 1, got {self.dim}")
        need(self.hidden_dim >= 1, "hidden-dim", f"must be >= 1, got {self.hidden_dim}")
        need(2 <= self.num_buckets <= 2**24, "num-buckets", f"must be in [2, 2^24], got {self.num_buckets}")
        need(self.init_std > 0, "init-std", f"must be > 0, got {self.init_std}")
        need(self.l2 >= 0, "l2", f"must be >= 0, got {self.l2}")
        need(self.rating_min < self.rating_max, "rating-max", f"must be > recsys.rating-min, got {self.rating_max}")
        need(self.top_k >= 1, "top-k", f"must be >= 1, got {self.top_k}")
        need(self.min_group_size >= 1, "min-group-size", f"must be >= 1, got {self.min_group_size}")
        need(self.synthetic_users >= 2, "synthetic-users", f"must be >= 2, got {self.synthetic_users}")
        need(self.synthetic_items >= 2, "synthetic-items", f"must be >= 2, got {self.synthetic_items}")
        need(
            2 <= self.synthetic_ratings_per_user <= self.synthetic_items,
            "synthetic-ratings-per-user",
            f"must be in [2, recsys.synthetic-items], got {self.synthetic_ratings_per_user}",
        )
        need(
            self.correction in CORRECTIONS,
            "correction",
            f"must be one of {', '.join(CORRECTIONS)}, got {self.correction!r}",
        )
        need(self.correction_lambda >= 0, "correction-lambda", f"must be >= 0, got {self.correction_lambda}")


# ------------------------------------------------------------------- models


class BiasedMF(nn.Module):
    """mu + b_u + b_i + p_u . q_i. Every table is an nn.Embedding looked up once per rating
    (mu too, as a 1-row table), which is what the fast DP engine's per-example norms need."""

    def __init__(
        self, num_users: int, num_buckets: int, p: RecsysConfig, user_group: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        self.num_buckets = num_buckets
        self.user_emb = nn.Embedding(num_users, p.dim)
        self.user_bias = nn.Embedding(num_users, 1)
        self.item_emb = nn.Embedding(num_buckets, p.dim)
        self.item_bias = nn.Embedding(num_buckets, 1)
        self.global_bias = nn.Embedding(1, 1)
        for emb in (self.user_emb, self.item_emb):
            nn.init.normal_(emb.weight, std=p.init_std)
        for emb in (self.user_bias, self.item_bias):
            nn.init.zeros_(emb.weight)
        nn.init.constant_(self.global_bias.weight, (p.rating_min + p.rating_max) / 2)
        # The bias correction (recsys.correction=group-offset): b_{g(u), i}, one row
        # per (gender group, item bucket), shared like the item table. ``user_group`` maps
        # the site's users to OFFSET_GROUPS; it is site data, so a plain attribute (not a
        # parameter or buffer): never in the state dict, never sent.
        self.group_item_bias: nn.Embedding | None = None
        self.user_group = torch.zeros(0, dtype=torch.long)
        if user_group is not None:
            self.user_group = torch.as_tensor(user_group, dtype=torch.long)
            self.group_item_bias = nn.Embedding(len(OFFSET_GROUPS) * num_buckets, 1)
            nn.init.zeros_(self.group_item_bias.weight)

    def _apply(self, fn, recurse=True):  # .to(device) moves the user -> group map too
        self.user_group = fn(self.user_group)
        return super()._apply(fn, recurse)

    def parts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mu + b_u + b_i [+ b_{g(u),i}], p_u, q_i) per row; also remembers the squared norms for :meth:`penalty`."""
        u, i = x[:, 0], x[:, 1]
        pu, qi = self.user_emb(u), self.item_emb(i)
        bu, bi = self.user_bias(u).squeeze(1), self.item_bias(i).squeeze(1)
        self._sq = pu.pow(2).sum(1) + qi.pow(2).sum(1) + bu.pow(2) + bi.pow(2)
        base = self.global_bias(torch.zeros_like(u)).squeeze(1) + bu + bi
        if self.group_item_bias is not None:
            # One lookup per rating (what the fast DP engine's per-example norms need).
            base = base + self.group_item_bias(self.user_group[u] * self.num_buckets + i).squeeze(1)
        return base, pu, qi

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base, pu, qi = self.parts(x)
        return base + (pu * qi).sum(1)

    def penalty(self) -> torch.Tensor:
        """Per-row |p_u|^2 + |q_i|^2 + b_u^2 + b_i^2 of the last forward (same lookups, so the
        per-example gradient structure the fast DP engine relies on is unchanged)."""
        return self._sq


class NeuralMF(BiasedMF):
    """Biased MF plus an MLP on the concatenated embeddings (NeuMF-style)."""

    def __init__(
        self, num_users: int, num_buckets: int, p: RecsysConfig, user_group: torch.Tensor | None = None
    ) -> None:
        super().__init__(num_users, num_buckets, p, user_group)
        self.mlp = nn.Sequential(nn.Linear(2 * p.dim, p.hidden_dim), nn.ReLU(), nn.Linear(p.hidden_dim, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base, pu, qi = self.parts(x)
        return base + (pu * qi).sum(1) + self.mlp(torch.cat([pu, qi], 1)).squeeze(1)


MODELS: dict[str, type[BiasedMF]] = {"mf": BiasedMF, "neural": NeuralMF}
# State that never leaves a site.
LOCAL_PREFIXES = ("user_emb.", "user_bias.")
# Rows of the bias correction per item bucket: gender F, M, and everyone else.
OFFSET_GROUPS = ("F", "M", "other")


def offset_groups(gender: np.ndarray) -> torch.Tensor:
    """Each user's row group in the correction table (index into OFFSET_GROUPS)."""
    g = np.asarray(gender).astype(str)
    return torch.as_tensor(np.where(g == "F", 0, np.where(g == "M", 1, 2)), dtype=torch.long)


# ------------------------------------------------------------------- data


def default_movielens_path() -> Path | None:
    """``../shared/data/ml-100k`` from the working directory or beside the repository."""
    here = Path(__file__).resolve().parents[3]
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
        )
    if source == "movielens":
        folder = Path(path) if path else default_movielens_path()
        if folder is None:
            raise DataError("../shared/data/ml-100k", "MovieLens 100K not found; set data.path to the ml-100k folder")
        return load_movielens(folder, pseudo, params.num_buckets, rng)
    if not path:
        raise ConfigError("data.path", "is required when data.source is csv")
    return load_ratings_csv(path, pseudo, params.num_buckets, rng, users_path)


@lru_cache(maxsize=4)
def _sites(
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
    held = held_out_mask(data, fraction, seed)
    return tuple(site_split(data, users, held) for users in partition_users(data, num_sites, partition, seed))


# ------------------------------------------------------------------- task


@register_task("recsys")
class RecsysTask(Task):
    config_cls = RecsysConfig
    unit_of_privacy = "rating"
    data_sources = ("synthetic", "movielens", "csv")
    partitions = ("region", "iid", "site")
    primary_metric = "rmse"
    needs_key = True
    test_description = "held-out ratings at the sites (20% per user), combined from their sums"
    plot_metrics = ("unfairness.gender.value", "unfairness.gender.non_parity", "pop_lift", "coverage_site_mean")

    params: RecsysConfig

    def _split(self) -> tuple[tuple[RatingData, RatingData], ...]:
        if self.key is None:
            raise PrivfedError("the recommender's data can only be read at a site holding the federation key")
        d, f = self.cfg.data, self.cfg.federation
        sites = _sites(
            d.source, d.path, d.users_path, self.params, f.seed, self.key, f.num_sites, d.partition, d.test_fraction
        )
        for s, (train, test) in enumerate(sites):
            if len(train) < d.min_site_size or len(test) == 0:
                raise ConfigError(
                    "num-sites",
                    f"site {s} has {len(train)} training / {len(test)} held-out ratings; need >= {d.min_site_size} "
                    "(data.min-site-size) and >= 1: use fewer sites",
                )
        return sites

    def site_data(self, site_index: int) -> tuple[RatingData, RatingData]:
        return self._split()[site_index]

    def server_test_data(self) -> None:
        return None  # held-out ratings belong to users, who live at the sites

    def site_sizes(self) -> list[int]:
        return [len(train) for train, _ in self._split()]

    # ---------------------------------------------------------------- model
    @property
    def correction(self) -> str:
        return self.params.correction

    def build_model(self, site_index: int | None = None) -> BiasedMF:
        train = self.site_data(site_index)[0] if site_index is not None else None
        groups = None
        if self.correction == "group-offset":  # the server's model has the (shared) table too
            groups = offset_groups(train.attrs["gender"]) if train is not None else torch.zeros(0, dtype=torch.long)
        users = train.num_users if train is not None else 0
        return MODELS[self.params.model](users, self.params.num_buckets, self.params, groups)

    def shared_keys(self, model: nn.Module) -> list[str]:
        return [k for k in model.state_dict() if not k.startswith(LOCAL_PREFIXES)]

    def per_sample_loss(self, model: nn.Module, batch: ArrayData) -> torch.Tensor:
        assert batch.y is not None
        loss = (model(batch.x) - batch.y).pow(2)
        return loss + self.params.l2 * model.penalty() if self.params.l2 else loss

    def train(self, model: nn.Module, session: LocalSession) -> dict[str, float]:
        """The base loop, plus decoupled decay of the correction table after every step.

        ``b <- b / (1 + lr * correction-lambda)`` on every row: a fixed map of the parameters
        DP-SGD just released, applied whatever the data (post-processing between steps,
        no privacy cost). Rows whose gradient is mostly noise (rare (group, item) cells,
        DP noise) decay to 0; rows with a consistent signal hold their value. A per-rating
        L2 term would instead shrink every offset by the same factor, rare or not.
        """
        decay = self.cfg.train.lr * self.params.correction_lambda
        table = getattr(model, "group_item_bias", None)
        if table is None or decay == 0:
            return super().train(model, session)
        total, count = 0.0, 0
        for batch in session.batches():
            losses = self.per_sample_loss(model, batch)
            session.step(losses)
            with torch.no_grad():
                table.weight.div_(1.0 + decay)
            total += float(losses.detach().sum())
            count += len(batch)
        return {"train_loss": total / max(count, 1)}

    # ----------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: ArrayData) -> dict[str, float]:
        if not isinstance(data, RatingData) or data.y is None:
            raise TypeError("recsys evaluation needs RatingData")
        p = self.params
        model.eval()
        device = next(model.parameters()).device
        pred = model(data.x.to(device)).clamp(p.rating_min, p.rating_max).cpu().numpy().astype(np.float64)
        rating = data.y.numpy().astype(np.float64)
        err = pred - rating
        hits, dcg, top = self._ranking(model, data, device)
        model.train()
        out: dict[str, float] = {
            "sse": float(np.sum(err**2)),
            "sae": float(np.sum(np.abs(err))),
            "n_ratings": float(len(err)),
            "n_ranked": float(len(hits)),
            "hits": float(hits.sum()),
            "dcg": float(dcg.sum()),
            "item_collision_rate": data.collision_rate,
            **self._popularity(data, top),
            **self._group_sums(data, pred, rating, dcg),
        }
        return {**derived(out), **out}

    def _group_sums(self, data: RatingData, pred: np.ndarray, rating: np.ndarray, dcg: np.ndarray) -> dict[str, float]:
        """Sums per group of >= k users (the rest withheld, :func:`suppressed_groups`), and
        Yao & Huang's per-site sums when both of its groups are sent."""
        users, items = data.x[:, 0].numpy(), data.x[:, 1].numpy()
        err = pred - rating
        ranked_users = np.unique(users)  # the rows of dcg
        out: dict[str, float] = {}
        suppressed = 0
        for attr in GROUP_ATTRIBUTES:
            labels = data.attrs[attr]
            sizes = {str(v): int(np.sum(labels[ranked_users] == v)) for v in np.unique(labels[ranked_users])}
            hidden = suppressed_groups(sizes, self.params.min_group_size)
            suppressed += len(hidden)
            sent = sorted(set(sizes) - hidden)
            for value in sent:
                rows = labels[users] == value
                prefix = f"group.{attr}.{value}."
                out[prefix + "sse"] = float(np.sum(err[rows] ** 2))
                out[prefix + "sae"] = float(np.sum(np.abs(err[rows])))
                out[prefix + "pred"] = float(np.sum(pred[rows]))
                out[prefix + "n"] = float(rows.sum())
                out[prefix + "users"] = float(sizes[value])
                out[prefix + "dcg"] = float(dcg[labels[ranked_users] == value].sum())
            if attr == YH_ATTRIBUTE and set(YH_GROUPS) <= set(sent):
                in_g, in_h = (labels[users] == v for v in YH_GROUPS)
                out.update({YH_PREFIX + k: v for k, v in yao_huang_sums(items, pred, rating, in_g, in_h).items()})
        out["groups_suppressed"] = float(suppressed)
        return out

    @staticmethod
    def _popularity(data: RatingData, top: np.ndarray) -> dict[str, float]:
        """Sums for popularity bias and coverage; ``top`` holds catalogue positions (-1: none)."""
        assert data.catalogue is not None and data.seen is not None
        cat = np.asarray(data.catalogue)
        pop = item_popularity(data.seen[0], data.seen[1], cat, data.num_users)
        shown = top[top >= 0]
        return {
            "pop_at_k_sum": float(pop[shown].sum()),
            "pop_at_k_n": float(len(shown)),
            "pop_held_out_sum": float(pop[np.searchsorted(cat, data.x[:, 1].numpy())].sum()),
            "coverage_sum": len(np.unique(shown)) / max(len(cat), 1),
            "coverage_sites": 1.0,
        }

    def _ranking(
        self, model: nn.Module, data: RatingData, device: torch.device
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per held-out user: hit@k (0/1), NDCG@k and the top-k (catalogue positions; -1 where
        fewer than k items are left), ranking catalogue items they did not train on."""
        k = self.params.top_k
        assert data.catalogue is not None and data.seen is not None
        cat = np.asarray(data.catalogue)
        users = np.unique(data.x[:, 0].numpy())
        held_u, held_i = data.x[:, 0].numpy(), data.x[:, 1].numpy()
        seen_u, seen_i = data.seen
        hits = np.zeros(len(users))
        ndcg = np.zeros(len(users))
        tops = np.full((len(users), min(k, len(cat))), -1, dtype=np.int64)
        discounts = 1.0 / np.log2(np.arange(2, k + 2))
        cat_t = torch.as_tensor(cat, dtype=torch.long, device=device)
        for start in range(0, len(users), 64):
            chunk = users[start : start + 64]
            row = {u: j for j, u in enumerate(chunk)}
            pairs = torch.stack(
                [torch.as_tensor(chunk, device=device).repeat_interleave(len(cat)), cat_t.repeat(len(chunk))], 1
            )
            scores = model(pairs).view(len(chunk), len(cat)).cpu().numpy()
            relevant = np.zeros_like(scores, dtype=bool)
            m = np.isin(held_u, chunk)
            relevant[[row[u] for u in held_u[m]], np.searchsorted(cat, held_i[m])] = True
            m = np.isin(seen_u, chunk)
            scores[[row[u] for u in seen_u[m]], np.searchsorted(cat, seen_i[m])] = -np.inf
            top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
            tops[start : start + len(chunk)] = np.where(np.isfinite(np.take_along_axis(scores, top, 1)), top, -1)
            gains = np.take_along_axis(relevant, top, 1)
            n_rel = relevant.sum(1)
            ideal = np.array([discounts[: min(k, int(r))].sum() for r in n_rel])
            hits[start : start + len(chunk)] = gains.any(1)
            ndcg[start : start + len(chunk)] = np.where(
                ideal > 0, (gains * discounts).sum(1) / np.maximum(ideal, 1e-12), 0.0
            )
        return hits, ndcg, tops

    def sum_keys(self) -> tuple[str, ...]:
        """Every sum a site can send, for every group of the public vocabulary (86 keys)."""
        groups = tuple(f"group.{a}.{v}.{s}" for a in GROUP_ATTRIBUTES for v in GROUP_VALUES[a] for s in GROUP_SUMS)
        return SUM_KEYS + groups + tuple(YH_PREFIX + k for k in YAO_HUANG_SUMS)

    def is_sum_key(self, key: str) -> bool:
        return is_sum_key(key)

    def combine_sums(self, sums: dict[str, float]) -> dict[str, float]:
        """Metrics from the secure sum: the schema's groups that no site sent arrive as 0
        (a site sends a group only with >= 1 user), and are dropped like absent ones."""
        total = dict(sums)
        for key in [k for k, v in sums.items() if k.startswith("group.") and k.endswith(".users") and v == 0]:
            for suffix in GROUP_SUMS:
                total.pop(key[: -len("users")] + suffix, None)
        if not any(v for k, v in sums.items() if k.startswith(YH_PREFIX)):
            total = {k: v for k, v in total.items() if not k.startswith(YH_PREFIX)}
        return self.combine_metrics([(1, total)])

    def combine_metrics(self, results: list[tuple[int, dict[str, float]]]) -> dict[str, float]:
        """Federation-wide metrics from the sites' sums (not a mean of site RMSEs); exact except
        Yao & Huang's item-level terms and coverage (see the module docstring)."""
        total = sum_statistics((m for _, m in results), is_sum_key)
        k = self.params.min_group_size
        for attr in GROUP_ATTRIBUTES:
            sizes = {
                key[len(f"group.{attr}.") : -len(".users")]: v
                for key, v in total.items()
                if key.startswith(f"group.{attr}.") and key.endswith(".users")
            }
            # users whose group some site already withheld: together >= k (see suppressed_groups)
            withheld = int(total.get("n_ranked", 0) - sum(sizes.values()))
            for value in suppressed_groups(sizes, k, withheld):
                for suffix in GROUP_SUMS:
                    total.pop(f"group.{attr}.{value}.{suffix}", None)
                total["groups_suppressed"] = total.get("groups_suppressed", 0.0) + 1
            if attr == YH_ATTRIBUTE and not all(f"group.{attr}.{v}.n" in total for v in YH_GROUPS):
                for key in [key for key in total if key.startswith(YH_PREFIX)]:
                    del total[key]  # a withheld group's means are in them
        out = derived(total)
        # Keep the counts a reader needs; the raw sums have served their purpose.
        keep = ("n_ratings", "n_ranked", "groups_suppressed", YH_PREFIX + "items")
        out.update({key: v for key, v in total.items() if key in keep or key.endswith(".users")})
        rates = [m["item_collision_rate"] for _, m in results if "item_collision_rate" in m]
        if rates:
            out["item_collision_rate"] = max(rates)
        return out


def is_sum_key(key: str) -> bool:
    """True for the metrics a site sends as sums (combined by adding them up)."""
    if key in SUM_KEYS or key.startswith(YH_PREFIX):
        return True
    return key.startswith("group.") and key.rpartition(".")[2] in GROUP_SUMS


def suppressed_groups(sizes: dict[str, float], k: int, withheld: int = 0) -> set[str]:
    """Which groups to withhold so that no group of fewer than k users can be recovered.

    Groups under k users are withheld. The groups of one attribute partition the users,
    and the overall sums are reported too, so "overall minus the reported groups" gives
    the sum over the withheld ones: if those hold fewer than k users together (counting
    ``withheld`` users already hidden upstream), the next smallest groups are withheld as
    well until they do (complementary suppression, as in statistical disclosure control).
    """
    hidden = {g for g, n in sizes.items() if n < k}
    if not hidden:
        return hidden
    mass = withheld + sum(sizes[g] for g in hidden)
    for g in sorted(set(sizes) - hidden, key=lambda g: (sizes[g], g)):
        if mass >= k:
            break
        hidden.add(g)
        mass += sizes[g]
    return hidden


def derived(sums: dict[str, float]) -> dict[str, float]:
    """Metrics from sums and counts: RMSE, MAE, HR@k, NDCG@k (overall and per reported
    group), Yao & Huang's unfairness, popularity bias and coverage."""
    out: dict[str, float] = {}
    n = sums.get("n_ratings", 0.0)
    if n > 0:
        out["rmse"] = math.sqrt(sums["sse"] / n)
        out["mae"] = sums["sae"] / n
    if sums.get("n_ranked", 0.0) > 0:
        out["hr_at_k"] = sums["hits"] / sums["n_ranked"]
        out["ndcg_at_k"] = sums["dcg"] / sums["n_ranked"]
    for key in sums:
        if key.startswith("group.") and key.endswith(".n") and sums[key] > 0:
            prefix = key[:-1]
            out[prefix + "rmse"] = math.sqrt(sums[prefix + "sse"] / sums[key])
            if prefix + "sae" in sums:
                out[prefix + "mae"] = sums[prefix + "sae"] / sums[key]
            out[prefix + "ndcg_at_k"] = sums[prefix + "dcg"] / sums[prefix + "users"]

    def group_pred(value: str) -> tuple[float, float]:  # (sum of predictions, ratings)
        prefix = f"group.{YH_ATTRIBUTE}.{value}."
        return (sums[prefix + "pred"], sums[prefix + "n"]) if prefix + "pred" in sums else (0.0, 0.0)

    yh = {key[len(YH_PREFIX) :]: v for key, v in sums.items() if key.startswith(YH_PREFIX)}
    out.update({f"unfairness.{YH_ATTRIBUTE}.{k}": v for k, v in yao_huang(yh, *map(group_pred, YH_GROUPS)).items()})
    held = n if "pop_held_out_sum" in sums else 0.0
    out.update(
        popularity_bias(
            sums.get("pop_at_k_sum", 0.0), sums.get("pop_at_k_n", 0.0), sums.get("pop_held_out_sum", 0.0), held
        )
    )
    out.update(coverage(sums.get("coverage_sum", 0.0), sums.get("coverage_sites", 0.0)))
    return out
