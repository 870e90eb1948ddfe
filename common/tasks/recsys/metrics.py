"""The recommender's evaluation sums: their public schema, and federation metrics from them.

Sites send additive sums (:mod:`.evaluation`); the server adds them up (or SecAgg+ does)
and derives RMSE, MAE, HR@k, NDCG@k, group metrics, Yao & Huang's unfairness,
popularity bias and coverage. Group metrics are reported only for combined groups of at
least ``recsys.min-group-size`` users, with complementary suppression so that no small
group can be recovered by subtraction. Validation metrics, outside the DP guarantee.
"""

from __future__ import annotations

import math

from common.data.ratings import AGE_BUCKETS, UNKNOWN

# suppressed_groups: shared with the image tasks' per-class sums, re-exported here.
from common.metrics.fairness import (
    YAO_HUANG_SUMS,
    coverage,
    popularity_bias,
    sum_statistics,
    suppressed_groups,
    yao_huang,
)

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


# Under metrics.dp (common.privacy.metrics_dp): the sums a site releases, with noise. Ranking
# (hits, dcg), popularity, coverage, Yao & Huang's item-level sums and the suppression count
# are withheld: the ranking runs over a catalogue that one record can change (a new item
# reorders every user's list), and the item-level terms are not sums of bounded per-record
# contributions, so no per-record bound holds for them.
DP_SUM_KEYS = ("sse", "sae", "n_ratings", "n_ranked")
DP_GROUP_SUMS = ("sse", "sae", "pred", "n", "users")


def dp_bounds(
    rating_min: float, rating_max: float, error_bound: float = 0.0, per_user: int = 1
) -> tuple[dict[str, float], int]:
    """Per-record bounds of the released sums for add/remove of one held-out rating, and how many it touches.

    Predictions are clamped to the rating scale and, under metrics.dp, to within
    ``error_bound`` of the rating (``metrics.loss-bound``; 0: the scale's width, no clip),
    so one rating's error is at most ``B = min(error_bound, rating_max - rating_min)``
    (sse: B^2, sae: B), its prediction (still on the scale) at most
    ``P = max(|rating_min|, |rating_max|)``; it adds 1 to ``n_ratings`` and, if it is its
    user's first held-out rating, 1 to ``n_ranked`` and to its groups' ``users``. It falls in
    exactly one group per attribute, so it touches 4 overall keys and 5 per attribute:
    ``touched = 4 + 5 * len(GROUP_ATTRIBUTES) = 14``. The schema covers every group of
    the public vocabulary, so no group appears or vanishes with the data.

    Under user-level DP (add/remove one user, ``per_user`` = ``dp.max-records-per-user``)
    the evaluation reads at most ``per_user`` held-out ratings of each user, all in the
    user's groups: the per-rating sums move by up to ``per_user`` times their bound, the
    user counts by 1, and the keys touched are the same 14.
    """
    b = min(error_bound or math.inf, rating_max - rating_min)
    p = max(abs(rating_min), abs(rating_max))
    m = float(per_user)
    per = {"sse": m * b * b, "sae": m * b, "pred": m * p, "n": m, "users": 1.0, "n_ratings": m, "n_ranked": 1.0}
    bounds = {k: per[k] for k in DP_SUM_KEYS}
    for a in GROUP_ATTRIBUTES:
        for v in GROUP_VALUES[a]:
            bounds.update({f"group.{a}.{v}.{s}": per[s] for s in DP_GROUP_SUMS})
    return bounds, len(DP_SUM_KEYS) + len(DP_GROUP_SUMS) * len(GROUP_ATTRIBUTES)


def sum_schema() -> tuple[str, ...]:
    """Every sum a site can send, for every group of the public vocabulary (86 keys)."""
    groups = tuple(f"group.{a}.{v}.{s}" for a in GROUP_ATTRIBUTES for v in GROUP_VALUES[a] for s in GROUP_SUMS)
    return SUM_KEYS + groups + tuple(YH_PREFIX + k for k in YAO_HUANG_SUMS)


def is_sum_key(key: str) -> bool:
    """True for the metrics a site sends as sums (combined by adding them up)."""
    if key in SUM_KEYS or key.startswith(YH_PREFIX):
        return True
    return key.startswith("group.") and key.rpartition(".")[2] in GROUP_SUMS


def derived(sums: dict[str, float]) -> dict[str, float]:
    """Metrics from sums and counts: RMSE, MAE, HR@k, NDCG@k (overall and per reported
    group), Yao & Huang's unfairness, popularity bias and coverage."""
    out: dict[str, float] = {}
    n = sums.get("n_ratings", 0.0)
    # max(0, .): under metrics.dp a noisy squared-error sum can be negative.
    if n > 0:
        out["rmse"] = math.sqrt(max(sums["sse"], 0.0) / n)
        out["mae"] = sums["sae"] / n
    if sums.get("n_ranked", 0.0) > 0 and "hits" in sums:  # ranking sums are withheld under metrics.dp
        out["hr_at_k"] = sums["hits"] / sums["n_ranked"]
        out["ndcg_at_k"] = sums["dcg"] / sums["n_ranked"]
    for key in sums:
        if key.startswith("group.") and key.endswith(".n") and sums[key] > 0:
            prefix = key[:-1]
            out[prefix + "rmse"] = math.sqrt(max(sums[prefix + "sse"], 0.0) / sums[key])
            if prefix + "sae" in sums:
                out[prefix + "mae"] = sums[prefix + "sae"] / sums[key]
            if prefix + "dcg" in sums and sums.get(prefix + "users", 0.0) > 0:
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


def drop_unsent(sums: dict[str, float]) -> dict[str, float]:
    """The secure sum without what no site sent: the schema's groups that no site sent
    arrive as 0 (a site sends a group only with >= 1 user), and are dropped like absent ones."""
    total = dict(sums)
    for key in [k for k, v in sums.items() if k.startswith("group.") and k.endswith(".users") and v == 0]:
        for suffix in GROUP_SUMS:
            total.pop(key[: -len("users")] + suffix, None)
    if not any(v for k, v in sums.items() if k.startswith(YH_PREFIX)):
        total = {k: v for k, v in total.items() if not k.startswith(YH_PREFIX)}
    return total


def combine(results: list[tuple[int, dict[str, float]]], min_group_size: int) -> dict[str, float]:
    """Federation-wide metrics from the sites' sums (not a mean of site RMSEs); exact except
    Yao & Huang's item-level terms and coverage (see :mod:`common.tasks.recsys`)."""
    total = sum_statistics((m for _, m in results), is_sum_key)
    k = min_group_size
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
