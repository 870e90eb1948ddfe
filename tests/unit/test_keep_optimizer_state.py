"""train.keep-optimizer-state: a site's Adam state carried from round to round, never sent."""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch

from client.state import SiteState, load_state, save_state
from common.errors import ConfigError
from common.privacy.plan import plan_round
from common.privacy.training import load_optimizer_state, make_optimizer, optimizer_state, run_local_round
from common.tasks import get_task
from common.tasks.base import get_state
from tests.conftest import declared, make_cfg
from tests.unit.test_recsys import KEY
from tests.unit.test_recsys import SMALL as RECSYS_SMALL

# test_recsys's small synthetic federation, plus a fixed noise multiplier and 3 rounds.
SMALL = {**RECSYS_SMALL, "rounds": 3, "dp.noise-multiplier": 1.0, "train.batch-size": 64}
KEEP = {"train.keep-optimizer-state": True}
CPU = torch.device("cpu")


def _task(**kw):
    return get_task("recsys")(make_cfg(**{**SMALL, **kw}), KEY)


def _round(task, model, state=None, seed=1, lr_scale=1.0):
    train = task.site_data(0)[0]
    return run_local_round(task, model, train, plan_round(task.cfg, len(train)), CPU, seed, lr_scale, state)


def _model(task, like=None):
    torch.manual_seed(0)
    model = task.build_model(0)
    if like is not None:  # a trained model holds non-leaf caches, so it cannot be deep-copied
        model.load_state_dict(like.state_dict())
    return model


def test_the_flag_is_a_train_key_off_by_default():
    assert make_cfg().train.keep_optimizer_state is False
    assert make_cfg(**KEEP).train.keep_optimizer_state is True
    with pytest.raises(ConfigError, match="train.keep-optimizer-stat"):
        make_cfg(**{"train.keep-optimizer-stat": True})  # a mistyped key is named, not ignored


def test_adams_step_count_continues_across_rounds():
    task = _task(**KEEP)
    model = _model(task)
    first = _round(task, model)
    state = first.optimizer_state
    assert state is not None
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {k.rpartition("/")[0] for k in state} == names
    assert {k.rpartition("/")[2] for k in state} == {"step", "exp_avg", "exp_avg_sq"}
    assert all(v.device.type == "cpu" for v in state.values())
    assert state["item_bias.weight/step"].item() == first.steps_taken > 0
    second = _round(task, model, state, seed=2)
    assert second.optimizer_state is not None
    assert second.optimizer_state["item_bias.weight/step"].item() == first.steps_taken + second.steps_taken
    # the input is not mutated in place (the caller's copy stays the previous round's)
    assert state["item_bias.weight/step"].item() == first.steps_taken


def test_the_new_rounds_lr_is_used_not_the_saved_one():
    task = _task(**KEEP)
    model = _model(task)
    state = _round(task, model).optimizer_state
    assert state is not None and not any("lr" in k for k in state)  # per-parameter state only
    fresh = make_optimizer(model, "adam", 0.123)
    assert load_optimizer_state(fresh, model, state)
    assert [g["lr"] for g in fresh.param_groups] == [0.123]
    moved = []
    for scale in (1.0, 1e-4):
        m = _model(task, like=model)
        _round(task, m, state, seed=2, lr_scale=scale)
        moved.append((m.item_bias.weight - model.item_bias.weight).abs().max().item())
    assert moved[1] < moved[0] * 0.01


def test_a_state_that_does_not_fit_the_model_is_dropped():
    small, wide = _task(**KEEP), _task(**KEEP, **{"recsys.dim": 3})
    state = _round(small, _model(small)).optimizer_state
    assert state is not None
    model = _model(wide)
    opt = make_optimizer(model, "adam", 0.01)
    assert not load_optimizer_state(opt, model, state)  # factor tables of another shape
    assert len(opt.state) == 0
    renamed = {k.replace("item_bias", "item_offset"): v for k, v in state.items()}
    missing = {k: v for k, v in state.items() if not k.endswith("/exp_avg_sq")}
    for bad in (renamed, missing):
        m = _model(small)
        opt = make_optimizer(m, "adam", 0.01)
        assert not load_optimizer_state(opt, m, bad)
        assert len(opt.state) == 0
    # the round then starts fresh: the step count is this round's alone
    out = _round(wide, model, state)
    assert out.optimizer_state is not None
    assert out.optimizer_state["item_bias.weight/step"].item() == out.steps_taken


def test_flag_off_is_the_previous_behaviour_bit_for_bit():
    off = _task()
    on = _task(**KEEP)
    base = _model(off)
    state = _round(on, copy.deepcopy(base)).optimizer_state
    a, b, c = (copy.deepcopy(base) for _ in range(3))
    out_a = _round(off, a)
    out_b = _round(off, b, state)  # a state handed in with the flag off is ignored
    _round(on, c)  # the first round with the flag on: a fresh Adam, as before
    assert out_a.optimizer_state is None and out_b.optimizer_state is None
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        assert torch.equal(pa, pc), name


def test_sgd_has_no_state_to_keep():
    task = _task(**KEEP, **{"train.optimizer": "sgd"})
    assert _round(task, _model(task)).optimizer_state == {}


def _site(state_dir="", **kw):
    from flwr.app import Context, RecordDict

    from client.app import SiteClient

    cfg = make_cfg(**{**SMALL, "dp.secure-rng": False, **kw})
    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 1}, state=RecordDict(), run_config={})
    return SiteClient(cfg, 1, "site-1", ctx, KEY, state_dir=str(state_dir), declared=declared(cfg, 1, KEY))


def _params(site):
    model = site.task.build_model()
    return get_state(model, site.task.shared_keys(model))


def test_the_site_keeps_it_on_its_own_disk_and_never_sends_it(tmp_path):
    from client.app import OPTIMIZER_STATE_KEY
    from client.state import state_path

    site = _site(tmp_path, **KEEP)
    params = _params(site)
    update, _, metrics = site.fit(params, {"server-round": 1, "run-id": "run-1"})
    assert [u.shape for u in update] == [p.shape for p in params]  # only the shared arrays travel
    assert not any("optim" in k or "exp_avg" in k or k.endswith("/step") for k in metrics)
    kept = site.ctx.state.array_records[OPTIMIZER_STATE_KEY].to_torch_state_dict()
    steps = metrics["steps"]
    assert kept["item_bias.weight/step"].item() == steps
    path = state_path(tmp_path, "run-1", "site-1")
    assert (os.stat(path).st_mode & 0o777) == 0o600
    on_disk = load_state(path)
    assert on_disk is not None and set(on_disk.optimizer) == set(kept)
    # a restarted site (fresh node state, same state-dir) carries on from its file
    again = _site(tmp_path, **KEEP)
    _, _, m2 = again.fit(params, {"server-round": 2, "run-id": "run-1"})
    after = again.ctx.state.array_records[OPTIMIZER_STATE_KEY].to_torch_state_dict()
    assert after["item_bias.weight/step"].item() == steps + m2["steps"]


def test_flag_off_keeps_nothing(tmp_path):
    from client.app import OPTIMIZER_STATE_KEY
    from client.state import state_path

    site = _site(tmp_path)
    site.fit(_params(site), {"server-round": 1, "run-id": "run-1"})
    assert OPTIMIZER_STATE_KEY not in site.ctx.state.array_records
    saved = load_state(state_path(tmp_path, "run-1", "site-1"))
    assert saved is not None and saved.optimizer == {}


def test_a_state_file_from_before_the_flag_loads(tmp_path):
    path = tmp_path / "run" / "site.pt"
    path.parent.mkdir()
    local = {"user_bias.weight": torch.ones(3, 1)}
    torch.save({"history": [[1, 1.5, 0.1, 8]], "local": local, "metrics": []}, path)
    old = load_state(path)
    assert old is not None and old.optimizer == {} and old.history == [(1, 1.5, 0.1, 8)]
    state = {"a.weight/step": torch.tensor(3.0), "a.weight/exp_avg": torch.zeros(2, 2)}
    save_state(path, SiteState(old.history, local, [], state))
    new = load_state(path)
    assert new is not None and set(new.optimizer) == set(state)
    assert np.array_equal(new.optimizer["a.weight/exp_avg"].numpy(), np.zeros((2, 2)))


def test_optimizer_state_reads_per_parameter_state_only():
    model = torch.nn.Linear(3, 2)
    opt = make_optimizer(model, "adam", 0.1)
    model(torch.ones(4, 3)).sum().backward()
    opt.step()
    state = optimizer_state(opt, model)
    assert set(state) == {f"{n}/{k}" for n in ("weight", "bias") for k in ("step", "exp_avg", "exp_avg_sq")}
    assert state["weight/exp_avg"].shape == (2, 3) and state["bias/step"].item() == 1.0


@pytest.mark.gpu
def test_the_kept_state_moves_between_cpu_and_cuda():
    task = _task(**KEEP)
    train = task.site_data(0)[0]
    plan = plan_round(task.cfg, len(train))
    model = _model(task)
    cuda = torch.device("cuda")
    first = run_local_round(task, model, train, plan, cuda, 1, 1.0, None)
    assert first.optimizer_state is not None
    assert all(v.device.type == "cpu" for v in first.optimizer_state.values())  # kept (and saved) on CPU
    second = run_local_round(task, model, train, plan, cuda, 2, 1.0, first.optimizer_state)
    assert second.optimizer_state is not None
    assert second.optimizer_state["item_bias.weight/step"].item() == first.steps_taken + second.steps_taken
