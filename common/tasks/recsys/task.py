"""The recommender task: site data, model, per-rating loss, local training and evaluation.

Privacy (unit: one rating; the full argument is in :mod:`common.tasks.recsys`): every
parameter a rating's loss touches, the site's own user table included, is trained by
DP-SGD with that rating's gradient clipped as one example, so the shared update is
post-processing of the DP outputs. Under ``dp.unit = "user"`` the unit is one user and the
user table trains outside DP-SGD (:meth:`RecsysTask.person_local_modules`, joint DP).
Only :meth:`RecsysTask.shared_keys` leave the site.
The correction table's decay between steps is a fixed, data-independent map (no cost).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import numpy as np
import torch
from torch import nn

from common.data.arrays import ArrayData
from common.data.ratings import RatingData
from common.errors import ConfigError, PrivfedError
from common.privacy.metrics_dp import MetricBounds
from common.tasks import register_task
from common.tasks.base import Task
from common.tasks.recsys.config import RecsysConfig
from common.tasks.recsys.data import cached_sites
from common.tasks.recsys.evaluation import group_sums, popularity_sums, ranking
from common.tasks.recsys.metrics import combine, derived, dp_bounds, drop_unsent, is_sum_key, sum_schema
from common.tasks.recsys.model import LOCAL_PREFIXES, MODELS, BiasedMF, offset_groups

if TYPE_CHECKING:
    from common.privacy.training import LocalSession


@register_task("recsys")
class RecsysTask(Task):
    unit_of_privacy = "rating"
    needs_key = True
    test_description = "held-out ratings at the sites (keyed per rating, data.test-fraction), combined from their sums"
    plot_metrics = ("unfairness.gender.value", "unfairness.gender.non_parity", "pop_lift", "coverage_site_mean")

    params: RecsysConfig

    def _split(self) -> tuple[tuple[RatingData, RatingData], ...]:
        if self.key is None:
            raise PrivfedError("the recommender's data can only be read at a site holding the federation key")
        d, f = self.cfg.data, self.cfg.federation
        sites = cached_sites(
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
        return [self.unit_count(train) for train, _ in self._split()]

    def has_person_key(self) -> bool:
        return True  # the pseudonymised user of each rating (RatingData.person)

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

    def person_local_modules(self, model: nn.Module) -> list[nn.Module]:
        """The user table (p_u, b_u): row u is looked up by user u's ratings only, and stays here."""
        m = cast(BiasedMF, model)
        return [t for t in (getattr(m, "user_emb", None), m.user_bias) if t is not None]

    def no_decay_parameters(self, model: nn.Module) -> list[torch.Tensor]:
        """The global mean (decay would pull every prediction toward a rating of 0, not toward any
        prior) and the correction table (it has its own decay, recsys.correction-lambda)."""
        m = cast(BiasedMF, model)
        return [m.global_bias.weight] + ([m.group_item_bias.weight] if m.group_item_bias is not None else [])

    def shared_keys(self, model: nn.Module) -> list[str]:
        return [k for k in model.state_dict() if not k.startswith(LOCAL_PREFIXES)]

    def per_sample_loss(self, model: nn.Module, batch: ArrayData) -> torch.Tensor:
        assert batch.y is not None
        loss = (model(batch.x) - batch.y).pow(2)
        # A static cast, no runtime check: the model is one build_model made (a BiasedMF or subclass).
        return loss + self.params.l2 * cast(BiasedMF, model).penalty() if self.params.l2 else loss

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
        return self._evaluate(model, data, self.params.min_group_size)

    def metric_bounds(self) -> MetricBounds:
        """Under metrics.dp: error sums and counts, overall and per group (:func:`.metrics.dp_bounds`)."""
        p = self.params
        bounds, touched = dp_bounds(p.rating_min, p.rating_max, self.cfg.metrics.loss_bound, self.records_per_unit())
        return MetricBounds(bounds, touched)

    @torch.no_grad()
    def dp_evaluate(self, model: nn.Module, data: ArrayData) -> dict[str, float]:
        """The sums without suppression at the site: which groups are sent must not depend on the
        data under metrics.dp (the noise hides small groups; the server suppresses on noisy counts)."""
        return self._evaluate(model, data, 1, self.cfg.metrics.loss_bound)

    def _evaluate(
        self, model: nn.Module, data: ArrayData, min_group_size: int, error_bound: float = 0.0
    ) -> dict[str, float]:
        if not isinstance(data, RatingData) or data.y is None:
            raise TypeError("recsys evaluation needs RatingData")
        p = self.params
        data = self.unit_rows(data)  # under user-level DP, each user's first held-out ratings only
        assert data.y is not None  # checked above; capping keeps it
        model.eval()
        device = next(model.parameters()).device
        pred = model(data.x.to(device)).clamp(p.rating_min, p.rating_max).cpu().numpy().astype(np.float64)
        rating = data.y.numpy().astype(np.float64)
        if error_bound:  # metrics.dp: each rating's error clipped (the prediction stays on the scale)
            pred = np.clip(pred, rating - error_bound, rating + error_bound)
        err = pred - rating
        hits, dcg, top = ranking(model, data, device, p.top_k)
        model.train()
        out: dict[str, float] = {
            "sse": float(np.sum(err**2)),
            "sae": float(np.sum(np.abs(err))),
            "n_ratings": float(len(err)),
            "n_ranked": float(len(hits)),
            "hits": float(hits.sum()),
            "dcg": float(dcg.sum()),
            **popularity_sums(data, top),
            **group_sums(data, pred, rating, dcg, min_group_size),
        }
        if data.collision_rate is not None:  # of the declared (public) catalogue; csv has none
            out["item_collision_rate"] = data.collision_rate
        return {**derived(out), **out}

    def sum_keys(self) -> tuple[str, ...]:
        """Every sum a site can send, for every group of the public vocabulary (86 keys)."""
        return sum_schema()

    def is_sum_key(self, key: str) -> bool:
        return is_sum_key(key)

    def combine_sums(self, sums: dict[str, float]) -> dict[str, float]:
        """Metrics from the secure sum (groups no site sent arrive as 0 and are dropped)."""
        return self.combine_metrics([(1, drop_unsent(sums))])

    def combine_metrics(self, results: list[tuple[int, dict[str, float]]]) -> dict[str, float]:
        """Federation-wide metrics from the sites' sums (not a mean of site RMSEs); exact except
        Yao & Huang's item-level terms and coverage (see :mod:`common.tasks.recsys`)."""
        return combine(results, self.params.min_group_size)
