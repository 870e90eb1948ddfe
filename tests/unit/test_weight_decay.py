"""train.weight-decay: decoupled decay after each DP step, a fixed map of the released weights."""

from __future__ import annotations

import math

import pytest
import torch

from common.errors import ConfigError
from common.privacy.training import load_optimizer_state, make_optimizer
from tests.conftest import make_cfg
from tests.unit.test_keep_optimizer_state import KEEP, _model, _round, _task


@pytest.mark.parametrize("bad", [-0.1, math.nan, math.inf, 50.0, 100.0])
def test_a_decay_that_is_negative_not_finite_or_flips_the_sign_is_refused_naming_the_key(bad):
    # with train.lr = 0.02 a step multiplies by 1 - 0.02 x decay: 50 would zero every weight
    with pytest.raises(ConfigError, match=r"train\.weight-decay"):
        make_cfg(**{"train.lr": 0.02, "train.weight-decay": bad})


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


def test_the_decay_changes_neither_the_clipping_nor_the_noise():
    """One DP-SGD step with plain SGD from the same weights and seed: with decay the result is
    exactly the no-decay result minus lr x decay x the old weights, so the clipped, noised
    gradient the engine produced is the same (the decay reads only the released weights)."""
    lr, wd = 0.05, 0.8
    common = {"train.optimizer": "sgd", "train.lr": lr, "train.local-epochs": 0.01}
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


def test_an_adam_state_kept_before_the_decay_was_turned_on_still_loads():
    task = _task(**KEEP)
    model = _model(task)
    state = _round(task, model).optimizer_state
    assert state is not None
    opt = make_optimizer(model, "adam", 0.01, weight_decay=0.1)
    assert isinstance(opt, torch.optim.AdamW)
    assert load_optimizer_state(opt, model, state)
    assert len(opt.state) == len(list(model.parameters()))
