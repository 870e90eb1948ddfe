"""Bias corrections (recsys.correction, gan.class-target): each switch moves its metric the expected way on biased data.

Recommender: a generated ratings set where the two gender groups disagree item by item
(a gender x item interaction); ``recsys.correction=group-offset`` must cut Yao & Huang's
value unfairness, with and without DP-SGD. Generators: a stub conditional generator that
draws the wrong class for some labels, and an imbalanced real label distribution;
``gan.class-target`` must bring the generated class shares closer to the target.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from common.data.arrays import ArrayData
from common.data.ratings import RatingData
from common.errors import ConfigError
from common.metrics.fairness import label_weights_for_target, quota_labels
from common.metrics.image_quality import class_shares, total_variation
from common.privacy.engines import FastDPStep, OpacusDPStep
from common.privacy.plan import plan_round
from common.privacy.training import run_local_round
from common.tasks import get_task
from common.tasks.recsys.model import OFFSET_GROUPS
from tests.conftest import make_cfg
from tests.unit.test_recsys import engine_grads

KEY = bytes(range(32))

# ------------------------------------------------------------------ config


@pytest.mark.parametrize(
    "key, value, words",
    [
        ("recsys.correction", "posthoc", "must be one of none, group-offset"),
        ("recsys.correction-lambda", -0.1, "must be >= 0"),
        ("gan.class-target", "balanced", "must be one of none, uniform, real"),
    ],
)
def test_bad_fairness_settings_fail_in_one_line(key, value, words):
    with pytest.raises(ConfigError, match=words) as err:
        make_cfg(**{**TASK_CFG[key.split(".")[0]], key: value})
    assert key in str(err.value) and "\n" not in str(err.value)


# The corrections live in their task's table, so a config that sets one names the task.
TASK_CFG = {"recsys": {"task": "recsys", "data.source": "synthetic", "data.partition": "iid"}, "gan": {"task": "gan"}}


@pytest.mark.parametrize(
    "old, new",
    [
        ("fairness.recsys-correction", "recsys.correction"),
        ("fairness.recsys-lambda", "recsys.correction-lambda"),
        ("fairness.gan-class-target", "gan.class-target"),
    ],
)
def test_the_old_fairness_keys_name_their_new_key_in_one_line(old, new):
    with pytest.raises(ConfigError, match=f"did you mean '{new}'") as err:
        make_cfg(**{old: "none"})
    assert old in str(err.value) and "\n" not in str(err.value)


def test_fairness_defaults_are_off_and_round_trip():
    cfg = make_cfg(**TASK_CFG["recsys"])
    gan = make_cfg(**TASK_CFG["gan"])
    assert (cfg.task_params.correction, gan.task_params.class_target) == ("none", "none")
    flat = cfg.to_flat()
    assert flat["recsys.correction"] == "none" and "fairness.q" not in flat
    assert make_cfg(**{**TASK_CFG["gan"], "gan.class-target": "real"}).task_params.class_target == "real"


def test_a_class_target_needs_a_conditional_generator():
    cfg = make_cfg(**{"task": "gan", "gan.conditional": False, "gan.class-target": "uniform"})
    with pytest.raises(ConfigError, match="gan.class-target"):
        get_task("gan")(cfg)


# ------------------------------------------------------------------ recommender


def biased_ratings(
    seed: int = 0, users: int = 300, items: int = 30, per_user: int = 12
) -> tuple[RatingData, RatingData]:
    """Ratings where women rate half the items one point above men and the other half one
    point below (besides user and item effects): value unfairness for a model that misses it."""
    rng = np.random.default_rng(seed)
    gender = np.where(rng.random(users) < 0.4, "F", "M").astype(object)
    side = rng.choice([-1.0, 1.0], size=items)
    b_item, b_user = rng.normal(0, 0.5, items), rng.normal(0, 0.3, users)
    rows = []
    for u in range(users):
        g = 0.5 if gender[u] == "F" else -0.5
        for j in rng.choice(items, size=per_user, replace=False):
            r = 3.2 + b_user[u] + b_item[j] + g * side[j] + rng.normal(0, 0.4)
            rows.append((u, j, float(np.clip(np.round(r), 1, 5))))
    table = np.array(rows)
    held = rng.random(len(table)) < 0.25
    attrs = {"gender": gender, "age": np.full(users, "25-34", dtype=object)}

    def make(mask: np.ndarray) -> RatingData:
        x = torch.as_tensor(table[mask, :2], dtype=torch.long)
        return RatingData(
            x,
            torch.as_tensor(table[mask, 2], dtype=torch.float32),
            num_users=users,
            attrs=attrs,
            catalogue=np.arange(items),
        )

    return make(~held), make(held)


def recsys_cfg(correction: str, dp: bool, **extra):
    flat = {
        "task": "recsys",
        "data.source": "synthetic",
        "data.partition": "iid",
        "num-sites": 1,
        "recsys.num-buckets": 64,
        "recsys.dim": 2,
        "recsys.l2": 0.05,
        "recsys.min-group-size": 1,
        "train.batch-size": 128,
        "train.lr": 0.05,
        "train.local-epochs": 4.0,
        "dp.enabled": dp,
        "recsys.correction": correction,
        **extra,  # recsys.correction-lambda: the default
    }
    if dp:
        flat.update({"dp.noise-multiplier": 0.5, "dp.epsilon-budget": 1e6})
    return make_cfg(**flat)


def train_one_site(correction: str, dp: bool, **extra):
    cfg = recsys_cfg(correction, dp, **extra)
    task = get_task("recsys")(cfg, KEY)
    train, test = biased_ratings()
    task.site_data = lambda site: (train, test)  # this test's data instead of the configured source
    torch.manual_seed(0)
    model = task.build_model(0)
    run_local_round(task, model, train, plan_round(cfg, len(train)), torch.device("cpu"), seed=0)
    return task, model, test


def train_and_evaluate(correction: str, dp: bool) -> dict[str, float]:
    task, model, test = train_one_site(correction, dp)
    return task.evaluate(model, test)


@pytest.mark.parametrize("dp", [False, True], ids=["non-private", "dp-sgd"])
def test_group_offset_cuts_value_unfairness_on_biased_ratings(dp):
    before, after = train_and_evaluate("none", dp), train_and_evaluate("group-offset", dp)
    value = "unfairness.gender.value"
    assert after[value] <= 0.7 * before[value], (before[value], after[value])  # at least 30% down
    assert after["rmse"] <= before["rmse"] * 1.02


def test_the_decay_fades_offsets_that_only_dp_noise_moved():
    # no user of this data is in the "other" group: under DP-SGD its rows see only noise
    other = slice(2 * 64, 3 * 64)
    rows = {
        lam: train_one_site("group-offset", True, **{"recsys.correction-lambda": lam})[1].group_item_bias.weight[other]
        for lam in (0.0, 2.0)
    }
    assert rows[0.0].abs().max() > 0  # the noise reached them
    assert rows[2.0].norm() < 0.5 * rows[0.0].norm()


def test_group_offset_is_shared_its_user_map_is_not_and_dp_clips_it_per_rating():
    cfg = recsys_cfg("group-offset", dp=False)
    task = get_task("recsys")(cfg, KEY)
    train, test = biased_ratings()
    task.site_data = lambda site: (train, test)
    torch.manual_seed(0)
    net = task.build_model(0)
    keys = task.shared_keys(net)
    assert "group_item_bias.weight" in keys  # averaged by the server like the item table
    assert not any("user" in k for k in keys) and not any(
        "group" in k for k in net.state_dict() if k != "group_item_bias.weight"
    )
    assert net.group_item_bias.weight.shape == (len(OFFSET_GROUPS) * 64, 1)
    # the server's model has the same shared arrays
    assert task.shared_keys(task.build_model()) == keys
    # the offset is one more per-rating embedding lookup: the fast engine clips it exactly as Opacus does
    with torch.no_grad():
        net.group_item_bias.weight.normal_(0, 0.3)
    batch = ArrayData(train.x[:64], train.y[:64])
    fast, ref = engine_grads(FastDPStep, task, net, batch), engine_grads(OpacusDPStep, task, net, batch)
    assert fast["group_item_bias.weight"].abs().sum() > 0
    for name in ref:
        assert torch.allclose(fast[name], ref[name], rtol=1e-4, atol=1e-6), name


# ------------------------------------------------------------------ generators


def test_label_weights_hit_the_target_when_they_can():
    target = np.array([0.1, 0.2, 0.3, 0.4])
    assert label_weights_for_target(np.eye(4), target) == pytest.approx(target)
    # label 0 draws class 1 half the time: ask for label 0 more, label 1 less
    conf = np.array([[0.5, 0.5, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    w = label_weights_for_target(conf, np.full(4, 0.25))
    assert total_variation(w @ conf, np.full(4, 0.25)) == pytest.approx(0.0, abs=1e-9)
    floored = label_weights_for_target(conf, np.full(4, 0.25), floor=0.05)
    assert floored.min() >= 0.05 - 1e-12 and floored.sum() == pytest.approx(1.0)
    # a generator that ignores its labels: no mix helps, so the mix stays the target (not lopsided)
    agnostic = np.tile([0.7, 0.1, 0.1, 0.1], (4, 1))
    assert label_weights_for_target(agnostic, np.full(4, 0.25), shift_cost=0.5) == pytest.approx(np.full(4, 0.25))
    labels = quota_labels([0.1, 0.2, 0.3, 0.4], 10)
    assert np.bincount(labels).tolist() == [1, 2, 3, 4] and len(quota_labels(w, 7)) == 7


class _OneHotClassifier(nn.Module):
    """'Classifies' an image as the position of its largest pixel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class _SkewedGenerator(nn.Module):
    """Draws the asked-for class, except that labels 0 and 2 draw class 1 a quarter of the
    time (a generator that has not learnt classes 0 and 2 well)."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k

    def forward(self, labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        coin = torch.rand(len(labels), generator=generator) < 0.25
        drawn = torch.where(((labels == 0) | (labels == 2)) & coin, torch.ones_like(labels), labels)
        return nn.functional.one_hot(drawn, self.k).float()


def _shares_of(task, clf, n=600) -> np.ndarray:
    model = task.build_model()
    model.generator = _SkewedGenerator(task.params.num_classes)
    labels = task.sample_labels(model, n, torch.device("cpu"), clf)
    x = model.generator(labels, generator=torch.Generator().manual_seed(7))
    return class_shares(clf(x).argmax(1).numpy(), task.params.num_classes)


@pytest.fixture
def imbalanced_npz(tmp_path):
    """4 classes in shares 0.4 / 0.3 / 0.2 / 0.1 (tiny 4-pixel 'images')."""
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), [400, 300, 200, 100])
    x = (np.eye(4)[y] * 0.8 + rng.random((len(y), 4)) * 0.2).astype(np.float32)
    path = tmp_path / "imbalanced.npz"
    np.savez(path, x=x, y=y)
    return path


def gan_task(path, target: str, min_group_size: int = 1):
    """min_group_size 1: every class count sent (the default 10 withholds this data's rare class)."""
    cfg = make_cfg(
        **{
            "task": "gan",
            "data.source": "npz",
            "data.path": str(path),
            "num-sites": 3,
            "data.partition": "iid",
            "gan.num-classes": 4,
            "gan.features": 16,
            "gan.hidden-dim": 8,
            "gan.latent-dim": 2,
            "gan.class-target": target,
            "gan.min-group-size": min_group_size,
        }
    )
    return get_task("gan")(cfg)


@pytest.mark.parametrize("target", ["uniform", "real"])
def test_class_target_moves_generated_class_shares_towards_it(imbalanced_npz, target):
    clf = _OneHotClassifier()
    corrected = gan_task(imbalanced_npz, target)
    goal = corrected.class_target()
    before = total_variation(_shares_of(gan_task(imbalanced_npz, "none"), clf), goal)
    after = total_variation(_shares_of(corrected, clf), goal)
    assert before > 0.1 and after < 0.3 * before, (before, after)


def test_real_target_is_the_sum_of_the_sites_class_counts(imbalanced_npz):
    task = gan_task(imbalanced_npz, "real")
    sites = [task.site_data(s)[1] for s in range(3)]
    pooled = np.bincount(torch.cat([v.y for v in sites]).numpy(), minlength=4)
    assert task.class_target() == pytest.approx(pooled / pooled.sum())
    # what a site sends is counts of its validation labels; the server adds them up
    model = task.build_model()
    replies = [(len(v), task.evaluate(model, v)) for v in sites]
    assert all(set(m) >= {f"class.{c}.n" for c in range(4)} for _, m in replies)
    assert all(isinstance(v, float) for _, m in replies for v in m.values())
    combined = task.combine_metrics(replies)
    assert [combined[f"class.{c}.n"] for c in range(4)] == pooled.tolist()
    # once combined counts exist they are the target (here the same numbers)
    assert task.class_target() == pytest.approx(pooled / pooled.sum())
    # with gan.min-group-size = k, no class of fewer than k is sent, and the withheld classes
    # hold >= k images together (complementary suppression)
    k = int(min(pooled)) + 1  # the rarest class falls under k at every site
    small = gan_task(imbalanced_npz, "real", min_group_size=k)
    for v in sites:
        m = small.evaluate(model, v)
        counts = np.bincount(v.y.numpy(), minlength=4)
        assert all(m[f"class.{c}.n"] >= k for c in range(4) if f"class.{c}.n" in m)
        withheld = [counts[c] for c in range(4) if f"class.{c}.n" not in m]
        assert withheld and sum(withheld) >= k
    # without a target the sites send no class counts at all
    plain = gan_task(imbalanced_npz, "none")
    assert not any(k.startswith("class.") for k in plain.evaluate(plain.build_model(), sites[0]))


def test_without_a_classifier_the_label_mix_is_the_target(imbalanced_npz):
    task = gan_task(imbalanced_npz, "real")
    labels = task.sample_labels(task.build_model(), 1000, torch.device("cpu"))
    assert class_shares(labels.numpy(), 4) == pytest.approx(task.class_target(), abs=1e-3)
    none = gan_task(imbalanced_npz, "none")
    assert none.sample_labels(none.build_model(), 8, torch.device("cpu")).tolist() == [0, 1, 2, 3, 0, 1, 2, 3]


def test_value_noise_is_the_value_unfairness_of_errors_without_group_structure():
    from common.metrics.fairness import yao_huang, yao_huang_sums

    rng = np.random.default_rng(0)
    item = np.repeat(np.arange(500), 5)
    group = np.tile(np.array([True, True, False, False, False]), 500)  # 2 ratings of g, 3 of h per item
    rating = rng.integers(1, 6, size=len(item)).astype(float)
    pred = rating + rng.normal(0, 1.0, size=len(item))  # errors with no group x item part
    m = yao_huang(yao_huang_sums(item, pred, rating, group, ~group), (1.0, 1.0), (1.0, 1.0))
    expected = np.sqrt(2 / np.pi) * np.sqrt(1 / 2 + 1 / 3)
    assert m["value_noise"] == pytest.approx(expected, rel=0.05) and m["value"] == pytest.approx(expected, rel=0.1)
    # a systematic group x item error shows as value well above value_noise
    shifted = pred + np.where(group, 1.0, 0.0) * rng.choice([-1.0, 1.0], size=500)[item]
    m2 = yao_huang(yao_huang_sums(item, shifted, rating, group, ~group), (1.0, 1.0), (1.0, 1.0))
    assert m2["value"] > 1.3 * m2["value_noise"]
