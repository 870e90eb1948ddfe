"""Fairness metrics: the pure math, from sums and counts to metrics.

Sites never send per-user or per-item values, only sums and counts (sufficient
statistics), which the server adds up; every metric here is a function of such sums.
Under secure aggregation they travel inside the masked vector (:mod:`common.privacy.secagg_stats`)
and the server learns only their sums over sites. See ``docs/FAIRNESS.md`` for the
design, and where a metric is exact.

Site-level fairness of a round (how evenly the sites' utility is spread), from each
site's value of the task's primary metric (a loss: lower is better):

* ``mean``, ``std`` (population), ``worst`` (largest loss), ``best`` (smallest), ``gap``
  (worst - best), ``ratio`` (worst / best, when best > 0);
* ``worst10_mean``: the mean loss of the worst ceil(10%) of sites (at least one);
* ``jain``: Jain's fairness index ``(sum x)^2 / (n * sum x^2)`` of the losses, in
  [1/n, 1], with 1 when every site has the same loss (Jain, Chiu & Hawe, 1984).

The same statistics (:func:`spread`) measure the disparity of any per-group loss, e.g.
the VAE's per-class reconstruction error.

Recommender group fairness (Yao & Huang, "Beyond Parity: Fairness Objectives for
Collaborative Filtering", NeurIPS 2017), for a binary attribute with groups g and h, over
held-out ratings: per item j, ``d_g(j) = E_g[y]_j - E_g[r]_j``, the mean prediction minus
the mean rating of group g's ratings of j. Over the n items rated by both groups:

* value          ``U_val   = 1/n sum_j | d_g(j) - d_h(j) |``
* absolute       ``U_abs   = 1/n sum_j | |d_g(j)| - |d_h(j)| |``
* underestimation ``U_under = 1/n sum_j | max(0, -d_g(j)) - max(0, -d_h(j)) |``
* overestimation ``U_over  = 1/n sum_j | max(0, d_g(j)) - max(0, d_h(j)) |``
* non-parity     ``U_par   = | E_g[y] - E_h[y] |`` (mean prediction of each group's ratings)

All five are symmetric in g and h.

How much of ``U_val`` is sampling noise (``value_noise``): on held-out ratings each
``d_g(j)`` is a mean over few ratings, so even predictions with no systematic group x item
error leave ``|d_g(j) - d_h(j)| ~ |N(0, s^2 (1/n_g(j) + 1/n_h(j)))|``, with s^2 the
variance of the errors within an (item, group) cell. Its mean over the items,

    ``value_noise = sqrt(2/pi) * s_pooled * 1/n sum_j sqrt(1/n_g(j) + 1/n_h(j))``

(a normal approximation, s pooled over all cells), is the level ``U_val`` falls to once
every systematic part is gone at the same error spread; ``U_val`` near ``value_noise``
leaves a correction nothing to remove. Sites send its parts as sums too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping

import numpy as np

YAO_HUANG_TERMS = ("value", "absolute", "underestimation", "overestimation")
# What :func:`yao_huang_sums` returns: a site's sums for the item-level metrics.
YAO_HUANG_SUMS = ("items", *YAO_HUANG_TERMS, "noise_ssw", "noise_dof", "noise_scale")


# ------------------------------------------------------------------ spread of losses


def spread(values: Mapping[str, float]) -> dict[str, float]:
    """Spread of per-unit losses (sites, classes, groups): see the module docstring.

    ``count`` is the number of finite values; {} when there is none.
    """
    xs = sorted(float(v) for v in values.values() if math.isfinite(float(v)))
    if not xs:
        return {}
    n = len(xs)
    mean = sum(xs) / n
    worst_k = xs[-max(1, math.ceil(0.1 * n)) :]
    squares = sum(x * x for x in xs)
    out = {
        "count": float(n),
        "mean": mean,
        "std": math.sqrt(sum((x - mean) ** 2 for x in xs) / n),
        "worst": xs[-1],
        "best": xs[0],
        "gap": xs[-1] - xs[0],
        "worst10_mean": sum(worst_k) / len(worst_k),
        "jain": (sum(xs) ** 2) / (n * squares) if squares > 0 else 1.0,
    }
    if xs[0] > 0:
        out["ratio"] = xs[-1] / xs[0]
    return out


def site_fairness(values: Mapping[str, float]) -> dict[str, float]:
    """Fairness statistics of per-site losses; {} when no site reported a finite value."""
    s = spread(values)
    return {"sites": s.pop("count"), **s} if s else {}


# ------------------------------------------------------------------ sufficient statistics


def sum_statistics(metrics: Iterable[Mapping[str, float]], is_sum: Callable[[str], bool]) -> dict[str, float]:
    """Key-wise sum, over the sites' metric dicts, of the keys ``is_sum`` selects.

    A key missing at a site counts as 0 there (a site without the group has no sum for it).
    """
    total: dict[str, float] = {}
    for m in metrics:
        for key, value in m.items():
            if is_sum(key):
                total[key] = total.get(key, 0.0) + float(value)
    return total


def group_means(sums: Mapping[str, float], prefix: str, stat: str) -> dict[str, float]:
    """``{g: sums[prefix + g + "." + stat] / sums[prefix + g + ".n"]}`` for every group g with n > 0."""
    out: dict[str, float] = {}
    for key, n in sums.items():
        if key.startswith(prefix) and key.endswith(".n") and n > 0 and f"{key[:-2]}.{stat}" in sums:
            out[key[len(prefix) : -2]] = sums[f"{key[:-2]}.{stat}"] / n
    return out


# ------------------------------------------------------------------ Yao & Huang


def suppressed_groups(sizes: Mapping[str, float], k: int, withheld: int = 0) -> set[str]:
    """Which groups to withhold so that no group of fewer than k members can be recovered.

    Groups under k members (users of the recommender, validation images of a class) are
    withheld. The groups partition the members, and the overall sums are reported too, so
    "overall minus the reported groups" gives the sum over the withheld ones: if those hold
    fewer than k members together (counting ``withheld`` members already hidden upstream),
    the next smallest groups are withheld as well until they do (complementary
    suppression, as in statistical disclosure control). When all groups together hold
    fewer than k, every group is withheld.
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


def yao_huang_item_terms(dev_g: np.ndarray, dev_h: np.ndarray) -> dict[str, np.ndarray]:
    """Per-item terms of the four item-level metrics, from ``d_g(j)`` and ``d_h(j)``."""
    return {
        "value": np.abs(dev_g - dev_h),
        "absolute": np.abs(np.abs(dev_g) - np.abs(dev_h)),
        "underestimation": np.abs(np.maximum(0.0, -dev_g) - np.maximum(0.0, -dev_h)),
        "overestimation": np.abs(np.maximum(0.0, dev_g) - np.maximum(0.0, dev_h)),
    }


def yao_huang_sums(
    item: np.ndarray, pred: np.ndarray, rating: np.ndarray, in_g: np.ndarray, in_h: np.ndarray
) -> dict[str, float]:
    """One site's sums for the item-level metrics: ``items`` (n) and ``sum_j term(j)`` per term.

    Rows are ratings (item, prediction, rating); ``in_g`` / ``in_h`` say which group's user
    gave each (rows in neither are ignored). The per-item means use only this site's rows
    and stay here; items lacking either group are skipped, as in the paper.
    """
    item, pred, rating = np.asarray(item), np.asarray(pred, dtype=np.float64), np.asarray(rating, dtype=np.float64)
    items, idx = np.unique(item, return_inverse=True)
    err = pred - rating
    dev = {}
    for name, mask in (("g", np.asarray(in_g, bool)), ("h", np.asarray(in_h, bool))):
        count = np.bincount(idx[mask], minlength=len(items))
        diff = np.bincount(idx[mask], weights=err[mask], minlength=len(items))
        sq = np.bincount(idx[mask], weights=err[mask] ** 2, minlength=len(items))
        dev[name] = (diff, count, sq)
    both = (dev["g"][1] > 0) & (dev["h"][1] > 0)
    terms = yao_huang_item_terms(*(dev[k][0][both] / dev[k][1][both] for k in ("g", "h")))
    # value_noise's parts (see the module docstring): within-cell sum of squares, its
    # degrees of freedom, and sum_j sqrt(1/n_g(j) + 1/n_h(j)).
    ssw = sum(float(np.clip(sq[both] - diff[both] ** 2 / n[both], 0.0, None).sum()) for diff, n, sq in dev.values())
    dof = sum(float((n[both] - 1).sum()) for _, n, _ in dev.values())
    scale = float(np.sqrt(1.0 / dev["g"][1][both] + 1.0 / dev["h"][1][both]).sum())
    return {
        "items": float(both.sum()),
        **{k: float(v.sum()) for k, v in terms.items()},
        "noise_ssw": ssw,
        "noise_dof": dof,
        "noise_scale": scale,
    }


def yao_huang(sums: Mapping[str, float], pred_g: tuple[float, float], pred_h: tuple[float, float]) -> dict[str, float]:
    """The five metrics (and ``value_noise``) from summed :func:`yao_huang_sums` and each
    group's (sum of predictions, ratings).

    The item-level ones need ``sums["items"] > 0`` (``value_noise`` also a cell with two
    ratings of one group); non-parity needs both groups' counts > 0.
    """
    out: dict[str, float] = {}
    n = sums.get("items", 0.0)
    if n > 0:
        out.update({k: sums[k] / n for k in YAO_HUANG_TERMS})
        if sums.get("noise_dof", 0.0) > 0:
            s = math.sqrt(sums["noise_ssw"] / sums["noise_dof"])
            out["value_noise"] = math.sqrt(2 / math.pi) * s * sums["noise_scale"] / n
    if pred_g[1] > 0 and pred_h[1] > 0:
        out["non_parity"] = abs(pred_g[0] / pred_g[1] - pred_h[0] / pred_h[1])
    return out


# ------------------------------------------------------------------ popularity and coverage


def item_popularity(users: np.ndarray, items: np.ndarray, catalogue: np.ndarray, num_users: int) -> np.ndarray:
    """Per catalogue item: the share of ``num_users`` users with a (user, item) pair, in [0, 1].

    ``catalogue`` is sorted and holds every item of ``items``. A pair repeated (two items
    in one hash bucket) counts once. The recommender passes its *held-out* pairs and its
    number of held-out users: popularity sent without DP noise must not be a function of
    the training ratings (docs/PRIVACY.md).
    """
    pop = np.zeros(len(catalogue))
    if len(items) and num_users > 0:
        pairs = np.unique(np.stack([np.asarray(users), np.asarray(items)]), axis=1)
        pop = np.bincount(np.searchsorted(catalogue, pairs[1]), minlength=len(catalogue)) / num_users
    return pop


def popularity_bias(top_sum: float, top_n: float, held_sum: float, held_n: float) -> dict[str, float]:
    """Mean popularity of recommended (top-k) items and of held-out items, and their ratio.

    ``pop_at_k = top_sum / top_n``, ``pop_held_out = held_sum / held_n``,
    ``pop_lift = pop_at_k / pop_held_out`` (> 1: recommendations are more popular than
    what users actually rated).
    """
    out: dict[str, float] = {}
    if top_n > 0:
        out["pop_at_k"] = top_sum / top_n
    if held_n > 0:
        out["pop_held_out"] = held_sum / held_n
    if "pop_at_k" in out and out.get("pop_held_out", 0.0) > 0:
        out["pop_lift"] = out["pop_at_k"] / out["pop_held_out"]
    return out


def coverage(coverage_sum: float, sites: float) -> dict[str, float]:
    """Catalogue coverage from the sum over sites of each site's coverage ``|U_s| / |C|``.

    ``U_s`` is the set of items in any of site s's users' top-k lists. The federation's
    coverage ``|U_1 u ... u U_S| / |C|`` is a union, not a sum; sums bound it:
    ``coverage_site_mean = sum_s |U_s| / (S |C|)`` <= max_s |U_s| / |C| <= union
    <= ``coverage_upper = min(1, sum_s |U_s| / |C|)``. Both equal it for one site.
    """
    if sites <= 0:
        return {}
    return {"coverage_site_mean": coverage_sum / sites, "coverage_upper": min(1.0, coverage_sum)}


# ------------------------------------------------------------------ class-rebalanced sampling


def label_weights_for_target(
    confusion: np.ndarray, target: np.ndarray, floor: float = 0.0, shift_cost: float = 1e-3
) -> np.ndarray:
    """Conditioning-label proportions ``w`` for a conditional generator, so that the class
    distribution of what it generates, ``w @ confusion``, is as close as possible to ``target``.

    ``confusion[y, c]`` is the share of images generated for label y that are classified as
    class c (identity for a generator that always draws the class it is asked for). Solves
    the linear program

        min_w  TV(w @ confusion, target) + shift_cost * TV(w, target)
        s.t.   sum_y w_y = 1,  w_y >= floor.

    The second term prices moving the label mix away from the target itself: a shift is
    made only where each unit of it buys at least ``shift_cost`` units of TV. So a
    generator that ignores its labels (every row of ``confusion`` alike) keeps the target
    mix instead of a lopsided one that gains nothing; with ``shift_cost`` near 0 it only
    breaks ties. ``floor`` keeps every label in the mix. Reweighting cannot create a class
    that no label produces: such a class stays short.
    """
    from scipy.optimize import linprog

    conf = np.asarray(confusion, dtype=np.float64)
    t = np.asarray(target, dtype=np.float64)
    k, c = conf.shape
    if t.shape != (c,) or k != c:
        raise ValueError(f"confusion must be square and match target, got {conf.shape} and {t.shape}")
    if floor * k > 1:
        raise ValueError(f"floor {floor} leaves no room: {k} labels x floor > 1")
    # variables: w (k), s (c) >= |w C - t|, d (k) >= |w - t|
    cost = np.concatenate([np.zeros(k), 0.5 * np.ones(c), 0.5 * shift_cost * np.ones(k)])
    eye_c, eye_k, zc, zk = np.eye(c), np.eye(k), np.zeros((c, k)), np.zeros((k, c))
    a_ub = np.block(
        [
            [conf.T, -eye_c, zc],
            [-conf.T, -eye_c, zc],
            [eye_k, zk, -eye_k],
            [-eye_k, zk, -eye_k],
        ]
    )
    b_ub = np.concatenate([t, -t, t, -t])
    a_eq = np.concatenate([np.ones(k), np.zeros(c + k)])[None]
    bounds = [(floor, 1.0)] * k + [(0, None)] * (c + k)
    res = linprog(cost, A_ub=a_ub, b_ub=b_ub, A_eq=a_eq, b_eq=[1.0], bounds=bounds, method="highs")
    if not res.success:  # cannot happen for a valid input (w = uniform is feasible); be loud if it does
        raise RuntimeError(f"label_weights_for_target: {res.message}")
    w = np.clip(res.x[:k], 0.0, None)
    return w / w.sum()


def quota_labels(weights: np.ndarray, n: int) -> np.ndarray:
    """``n`` labels whose counts follow ``weights`` as closely as integers allow (largest
    remainder), dealt round-robin over the labels with quota left (deterministic)."""
    w = np.asarray(weights, dtype=np.float64)
    exact = n * w / w.sum()
    counts = np.floor(exact).astype(np.int64)
    rest = n - int(counts.sum())
    counts[np.argsort(-(exact - counts), kind="stable")[:rest]] += 1
    left = counts.copy()
    out: list[int] = []
    while len(out) < n:
        live = np.flatnonzero(left > 0)
        out.extend(live.tolist())
        left[live] -= 1
    return np.asarray(out[:n], dtype=np.int64)
