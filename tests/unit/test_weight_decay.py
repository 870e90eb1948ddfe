"""train.weight-decay: decoupled decay after each DP step, a fixed map of the released weights."""

from __future__ import annotations

import math

import pytest
import torch

from common.config.schema import TrainConfig
from common.errors import ConfigError
from common.privacy.plan import plan_round
from common.privacy.training import load_optimizer_state, make_optimizer, run_local_round
from tests.conftest import make_cfg
from tests.unit.test_gan import gan_task
from tests.unit.test_keep_optimizer_state import KEEP, _model, _round, _task


@pytest.mark.parametrize("bad", [-0.1, 50.0, 100.0])
def test_a_decay_that_is_negative_or_flips_the_sign_is_refused_naming_the_key(bad):
    # with train.lr = 0.02 a step multiplies by 1 - 0.02 x decay: 50 would zero every weight
    with pytest.raises(ConfigError, match=r"train\.weight-decay.*below 1 / train\.lr"):
        make_cfg(**{"train.lr": 0.02, "train.weight-decay": bad})


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_decay_that_is_not_finite_is_refused_by_the_check_itself(bad):
    # (the loader refuses these first; the check must hold for a config built in code too)
    with pytest.raises(ConfigError, match=r"train\.weight-decay"):
        TrainConfig(lr=0.02, weight_decay=bad).validate()


@pytest.mark.parametrize("lr", [0.3, 0.7, 0.03, 0.07, 0.11, 0.13, 0.17, 0.19, 0.23, 0.29, 0.31, 0.49])
def test_the_largest_accepted_decay_still_keeps_the_step_factor_positive(lr):
    wd = math.nextafter(1 / lr, 0)
    TrainConfig(lr=lr, weight_decay=wd).validate()  # accepted
    assert 1 - lr * wd > 0
    TrainConfig(lr=lr, weight_decay=0.5 / lr).validate()


def test_off_by_default_and_then_the_optimiser_is_the_plain_one():
    assert make_cfg().train.weight_decay == 0.0
    model = torch.nn.Linear(3, 2)
    assert type(make_optimizer(model, "adam", 0.1)) is torch.optim.Adam
    assert type(make_optimizer(model, "sgd", 0.1)) is torch.optim.SGD


@pytest.mark.parametrize("name", ["adam", "sgd"])
def test_a_step_multiplies_decayed_weights_by_one_minus_lr_times_decay_and_leaves_the_exempt(name):
    model = torch.nn.Linear(3, 2)
    w0, b0 = model.weight.detach().clone(), model.bias.detach().clone()
    opt = make_optimizer(model, name, 0.1, weight_decay=0.5, no_decay=[id(model.bias)])
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # no gradient: only the decay moves a weight
    opt.step()
    assert torch.allclose(model.weight, w0 * (1 - 0.1 * 0.5))
    assert torch.equal(model.bias, b0)


def test_the_recommender_exempts_the_global_mean_and_the_correction_table_only():
    task = _task(**{"recsys.correction": "group-offset"})
    model = task.build_model(0)
    exempt = {id(p) for p in task.no_decay_parameters(model)}
    names = {n for n, p in model.named_parameters() if id(p) in exempt}
    assert names == {"global_bias.weight", "group_item_bias.weight"}


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"dp.engine": "opacus"},
        {"dp.unit": "user", "train.batch-size": 16},  # the person-local tables' own optimiser too
        {"recsys.model": "neural"},  # exempt tables in the middle of the parameter order
    ],
    ids=["fast", "opacus", "user-level", "neural"],
)
def test_the_decay_changes_neither_the_clipping_nor_the_noise(extra):
    """One DP-SGD step with plain SGD from the same weights and seed: with decay the result is
    exactly the no-decay result minus lr x decay x the old weights, so every parameter got the
    same clipped, noised gradient (the decay reads only the released weights, and turning it
    on does not move noise between parameters)."""
    lr, wd = 0.05, 0.8
    common = {"train.optimizer": "sgd", "train.lr": lr, "train.local-epochs": 0.01, **extra}
    plain, decayed = _task(**common), _task(**common, **{"train.weight-decay": wd})
    start = _model(plain)
    a, b = _model(plain, like=start), _model(plain, like=start)
    out_a, out_b = _round(plain, a), _round(decayed, b)
    assert out_a.steps_taken == out_b.steps_taken == 1
    exempt = {id(p) for p in decayed.no_decay_parameters(b)}
    for (name, p0), pa, pb in zip(start.named_parameters(), a.parameters(), b.parameters()):
        expected = pa if id(pb) in exempt else pa - lr * wd * p0
        assert torch.allclose(pb, expected, atol=1e-6), name
        if id(pb) not in exempt and p0.abs().max() > 0:  # the bias tables start at 0
            assert not torch.equal(pb, pa), name  # the decay did act


def test_the_optimiser_lists_the_parameters_in_the_models_order():
    model = _task(**{"recsys.model": "neural"}).build_model(0)
    exempt = [id(model.global_bias.weight)]
    opt = make_optimizer(model, "adam", 0.01, weight_decay=0.1, no_decay=exempt)
    listed = [p for g in opt.param_groups for p in g["params"]]
    assert [id(p) for p in listed] == [id(p) for p in model.parameters()]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0, 0.1]


def test_a_kept_adamw_state_carries_across_rounds_for_decayed_and_exempt_tables():
    task = _task(**KEEP, **{"train.weight-decay": 0.5})
    model = _model(task)
    first = _round(task, model).optimizer_state
    assert first is not None
    second = _round(task, model, first, seed=2).optimizer_state
    assert second is not None
    for name in ("item_bias.weight", "global_bias.weight"):  # decayed, exempt
        assert second[f"{name}/step"].item() == 2 * first[f"{name}/step"].item()


def test_an_adam_state_kept_before_the_decay_was_turned_on_still_loads():
    task = _task(**KEEP)
    model = _model(task)
    state = _round(task, model).optimizer_state
    assert state is not None
    opt = make_optimizer(model, "adam", 0.01, weight_decay=0.1)
    assert isinstance(opt, torch.optim.AdamW)
    assert load_optimizer_state(opt, model, state)
    assert len(opt.state) == len(list(model.parameters()))


def test_the_gan_trains_its_discriminator_with_the_decay_and_its_generator_without():
    task = gan_task(**{"dp.noise-multiplier": 1.0, "train.weight-decay": 0.5})
    torch.manual_seed(0)
    model = task.build_model()
    train = task.site_data(0)[0]
    plan = plan_round(task.cfg, len(train))
    out = run_local_round(task, model, train, plan, torch.device("cpu"), seed=3)
    assert out.steps_taken == plan.steps > 0
    assert task.no_decay_parameters(model) == []  # the default: everything the DP step trains decays
