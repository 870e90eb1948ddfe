"""Fairness metrics: hand-computed cases, and sums combined over sites against the pooled computation."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch

from common.data.arrays import ArrayData
from common.data.ratings import RatingData
from common.metrics.fairness import (
    coverage,
    group_means,
    item_popularity,
    popularity_bias,
    spread,
    sum_statistics,
    yao_huang,
    yao_huang_sums,
)
from common.tasks import get_task
from common.tasks.recsys.evaluation import ranked_items, ranking
from tests.conftest import make_cfg
from tests.unit.test_recsys import SMALL, _FixedScores, recsys_task

# ------------------------------------------------------------------ pure math


def test_spread_and_group_means_by_hand():
    s = spread({"a": 1.5, "b": 3.0, "c": 6.0, "d": float("nan")})
    assert s["count"] == 3 and s["gap"] == 4.5 and s["ratio"] == 4.0 and s["worst"] == 6.0 and s["best"] == 1.5
    assert s["std"] == pytest.approx(math.sqrt(3.5))
    assert "ratio" not in spread({"a": 0.0, "b": 1.0})  # worst / 0 is not reported
    sums = {"class.0.recon_sum": 3.0, "class.0.n": 2.0, "class.1.recon_sum": 3.0, "class.1.n": 1.0, "class.2.n": 0.0}
    assert group_means(sums, "class.", "recon_sum") == {"0": 1.5, "1": 3.0}
    both = sum_statistics([{"a.n": 1.0, "x": 5.0}, {"a.n": 2.0, "b.n": 4.0}], lambda k: k.endswith(".n"))
    assert both == {"a.n": 3.0, "b.n": 4.0}


# Ratings (item, prediction, rating, group): item 0 has both groups, item 1 too, item 2 only g.
_YH_ROWS = [
    (0, 3.0, 4.0, "g"),
    (0, 2.0, 2.0, "g"),
    (0, 4.0, 3.0, "h"),  # d_g = 2.5 - 3 = -0.5, d_h = +1
    (1, 4.0, 5.0, "g"),
    (1, 3.0, 5.0, "h"),  # d_g = -1, d_h = -2
    (2, 2.0, 1.0, "g"),  # no h rating: not one of the n items
]


def _yh_arrays(rows):
    item, pred, rating, grp = (np.array(c) for c in zip(*rows))
    return item, pred, rating, grp == "g", grp == "h"


def _pred_sums(pred, mask):
    return float(pred[mask].sum()), float(mask.sum())


def test_yao_huang_metrics_by_hand():
    item, pred, rating, g, h = _yh_arrays(_YH_ROWS)
    sums = yao_huang_sums(item, pred, rating, g, h)
    assert sums["items"] == 2
    m = yao_huang(sums, _pred_sums(pred, g), _pred_sums(pred, h))
    # value: |-0.5 - 1| + |-1 + 2| = 2.5; absolute: |0.5 - 1| + |1 - 2| = 1.5
    assert m["value"] == pytest.approx(2.5 / 2) and m["absolute"] == pytest.approx(1.5 / 2)
    # underestimation: |0.5 - 0| + |1 - 2| = 1.5; overestimation: |0 - 1| + |0 - 0| = 1
    assert m["underestimation"] == pytest.approx(1.5 / 2) and m["overestimation"] == pytest.approx(1 / 2)
    # non-parity over all of each group's ratings: g (3+2+4+2)/4 = 2.75, h (4+3)/2 = 3.5
    assert m["non_parity"] == pytest.approx(0.75)
    # symmetric in the two groups
    assert yao_huang(
        yao_huang_sums(item, pred, rating, h, g), _pred_sums(pred, h), _pred_sums(pred, g)
    ) == pytest.approx(m)
    # no item with both groups: only non-parity
    only = yao_huang_sums(item[:2], pred[:2], rating[:2], g[:2], h[:2])
    assert only["items"] == 0 and set(yao_huang(only, (1.0, 1.0), (2.0, 1.0))) == {"non_parity"}


def _split_yh(rows_by_site):
    """Sum the sites' statistics, as the server does, and compute the metrics."""
    sites = [_yh_arrays(rows) for rows in rows_by_site]
    total = sum_statistics([yao_huang_sums(*s) for s in sites], lambda k: True)
    pred = np.concatenate([s[1] for s in sites])
    g, h = np.concatenate([s[3] for s in sites]), np.concatenate([s[4] for s in sites])
    return yao_huang(total, _pred_sums(pred, g), _pred_sums(pred, h))


def _central_yh(rows):
    item, pred, rating, g, h = _yh_arrays(rows)
    return yao_huang(yao_huang_sums(item, pred, rating, g, h), _pred_sums(pred, g), _pred_sums(pred, h))


def test_yao_huang_from_site_sums_is_exact_when_sites_share_no_item():
    site_a = _YH_ROWS[:3]  # item 0
    site_b = _YH_ROWS[3:] + [(7, 1.0, 2.0, "h"), (7, 5.0, 5.0, "g")]  # items 1, 2, 7
    assert _split_yh([site_a, site_b]) == pytest.approx(_central_yh(site_a + site_b))


def test_yao_huang_with_shared_items_is_the_metric_over_site_item_cells():
    # item 0's g ratings at one site, its h rating at the other: pooled, item 0 counts;
    # per site it has one group only, so it drops out.
    site_a, site_b = _YH_ROWS[:2] + _YH_ROWS[3:5], [_YH_ROWS[2], (1, 5.0, 4.0, "g"), (1, 4.0, 4.0, "h")]
    split = _split_yh([site_a, site_b])
    assert split != pytest.approx(_central_yh(site_a + site_b))  # not the centralised value here...
    # ...but exactly the centralised metric once each item is made site-specific
    relabel = [(10 + i, p, r, grp) for i, p, r, grp in site_b]
    assert split == pytest.approx(_central_yh(site_a + relabel))
    assert split["non_parity"] == pytest.approx(_central_yh(site_a + site_b)["non_parity"])  # always exact


def test_popularity_and_coverage_by_hand():
    # (held-out) pairs: item 0 by users 0, 1, 2 (user 1 twice: one hash bucket), item 2 by user 3; 4 users
    pop = item_popularity(np.array([0, 1, 1, 2, 3]), np.array([0, 0, 0, 0, 2]), np.arange(4), 4)
    assert pop.tolist() == [0.75, 0.0, 0.25, 0.0]
    m = popularity_bias(top_sum=1.0, top_n=8, held_sum=1.25, held_n=5)
    assert m == pytest.approx({"pop_at_k": 0.125, "pop_held_out": 0.25, "pop_lift": 0.5})
    assert popularity_bias(0, 0, 0, 0) == {}
    # sites cover 3/4 and 2/4 of the catalogue: mean 5/8, upper bound min(1, 5/4)
    assert coverage(0.75 + 0.5, 2) == {"coverage_site_mean": 0.625, "coverage_upper": 1.0}
    assert coverage(0.0, 0) == {}


# ------------------------------------------------------------------ recommender


def _fair_site() -> tuple[RatingData, _FixedScores]:
    """4 users (0, 1: F; 2, 3: M), catalogue 0..3; see the test below for the hand computation.

    Held-out data only: what the users trained on is not part of it (and not excluded)."""
    x = torch.tensor([[0, 1], [0, 2], [1, 2], [2, 1], [3, 1]])
    y = torch.tensor([4.0, 2.0, 5.0, 3.0, 1.0])
    site = RatingData(
        x,
        y,
        num_users=4,
        attrs={"gender": np.array(["F", "F", "M", "M"], dtype=object), "age": np.array(["25-34"] * 4, dtype=object)},
        catalogue=np.arange(4),
    )
    scores = _FixedScores([[9, 3, 2, 1], [9, 9, 4, 1], [9, 2, 0, 1], [0, 3, 9, 1]])
    return site, scores


def test_recommender_fairness_metrics_on_a_hand_computed_site():
    task = recsys_task(**{"recsys.top-k": 2, "recsys.min-group-size": 1})
    site, model = _fair_site()
    m = task.evaluate(model, site)
    # errors: F rows -1, 0, -1 (predictions 3, 2, 4); M rows -1, +2 (predictions 2, 3)
    assert m["group.gender.F.rmse"] == pytest.approx(math.sqrt(2 / 3)) and m["group.gender.F.mae"] == pytest.approx(
        2 / 3
    )
    assert m["group.gender.M.rmse"] == pytest.approx(math.sqrt(5 / 2)) and m["group.gender.M.mae"] == pytest.approx(1.5)
    assert m["group.gender.F.pred"] == 9 and m["group.gender.M.pred"] == 5
    # top-2 over every catalogue item (none excluded): u0 {0, 1} (one hit at rank 2 of two
    # relevant), u1 {0, 1} (relevant: 2; no hit), u2 {0, 1} and u3 {2, 1} (hits at rank 2)
    ndcg_u0 = (1 / math.log2(3)) / (1 + 1 / math.log2(3))
    assert m["group.gender.F.ndcg_at_k"] == pytest.approx(ndcg_u0 / 2)
    assert m["group.gender.M.ndcg_at_k"] == pytest.approx(1 / math.log2(3))
    # Yao & Huang: only item 1 has both groups: d_F = 3 - 4 = -1, d_M = 2.5 - 2 = +0.5
    assert m["yh.gender.items"] == 1
    assert m["unfairness.gender.value"] == pytest.approx(1.5)
    assert m["unfairness.gender.absolute"] == pytest.approx(0.5)
    assert m["unfairness.gender.underestimation"] == pytest.approx(1.0)
    assert m["unfairness.gender.overestimation"] == pytest.approx(0.5)
    assert m["unfairness.gender.non_parity"] == pytest.approx(abs(9 / 3 - 5 / 2))
    # popularity (share of the 4 held-out users who hold the item out): [0, 3/4, 2/4, 0]
    # top slots: (0 + 3/4) * 3 + 2/4 + 3/4 = 7/2 over 8; held-out items 1, 2, 2, 1, 1: 13/4 over 5
    assert (
        m["pop_at_k"] == pytest.approx(7 / 16)
        and m["pop_held_out"] == pytest.approx(13 / 20)
        and m["pop_lift"] == pytest.approx((7 / 16) / (13 / 20))
    )
    # recommended: items 0, 1, 2 of 4
    assert m["coverage_site_mean"] == 0.75 and m["coverage_upper"] == 0.75
    # and the server's combination of this one site gives the same metrics
    combined = task.combine_metrics([(5, m)])
    for key in (
        "unfairness.gender.value",
        "unfairness.gender.non_parity",
        "pop_lift",
        "coverage_site_mean",
        "group.gender.F.mae",
    ):
        assert combined[key] == pytest.approx(m[key])
    assert not any(k.startswith("yh.") for k in combined if k != "yh.gender.items")


def test_yao_huang_sums_are_not_sent_or_reported_for_a_withheld_group():
    task = recsys_task(**{"recsys.top-k": 2, "recsys.min-group-size": 3})
    site, model = _fair_site()
    m = task.evaluate(model, site)  # 2 F, 2 M users: both withheld
    assert not any(k.startswith(("yh.", "unfairness.", "group.gender")) for k in m)
    # a site that sent both groups, and their Yao & Huang sums: F has too few users once combined
    # (under k = 3), so F and M (complementary suppression) and every Yao & Huang figure are withheld
    site_m = {
        "n_ranked": 20.0,
        "n_ratings": 40.0,
        "sse": 1.0,
        "sae": 1.0,
        "hits": 0.0,
        "dcg": 0.0,
        "group.gender.F.users": 1.0,
        "group.gender.F.n": 2.0,
        "group.gender.F.pred": 6.0,
        "group.gender.F.sse": 1.0,
        "group.gender.F.sae": 1.0,
        "group.gender.F.dcg": 0.0,
        "group.gender.M.users": 19.0,
        "group.gender.M.n": 38.0,
        "group.gender.M.pred": 100.0,
        "group.gender.M.sse": 1.0,
        "group.gender.M.sae": 1.0,
        "group.gender.M.dcg": 0.0,
        "yh.gender.items": 1.0,
        "yh.gender.value": 0.5,
        "yh.gender.absolute": 0.5,
        "yh.gender.underestimation": 0.5,
        "yh.gender.overestimation": 0.0,
    }
    combined = task.combine_metrics([(40, site_m)])
    assert not any(k.startswith(("yh.", "unfairness.", "group.gender.F")) for k in combined)


def _site_reference(task, s):
    """Per-rating and per-user values at site s, computed here and pooled by the test."""
    model = task.build_model(s)
    train, test = task.site_data(s)
    m = task.evaluate(model, test)
    with torch.no_grad():
        pred = model(test.x).clamp(1, 5).numpy().astype(np.float64)
        hits, ndcg, top = ranking(model, test, torch.device("cpu"), task.params.top_k)
    users, items = test.x[:, 0].numpy(), test.x[:, 1].numpy()
    cat = ranked_items(test)
    # popularity, written out: of the site's held-out users, the share holding the item out
    holders = Counter(i for _, i in set(zip(users.tolist(), items.tolist())))
    pop = np.array([holders[j] / len(set(users.tolist())) for j in cat.tolist()])
    return m, {
        "item": test.x[:, 1].numpy(),
        "pred": pred,
        "rating": test.y.numpy().astype(np.float64),
        "gender": test.attrs["gender"][users],
        "age": test.attrs["age"][users],
        "user_gender": test.attrs["gender"][np.unique(users)],
        "user_ndcg": ndcg,
        "top_pop": pop[top[top >= 0]],
        "held_pop": pop[np.searchsorted(cat, items)],
        "union": set(cat[top].ravel().tolist()),
        "catalogue": len(cat),
    }


def _loop_yao_huang(item, pred, rating, g, h) -> dict[str, float]:
    """The paper's four item-level metrics, written out item by item (an independent reference)."""
    terms = {"value": [], "absolute": [], "underestimation": [], "overestimation": []}
    for j in np.unique(item):
        rows = item == j
        if not (rows & g).any() or not (rows & h).any():
            continue
        dg = pred[rows & g].mean() - rating[rows & g].mean()
        dh = pred[rows & h].mean() - rating[rows & h].mean()
        terms["value"].append(abs(dg - dh))
        terms["absolute"].append(abs(abs(dg) - abs(dh)))
        terms["underestimation"].append(abs(max(0, -dg) - max(0, -dh)))
        terms["overestimation"].append(abs(max(0, dg) - max(0, dh)))
    return {k: float(np.mean(v)) for k, v in terms.items()}


def test_recommender_combined_fairness_metrics_equal_the_pooled_computation():
    task = recsys_task(**{"recsys.min-group-size": 1})
    torch.manual_seed(0)
    sites = [_site_reference(task, s) for s in range(SMALL["num-sites"])]
    combined = task.combine_metrics([(len(r["item"]), m) for m, r in sites])
    pool = {k: np.concatenate([r[k] for _, r in sites]) for k in sites[0][1] if k not in ("union", "catalogue")}
    err = pool["pred"] - pool["rating"]
    for attr in ("gender", "age"):
        for value in np.unique(pool[attr]):
            rows = pool[attr] == value
            prefix = f"group.{attr}.{value}."
            assert combined[prefix + "rmse"] == pytest.approx(math.sqrt(np.mean(err[rows] ** 2)), rel=1e-9)
            assert combined[prefix + "mae"] == pytest.approx(np.mean(np.abs(err[rows])), rel=1e-9)
    for value in ("F", "M"):
        assert combined[f"group.gender.{value}.ndcg_at_k"] == pytest.approx(
            np.mean(pool["user_ndcg"][pool["user_gender"] == value])
        )
    g, h = pool["gender"] == "F", pool["gender"] == "M"
    assert combined["unfairness.gender.non_parity"] == pytest.approx(
        abs(pool["pred"][g].mean() - pool["pred"][h].mean())
    )
    # item-level terms: the centralised metric over (site, item) cells (items are shared by the sites here)
    cell = np.concatenate([r["item"] + s * 10**9 for s, (_, r) in enumerate(sites)])
    ref = _loop_yao_huang(cell, pool["pred"], pool["rating"], g, h)
    for term in ("value", "absolute", "underestimation", "overestimation"):
        assert combined[f"unfairness.gender.{term}"] == pytest.approx(ref[term], rel=1e-9)
    assert combined["pop_at_k"] == pytest.approx(pool["top_pop"].mean()) and combined["pop_held_out"] == pytest.approx(
        pool["held_pop"].mean()
    )
    union = len(set().union(*(r["union"] for _, r in sites))) / sites[0][1]["catalogue"]
    best_site = max(len(r["union"]) for _, r in sites) / sites[0][1]["catalogue"]
    assert combined["coverage_site_mean"] <= best_site <= union <= combined["coverage_upper"]
    assert combined["coverage_site_mean"] == pytest.approx(
        np.mean([len(r["union"]) for _, r in sites]) / sites[0][1]["catalogue"]
    )


# ------------------------------------------------------------------ generators


def test_vae_per_class_reconstruction_by_hand_and_combined_from_sums():
    from common.tasks.vae.task import class_recon_metrics, class_sums

    sums = class_sums(torch.tensor([1.0, 2.0, 3.0, 6.0]), torch.tensor([0, 0, 1, 2]))
    assert sums == {
        "class.0.recon_sum": 3.0,
        "class.0.n": 2.0,
        "class.1.recon_sum": 3.0,
        "class.1.n": 1.0,
        "class.2.recon_sum": 6.0,
        "class.2.n": 1.0,
    }
    m = class_recon_metrics(sums)
    assert m["class.0.recon_nll"] == 1.5 and m["recon_disparity.gap"] == 4.5 and m["recon_disparity.ratio"] == 4.0
    assert m["recon_disparity.std"] == pytest.approx(math.sqrt(3.5)) and m["recon_disparity.worst"] == 6.0

    from common.tasks.vae.task import negative_elbo_terms

    # every class sent (vae.min-group-size = 1), so the combined sums are the pooled ones
    cfg = make_cfg(**{"num-sites": 3, "vae.hidden-dim": 16, "vae.latent-dim": 2, "vae.min-group-size": 1})
    task = get_task("vae")(cfg)
    torch.manual_seed(0)
    model = task.build_model().eval()
    results, recon, labels = [], [], []
    for s in range(3):
        val = task.site_data(s)[1]
        results.append((len(val), task.evaluate(model, val)))
        with torch.no_grad():  # the same fixed noise as evaluate
            recon.append(negative_elbo_terms(model, val.x, torch.Generator().manual_seed(1234))[0])
        labels.append(val.y)
    combined = task.combine_metrics(results)
    recon, labels = torch.cat(recon), torch.cat(labels)
    means = {str(c): float(recon[labels == c].double().mean()) for c in labels.unique().tolist()}
    for c, v in means.items():
        assert combined[f"class.{c}.recon_nll"] == pytest.approx(v, rel=1e-6)
        assert combined[f"class.{c}.n"] == int((labels == int(c)).sum())
    assert combined["recon_disparity.gap"] == pytest.approx(max(means.values()) - min(means.values()), rel=1e-6)
    # the example-weighted mean of the sites' means is still the pooled mean
    assert combined["recon_nll"] == pytest.approx(float(recon.mean()), rel=1e-5)


def test_class_distribution_tv_by_hand_and_for_the_vae():
    from common.metrics.image_quality import predicted_shares, real_shares, total_variation

    class Fixed(torch.nn.Module):  # "classifies" an image as its first pixel
        def forward(self, x):
            return torch.nn.functional.one_hot(x[:, 0].long(), 3).float()

    predicted, shares = predicted_shares(Fixed(), torch.tensor([[0.0], [0.0], [1.0], [0.0]]), 3)
    assert predicted.tolist() == [0, 0, 1, 0] and shares.tolist() == [0.75, 0.25, 0.0]
    real = real_shares(torch.tensor([0, 1, 2, 2]), 3)
    assert total_variation(shares, real) == pytest.approx(0.5 * (0.5 + 0.0 + 0.5))
    assert real_shares(None, 4).tolist() == [0.25] * 4

    task = get_task("vae")(make_cfg(**{"num-sites": 3, "vae.hidden-dim": 16, "vae.latent-dim": 2}))
    torch.manual_seed(0)
    m = task.evaluate(task.build_model(), task.server_test_data())
    assert 0 <= m["class_tv"] <= 1 and "recon_disparity.ratio" in m
    assert "class_tv" not in task.evaluate(task.build_model(), task.site_data(0)[1])  # sites have no classifier
    assert "class_tv" not in task.evaluate(task.build_model(), ArrayData(task.server_test_data().x, None))
