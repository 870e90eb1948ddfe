"""User-level DP (dp.unit = user, issue 21): per-person clipping, sampling, accounting, refusals.

The engine's per-person clipped sum is checked against a reference that materialises each
person's gradient with plain autograd (one backward per person), clips it and adds up.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from common.config import RunConfig
from common.data.arrays import ArrayData, capped_per_person
from common.errors import ConfigError
from common.privacy.accounting import RoundPlan
from common.privacy.engines import FastDPStep, OpacusDPStep
from common.privacy.engines.rules import PersonGroups
from common.privacy.plan import plan_round
from common.privacy.training import PersonSampler, run_local_round
from common.tasks import get_task
from common.tasks.recsys.config import RecsysConfig
from common.tasks.recsys.model import BiasedMF, NeuralMF, offset_groups
from tests.conftest import make_cfg
from tests.unit.test_recsys import KEY, SMALL

_USER_RECSYS = {**SMALL, "dp.unit": "user", "dp.noise-multiplier": 1.0}


def _plan(n: int, C: float) -> RoundPlan:
    return RoundPlan(n, 1.0, 1, 0.0, C, 1e-5, "rdp")


def _batch(users: int, seed: int, buckets: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ratings of ``users`` persons with 1..9 ratings each, contiguous per person; few buckets,
    so that two items of one person often share a bucket (rows that add before the norm)."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 10, (users,), generator=g)
    person = torch.repeat_interleave(torch.arange(users), counts)
    item = torch.randint(0, buckets, (person.numel(),), generator=g)
    rating = torch.randint(1, 6, (person.numel(),), generator=g).float()
    return torch.stack([person, item], 1), rating, person


def _reference(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, person: torch.Tensor, C: float):
    """sum_u clip_C(grad of sum_{i in u} loss_i), each person's gradient materialised."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    for u in person.unique():
        m = person == u
        grads = torch.autograd.grad((model(x[m]) - y[m]).pow(2).sum(), params, allow_unused=True)
        grads = [torch.zeros_like(p) if gr is None else gr for p, gr in zip(params, grads)]
        norm = math.sqrt(sum(float(gr.pow(2).sum()) for gr in grads))
        scale = min(1.0, C / (norm + 1e-6))
        for t, gr in zip(total, grads):
            t.add_(gr * scale)
    return total, params


@pytest.mark.parametrize("model_cls", [BiasedMF, NeuralMF], ids=["mf", "neural"])
def test_per_person_clipping_matches_a_materialised_reference(model_cls):
    """The fast engine's per-person norms (index_add over (person, row) cells for tables, two
    Gram matrices for linear layers) give the same clipped sum as per-person autograd."""
    users, buckets, C = 12, 5, 0.5
    x, y, person = _batch(users, seed=1, buckets=buckets)
    p = RecsysConfig(dim=4, hidden_dim=6)
    torch.manual_seed(0)
    gender = np.array(["F", "M", "x"] * (users // 3))
    model = model_cls(users, buckets, p, offset_groups(gender)).train()
    full = copy.deepcopy(model)  # before any forward (the model keeps its last norms)
    ref, _ = _reference(copy.deepcopy(model), x, y, person, C)
    eng = FastDPStep(model, torch.optim.SGD(model.parameters(), lr=0.0), _plan(users, C))
    eng.clipped_grad_sum((model(x) - y).pow(2), PersonGroups.from_sorted(person, users))
    fast = [p.grad for p in model.parameters() if p.requires_grad]
    eng.close()
    for a, b in zip(fast, ref):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
    # The check has teeth: clipping was active, and per-example clipping gives another answer.
    per_example = FastDPStep(full, torch.optim.SGD(full.parameters(), lr=0.0), _plan(len(x), C))
    per_example.clipped_grad_sum((full(x) - y).pow(2))
    other = [p.grad for p in full.parameters() if p.requires_grad]
    per_example.close()
    assert any(not torch.allclose(a, b, rtol=1e-3, atol=1e-4) for a, b in zip(other, ref))


def test_removing_one_person_moves_the_clipped_sum_by_at_most_C():
    users, C = 10, 0.25
    x, y, person = _batch(users, seed=2, buckets=4)
    p = RecsysConfig(dim=4)
    torch.manual_seed(0)
    model = BiasedMF(users, 4, p)

    def clipped(keep: torch.Tensor) -> torch.Tensor:
        m = copy.deepcopy(model).train()
        eng = FastDPStep(m, torch.optim.SGD(m.parameters(), lr=0.0), _plan(users, C))
        idx = torch.unique(person[keep], return_inverse=True)[1]
        eng.clipped_grad_sum((m(x[keep]) - y[keep]).pow(2), PersonGroups.from_sorted(idx, int(idx.max()) + 1))
        out = torch.cat([q.grad.flatten() for q in m.parameters()])
        eng.close()
        return out

    everyone = clipped(torch.ones_like(person, dtype=torch.bool))
    for u in range(users):
        moved = float((everyone - clipped(person != u)).norm())
        assert moved <= C * (1 + 1e-4)
    # Per-example clipping (what record-level DP bounds) lets the busiest person move it by more than C.
    heavy = int(torch.bincount(person).argmax())

    def per_example(keep: torch.Tensor) -> torch.Tensor:
        m = copy.deepcopy(model).train()
        eng = FastDPStep(m, torch.optim.SGD(m.parameters(), lr=0.0), _plan(users, C))
        eng.clipped_grad_sum((m(x[keep]) - y[keep]).pow(2))
        out = torch.cat([q.grad.flatten() for q in m.parameters()])
        eng.close()
        return out

    all_rows = per_example(torch.ones_like(person, dtype=torch.bool))
    assert float((all_rows - per_example(person != heavy)).norm()) > 1.5 * C


def test_person_groups_must_be_contiguous():
    with pytest.raises(ValueError, match="contiguous"):
        PersonGroups.from_sorted(torch.tensor([0, 1, 0]), 2)
    g = PersonGroups.from_sorted(torch.tensor([0, 0, 1, 2, 2, 2]), 3)
    assert g.position.tolist() == [0, 1, 0, 0, 1, 2] and g.width == 3


def test_the_sampler_takes_at_most_cap_records_of_each_sampled_person_and_only_theirs():
    person = torch.tensor([3, 0, 3, 1, 3, 3, 0, 2, 3, 3])  # person 3 has 6 records
    sampler = PersonSampler(person, cap=4, generator=torch.Generator().manual_seed(0))
    assert sampler.persons == 4
    seen_of_3: set[int] = set()
    for _ in range(30):
        idx, groups = sampler.take(torch.tensor([0, 3]))  # persons 0 and 3 (sorted person ids)
        assert groups.count == 2
        assert len(set(idx.tolist())) == len(idx)  # no record twice
        owners = person[idx]
        assert owners[groups.index == 0].unique().tolist() == [0]
        assert owners[groups.index == 1].unique().tolist() == [3]
        assert int((groups.index == 0).sum()) == 2  # all of a person's records when <= cap
        assert int((groups.index == 1).sum()) == 4  # at most cap otherwise
        seen_of_3 |= set(idx[groups.index == 1].tolist())
    assert seen_of_3 == {0, 2, 4, 5, 8, 9}  # the window moves: every record gets its turn
    idx, groups = sampler.take(torch.tensor([], dtype=torch.long))
    assert idx.numel() == 0 and groups.count == 0


def test_a_user_level_round_samples_persons_and_the_ledger_unit_is_user():
    cfg = make_cfg(**_USER_RECSYS)
    task = get_task("recsys")(cfg, KEY)
    train = task.site_data(0)[0]
    users = task.unit_count(train)
    assert users == int(train.person.unique().numel()) < len(train)
    assert task.site_sizes()[0] == users and task.privacy_unit == "user"
    plan = plan_round(cfg, users)
    assert plan.sample_rate == pytest.approx(cfg.train.batch_size / users)  # q over persons
    torch.manual_seed(0)
    model = task.build_model(0)
    before = copy.deepcopy(model.state_dict())
    out = run_local_round(task, model, train, plan, torch.device("cpu"), seed=3)
    assert out.steps_taken == plan.steps > 0
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_user_level_evaluation_counts_at_most_cap_held_out_ratings_per_user():
    cfg = make_cfg(**{**_USER_RECSYS, "dp.max-records-per-user": 2})
    task = get_task("recsys")(cfg, KEY)
    held = task.site_data(0)[1]
    capped = capped_per_person(held, 2)
    assert int(torch.bincount(capped.person).max()) <= 2 < int(torch.bincount(held.person).max())
    torch.manual_seed(0)
    sums = task.evaluate(task.build_model(0), held)
    assert sums["n_ratings"] == len(capped)
    record = get_task("recsys")(make_cfg(**{**_USER_RECSYS, "dp.unit": "record"}), KEY)
    assert record.evaluate(record.build_model(0), held)["n_ratings"] == len(held)
    # metrics.dp: the per-rating bounds scale by the cap, the user counts do not.
    b_user, b_rec = task.metric_bounds().bounds, record.metric_bounds().bounds
    assert b_user["sse"] == 2 * b_rec["sse"] and b_user["n_ranked"] == b_rec["n_ranked"] == 1.0


# ----------------------------------------------------------------- bad input: one line, the key
@pytest.mark.parametrize(
    ("flat", "key"),
    [
        ({"dp.max-records-per-user": 0}, "dp.max-records-per-user"),
        ({"dp.unit": "person"}, "dp.unit"),
        ({"dp.unit": "user", "dp.engine": "opacus"}, "dp.engine"),
        ({"dp.unit": "user", "task": "vae"}, "dp.unit"),
        ({"max-sites-per-person": -1}, "max-sites-per-person"),
    ],
)
def test_bad_user_level_settings_are_refused_in_one_line_naming_the_key(flat, key):
    with pytest.raises(ConfigError) as err:
        RunConfig.from_flat({"metrics.dp": False, **flat})
    assert err.value.key == key
    assert len(str(err.value).splitlines()) == 1


def test_delta_at_or_above_one_over_users_is_refused_naming_dp_delta():
    users = 40
    with pytest.raises(ConfigError, match=r"1/n = .*n=40 persons") as err:
        plan_round(make_cfg(**{**_USER_RECSYS, "dp.delta": 1 / users}), users)
    assert err.value.key == "dp.delta"
    plan_round(make_cfg(**{**_USER_RECSYS, "dp.delta": 0.5 / users}), users)  # below 1/users: fine


def test_a_site_without_a_person_key_refuses_user_level_dp():
    cfg = make_cfg(**_USER_RECSYS)
    task = get_task("recsys")(cfg, KEY)
    train = task.site_data(0)[0]
    with pytest.raises(ConfigError) as err:
        task.unit_count(ArrayData(train.x, train.y))  # no person column
    assert err.value.key == "dp.unit"


def test_the_opacus_engine_refuses_person_groups_rather_than_clip_per_example():
    model = BiasedMF(3, 4, RecsysConfig(dim=2))
    eng = OpacusDPStep(model, torch.optim.SGD(model.parameters(), lr=0.0), _plan(3, 1.0))
    x = torch.tensor([[0, 1], [0, 2], [1, 3]])
    with pytest.raises(ConfigError) as err:
        eng.step((model(x) - 3.0).pow(2), PersonGroups.from_sorted(x[:, 0], 2))
    assert err.value.key == "dp.engine"
    eng.close()


def test_under_user_level_dp_the_user_table_trains_on_its_exact_gradient_and_only_shared_tables_get_noise():
    """Joint DP: the user table stays at the site, so it is not noised; a user's row moves only
    when that user's own ratings are in the step. Under record-level DP it is noised like the rest."""
    cfg = make_cfg(**{**_USER_RECSYS, "dp.noise-multiplier": 50.0, "train.optimizer": "sgd", "train.lr": 0.1})
    task = get_task("recsys")(cfg, KEY)
    train = task.site_data(0)[0]
    plan = plan_round(cfg, task.unit_count(train))
    plan = RoundPlan(plan.dataset_size, 0.05, 1, 50.0, 1.0, plan.delta, "rdp")  # one step, few users
    torch.manual_seed(0)
    model = task.build_model(0)
    before = copy.deepcopy(model.state_dict())
    run_local_round(task, model, train, plan, torch.device("cpu"), seed=5)
    after = model.state_dict()
    moved_users = (after["user_bias.weight"] != before["user_bias.weight"]).squeeze(1)
    assert 0 < int(moved_users.sum()) < 0.5 * len(moved_users)  # only the sampled users' rows
    assert float((after["user_bias.weight"] - before["user_bias.weight"]).abs().max()) < 5.0  # no sigma=50 noise
    assert float((after["item_bias.weight"] - before["item_bias.weight"]).abs().max()) > 5.0  # the shared table's noise
    record = make_cfg(**{**_USER_RECSYS, "dp.unit": "record", "train.optimizer": "sgd", "train.lr": 0.1})
    rtask = get_task("recsys")(record, KEY)
    torch.manual_seed(0)
    rmodel = rtask.build_model(0)
    rplan = RoundPlan(len(train), 0.01, 1, 50.0, 1.0, plan.delta, "rdp")
    run_local_round(rtask, rmodel, train, rplan, torch.device("cpu"), seed=5)
    assert bool((rmodel.state_dict()["user_bias.weight"] != before["user_bias.weight"]).all())  # noised everywhere


def _row(site: str, eps: float, delta: float, unit: str = "user"):
    from server.ledger import LedgerRow

    return LedgerRow(
        1, 1, site, unit, 190, 0.3, 1.0, 2.0, 3, delta, "rdp", "add-remove", eps, eps, 8.0, True, "trained",
        "os", "", "dp-sgd", "", "", "",
    )  # fmt: skip


@pytest.mark.parametrize(("declared", "k", "eps", "delta"), [(0, 3, 6.0 + 5.0 + 1.0, 3e-5), (2, 2, 11.0, 2e-5)])
def test_the_report_shows_a_persons_worst_case_over_the_declared_sites(tmp_path, declared, k, eps, delta):
    """A person present at k sites: basic composition of the k largest site epsilons (k = the
    declared max-sites-per-person, else every site); nothing for a record-level run."""
    from server.report import Summary

    rows = {s: _row(s, e, 1e-5) for s, e in (("a", 6.0), ("b", 1.0), ("c", 5.0))}
    summary = Summary(tmp_path, 3, {}, rows, {}, True, 9, "", "rmse", False, max_sites_per_person=declared)
    assert summary.person_worst_case() == (k, pytest.approx(eps), pytest.approx(delta))
    line = next(x for x in summary.headline() if x.startswith("per person"))
    assert f"ε ≤ {eps:.3f}" in line and ("declared max-sites-per-person" in line) == bool(declared)
    record = Summary(tmp_path, 3, {}, {"a": _row("a", 6.0, 1e-5, "rating")}, {}, True, 9, "", "rmse", False)
    assert record.person_worst_case() is None
    assert not any(x.startswith("per person") for x in record.headline())
