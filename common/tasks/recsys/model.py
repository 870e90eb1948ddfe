"""The recommender's models: biased MF and its neural variant, and the bias-correction groups.

Every table is an ``nn.Embedding`` looked up once per rating (and the MLP's layers are
``nn.Linear`` on one row per rating), which is what the fast DP engine needs to clip each
rating's gradient exactly (:mod:`common.privacy.engines.rules`). The user tables stay at
the site (:data:`LOCAL_PREFIXES`); the user -> group map is a plain attribute, never in
the state dict.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
from torch import nn


class ModelParams(Protocol):
    """The ``[recsys]`` settings a model reads (``RecsysConfig`` has them; a protocol, so this
    module and the light config module stay independent: the config names the models,
    ``MODEL_NAMES``, without importing torch)."""

    @property
    def dim(self) -> int: ...
    @property
    def hidden_dim(self) -> int: ...
    @property
    def init_std(self) -> float: ...
    @property
    def rating_min(self) -> float: ...
    @property
    def rating_max(self) -> float: ...
    @property
    def global_scale(self) -> float: ...
    @property
    def user_bias_scale(self) -> float: ...
    @property
    def item_bias_scale(self) -> float: ...
    @property
    def factor_scale(self) -> float: ...


class BiasedMF(nn.Module):
    """mu + b_u + b_i + p_u . q_i. Every table is an nn.Embedding looked up once per rating
    (mu too, as a 1-row table), which is what the fast DP engine's per-example norms need.

    Each table's values are a fixed multiple of its stored weights (``recsys.*-scale``, after
    the lookup, so the per-example gradient structure is unchanged); the weights are initialised
    so that the values start where they would with scale 1."""

    def __init__(
        self, num_users: int, num_buckets: int, p: ModelParams, user_group: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        self.num_buckets = num_buckets
        self.global_scale, self.factor_scale = p.global_scale, p.factor_scale
        self.user_bias_scale, self.item_bias_scale = p.user_bias_scale, p.item_bias_scale
        self.user_emb = nn.Embedding(num_users, p.dim)
        self.user_bias = nn.Embedding(num_users, 1)
        self.item_emb = nn.Embedding(num_buckets, p.dim)
        self.item_bias = nn.Embedding(num_buckets, 1)
        self.global_bias = nn.Embedding(1, 1)
        for emb in (self.user_emb, self.item_emb):
            nn.init.normal_(emb.weight, std=p.init_std / p.factor_scale)
        for emb in (self.user_bias, self.item_bias):
            nn.init.zeros_(emb.weight)
        nn.init.constant_(self.global_bias.weight, (p.rating_min + p.rating_max) / 2 / p.global_scale)
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
        pu, qi = self.factor_scale * self.user_emb(u), self.factor_scale * self.item_emb(i)
        bu, bi = self._biases(u, i)
        self._sq = pu.pow(2).sum(1) + qi.pow(2).sum(1) + bu.pow(2) + bi.pow(2)
        base = self._mu(u) + bu + bi
        if self.group_item_bias is not None:
            # One lookup per rating (what the fast DP engine's per-example norms need).
            base = base + self.group_item_bias(self.user_group[u] * self.num_buckets + i).squeeze(1)
        return base, pu, qi

    def _biases(self, u: torch.Tensor, i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(b_u, b_i) per row, scaled."""
        return self.user_bias_scale * self.user_bias(u).squeeze(1), self.item_bias_scale * self.item_bias(i).squeeze(1)

    def _mu(self, u: torch.Tensor) -> torch.Tensor:
        return self.global_scale * self.global_bias(torch.zeros_like(u)).squeeze(1)

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
        self, num_users: int, num_buckets: int, p: ModelParams, user_group: torch.Tensor | None = None
    ) -> None:
        super().__init__(num_users, num_buckets, p, user_group)
        self.mlp = nn.Sequential(nn.Linear(2 * p.dim, p.hidden_dim), nn.ReLU(), nn.Linear(p.hidden_dim, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base, pu, qi = self.parts(x)
        return base + (pu * qi).sum(1) + self.mlp(torch.cat([pu, qi], 1)).squeeze(1)


class BiasOnly(BiasedMF):
    """mu + b_u + b_i (+ b_{g(u),i}): the baseline without factors. Under user-level DP the
    user biases are site-local (exact) and the item biases DP: the issue's "global mean plus
    local user bias plus DP item bias" against which the factor models are measured."""

    def __init__(
        self, num_users: int, num_buckets: int, p: ModelParams, user_group: torch.Tensor | None = None
    ) -> None:
        super().__init__(num_users, num_buckets, p, user_group)
        del self.user_emb, self.item_emb  # no factors: unused tables would break the one-lookup rule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u, i = x[:, 0], x[:, 1]
        bu, bi = self._biases(u, i)
        self._sq = bu.pow(2) + bi.pow(2)
        base = self._mu(u) + bu + bi
        if self.group_item_bias is not None:
            base = base + self.group_item_bias(self.user_group[u] * self.num_buckets + i).squeeze(1)
        return base


# One per common.tasks.recsys.config.MODEL_NAMES (the values recsys.model accepts).
MODELS: dict[str, type[BiasedMF]] = {"mf": BiasedMF, "neural": NeuralMF, "bias": BiasOnly}
# State that never leaves a site.
LOCAL_PREFIXES = ("user_emb.", "user_bias.")
# Rows of the bias correction per item bucket: gender F, M, and everyone else.
OFFSET_GROUPS = ("F", "M", "other")


def offset_groups(gender: np.ndarray) -> torch.Tensor:
    """Each user's row group in the correction table (index into OFFSET_GROUPS)."""
    g = np.asarray(gender).astype(str)
    return torch.as_tensor(np.where(g == "F", 0, np.where(g == "M", 1, 2)), dtype=torch.long)
