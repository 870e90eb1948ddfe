"""What a recommender site computes on its held-out ratings: sums and counts, never per-user values.

Ranking (HR@k, NDCG@k), popularity and coverage sums, and error sums per group of at least
``recsys.min-group-size`` users (smaller groups withheld with complementary suppression,
:func:`.metrics.suppressed_groups`). Under SecAgg+ the server learns only their sums over sites.

Privacy: these sums leave the site without DP noise, so each is a function of the model
(a DP output) and of the **held-out ratings only**; no training rating is read (issue 18):

* the ranking covers :func:`ranked_items`, the declared catalogue plus the site's held-out
  items, and does *not* remove each user's training items (that would make the top-k,
  hence hits, DCG and coverage, a function of which training ratings exist). Hit rates
  are therefore lower than under the usual "exclude seen items" protocol: an item the
  user trained on can take a top-k slot and never counts as a hit;
* an item's popularity is the share of the site's held-out users who hold it out.

Adding or removing one training rating leaves every sum bit-identical for a fixed model
(tests/unit/test_recsys_heldout.py). Sent exactly (``metrics.dp = false``) they are not
covered by epsilon: held-out ratings are never trained on, and the split is per rating
(:func:`common.data.ratings.held_out_mask`). Under ``metrics.dp`` the task's schema of them is
noised and charged (:mod:`common.privacy.metrics_dp`); under user-level DP each user adds at
most ``dp.max-records-per-user`` held-out ratings, and a deployed site refuses exact sums.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from common.data.ratings import RatingData
from common.metrics.fairness import item_popularity, yao_huang_sums
from common.tasks.recsys.metrics import GROUP_ATTRIBUTES, YH_ATTRIBUTE, YH_GROUPS, YH_PREFIX, suppressed_groups


def group_sums(
    data: RatingData, pred: np.ndarray, rating: np.ndarray, dcg: np.ndarray, min_group_size: int
) -> dict[str, float]:
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
        hidden = suppressed_groups(sizes, min_group_size)
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


def ranked_items(data: RatingData) -> np.ndarray:
    """The items ranked (sorted buckets): the declared catalogue and the held-out items.

    Both are independent of the training ratings; the held-out items are added so that
    every relevant item can be ranked (and a ``csv`` source, with no declared catalogue,
    still has one: its held-out items).
    """
    declared = np.zeros(0, dtype=np.int64) if data.catalogue is None else np.asarray(data.catalogue, dtype=np.int64)
    return np.union1d(declared, data.x[:, 1].numpy())


def popularity_sums(data: RatingData, top: np.ndarray) -> dict[str, float]:
    """Sums for popularity bias and coverage; ``top`` holds positions in :func:`ranked_items`.

    Popularity from held-out (user, item) pairs over the held-out users (n_ranked).
    """
    cat = ranked_items(data)
    users, items = data.x[:, 0].numpy(), data.x[:, 1].numpy()
    pop = item_popularity(users, items, cat, len(np.unique(users)))
    shown = top[top >= 0]
    return {
        "pop_at_k_sum": float(pop[shown].sum()),
        "pop_at_k_n": float(len(shown)),
        "pop_held_out_sum": float(pop[np.searchsorted(cat, data.x[:, 1].numpy())].sum()),
        "coverage_sum": len(np.unique(shown)) / max(len(cat), 1),
        "coverage_sites": 1.0,
    }


def ranking(
    model: nn.Module, data: RatingData, device: torch.device, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per held-out user: hit@k (0/1), NDCG@k and the top-k (positions in
    :func:`ranked_items`), ranking every one of those items, training items included."""
    cat = ranked_items(data)
    users = np.unique(data.x[:, 0].numpy())
    held_u, held_i = data.x[:, 0].numpy(), data.x[:, 1].numpy()
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
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        tops[start : start + len(chunk)] = top
        gains = np.take_along_axis(relevant, top, 1)
        n_rel = relevant.sum(1)
        ideal = np.array([discounts[: min(k, int(r))].sum() for r in n_rel])
        hits[start : start + len(chunk)] = gains.any(1)
        ndcg[start : start + len(chunk)] = np.where(
            ideal > 0, (gains * discounts[: gains.shape[1]]).sum(1) / np.maximum(ideal, 1e-12), 0.0
        )
    return hits, ndcg, tops
