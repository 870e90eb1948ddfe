"""The recommender's evaluation reads held-out ratings only, and its split is stable per rating.

Issue 18, findings 1 and 3: the evaluation sums a site sends are not covered by epsilon,
so they must not depend on which *training* ratings exist; and the train/held-out split
must not move other ratings when one is added or removed (or one rating's protection is
group privacy over every rating it moves).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from common.data.ratings import pseudonymise, site_split
from common.deploy.keys import Pseudonymizer
from common.privacy.secagg_stats import SecureStats
from common.tasks import get_task
from common.tasks.recsys.model import BiasedMF
from tests.conftest import make_cfg

KEY = bytes(range(32))
BUCKETS = 4096
CFG = {
    "task": "recsys",
    "num-sites": 1,
    "data.source": "csv",
    "data.partition": "site",
    "recsys.num-buckets": BUCKETS,
    "recsys.min-group-size": 2,
    "recsys.top-k": 5,
}


def _raw(seed: int = 0, users: int = 40, items: int = 30, per_user: int = 10):
    """Raw rows (user, item, rating), user attributes and the item catalogue."""
    rng = np.random.default_rng(seed)
    rows = [
        (f"u{u:03d}", f"i{i:03d}", float(rng.integers(1, 6)))
        for u in range(users)
        for i in rng.choice(items, size=per_user, replace=False)
    ]
    attrs = {f"u{u:03d}": ("FM"[u % 2], 20 + u, f"{u % 10}0000") for u in range(users)}
    return rows, attrs, [f"i{i:03d}" for i in range(items)]


def _held_out_site(rows, held, attrs, catalogue):
    """The held-out RatingData of a one-site federation holding ``rows``, split by ``held``."""
    users, items, ratings = zip(*rows)
    data = pseudonymise(users, items, np.asarray(ratings), attrs, catalogue, Pseudonymizer(KEY), BUCKETS)
    return site_split(data, np.arange(data.num_users), np.asarray(held, dtype=bool))[1]


def _released(task, model, test) -> tuple[dict[str, float], np.ndarray, int]:
    """What the site sends about ``test``: the plain evaluate metrics, the SecAgg+ vector, the count."""
    m = task.evaluate(model, test)
    assert all(np.isfinite(v) for v in m.values())
    packed = SecureStats(task.sum_keys(), task.cfg.secagg).pack(m, task.is_sum_key)
    return m, packed, len(test)


@pytest.mark.parametrize("declared", [True, False], ids=["declared-catalogue", "csv-no-catalogue"])
def test_one_training_rating_changes_no_evaluation_metric(declared):
    """Remove, or add, one training rating: every metric the site sends stays bit-identical
    (for the same model), plain and in the SecAgg+ sum schema. Users keep other ratings."""
    task = get_task("recsys")(make_cfg(**CFG), KEY)
    rows, attrs, catalogue = _raw()
    catalogue = catalogue if declared else []
    held = [j % 4 == 0 for j in range(len(rows))]  # a fixed split: this test is about evaluation
    torch.manual_seed(0)
    base = _held_out_site(rows, held, attrs, catalogue)
    model = BiasedMF(base.num_users, BUCKETS, task.params)  # a fixed model, as DP training left it
    for emb in (model.user_emb, model.item_emb, model.item_bias):
        torch.nn.init.normal_(emb.weight, std=1.0)
    before = _released(task, model, base)
    assert before[0]["hits"] > 0 and before[0]["pop_held_out_sum"] > 0  # the test has something to move

    # the training rating the model scores highest, of a user who also holds ratings out:
    # an "exclude what the user trained on" ranking would see it go
    holders = {rows[k][0] for k in range(len(rows)) if held[k]}
    train = [j for j in range(len(rows)) if not held[j] and rows[j][0] in holders]
    users, items, ratings = zip(*rows)
    data = pseudonymise(users, items, np.asarray(ratings), attrs, catalogue, Pseudonymizer(KEY), BUCKETS)
    with torch.no_grad():
        scores = model(torch.as_tensor(np.stack([data.user[train], data.item[train]], 1)))
    r = train[int(scores.argmax())]
    neighbours = {
        "removed": ([x for j, x in enumerate(rows) if j != r], [h for j, h in enumerate(held) if j != r]),
        # a new training rating of an item no one rated and the catalogue lacks
        "added-new-item": ([*rows, (rows[0][0], "brand-new-item", 5.0)], [*held, False]),
        # a training rating of an item others hold out: it moved popularity and the ranking
        "added-popular-item": ([*rows, (rows[r][0], rows[0][1], 1.0)], [*held, False]),
    }
    changed = {}
    for name, (nrows, nheld) in neighbours.items():
        after = _released(task, model, _held_out_site(nrows, nheld, attrs, catalogue))
        keys = sorted(k for k in set(before[0]) | set(after[0]) if before[0].get(k) != after[0].get(k))
        if keys or not np.array_equal(before[1], after[1]) or before[2] != after[2]:
            changed[name] = keys
    assert not changed


def _moved(draw_all: dict[tuple[str, str], bool], draw_less: dict[tuple[str, str], bool]) -> int:
    return sum(draw_all[k] != v for k, v in draw_less.items())


def _split_of(rows, task_fraction: float = 0.2) -> dict[tuple[str, str], bool]:
    """(user, item) -> held out?, through the loader's real path (pseudonymise + held_out_mask)."""
    from common.data.ratings import held_out_mask

    users, items, ratings = zip(*rows)
    pseudo = Pseudonymizer(KEY)
    data = pseudonymise(users, items, np.asarray(ratings), {}, [], pseudo, 1 << 20)
    held = held_out_mask(data, task_fraction)
    return {(u, i): bool(h) for u, i, h in zip(users, items, held)}


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_removing_or_adding_one_rating_moves_no_other(data):
    rows, _, _ = _raw(seed=data.draw(st.integers(0, 10**6)), users=20, per_user=data.draw(st.integers(1, 15)))
    split = _split_of(rows)
    r = data.draw(st.integers(0, len(rows) - 1))
    assert _moved(split, _split_of(rows[:r] + rows[r + 1 :])) == 0
    extra = (data.draw(st.sampled_from(["u000", "someone-new"])), data.draw(st.text(min_size=1, max_size=8)), 3.0)
    grown = _split_of([*rows, extra]) if extra[:2] not in split else split
    assert _moved(grown, _split_of(rows)) == 0


def test_split_is_keyed_and_near_the_fraction():
    rows, _, _ = _raw(users=300, items=200, per_user=40)
    split = _split_of(rows)
    share = np.mean(list(split.values()))
    assert abs(share - 0.2) < 0.01  # 12,000 independent draws: sd 0.004
    users, items, ratings = zip(*rows)
    other = pseudonymise(users, items, np.asarray(ratings), {}, [], Pseudonymizer(bytes(32)), 1 << 20)
    from common.data.ratings import held_out_mask

    assert np.mean(held_out_mask(other, 0.2) != np.asarray(list(split.values()))) > 0.2  # another key, another split
    # per user: the share averages the fraction (each user's count is Binomial(40, 0.2))
    per_user = np.bincount([int(u[1:]) for (u, _), h in split.items() if h], minlength=300) / 40
    assert abs(per_user.mean() - 0.2) < 0.01 and per_user.std() == pytest.approx(0.063, abs=0.015)
