"""Review of train.keep-optimizer-state (branch i25-mfopt): what the kept state must never do.

* A non-finite kept state (one divergent round, or a damaged state file) must not be kept
  nor loaded: with the flag on it otherwise poisons every later round of the run (each
  update NaN, refused by the server's update checks, while each round still spends epsilon),
  where without the flag the next round simply starts again from the global model.
* A state kept under one setting must not be silently reused after the flag was off or the
  optimiser was SGD (the docs: flag off keeps nothing; SGD has no state).
* A damaged optimizer field in the site's state file is refused with the file's own message.
"""

from __future__ import annotations

import math

import pytest
import torch

from client.state import SiteState, load_state, save_state, state_path
from common.errors import PrivfedError
from common.privacy.training import load_optimizer_state, make_optimizer
from tests.unit.test_keep_optimizer_state import KEEP, _model, _params, _round, _site, _task

RUN = "run-1"


def _finite(state: dict[str, torch.Tensor] | None) -> bool:
    return state is None or all(bool(torch.isfinite(v).all()) for v in state.values())


# ------------------------------------------------------------------ non-finite state


def test_a_divergent_round_keeps_no_non_finite_state():
    """A round that diverges (here an absurd train.lr, which the coordinator's config sets)
    must not hand a NaN state to the next round."""
    task = _task(**KEEP, **{"train.lr": 1e20})
    out = _round(task, _model(task))
    assert _finite(out.optimizer_state)


def test_a_non_finite_or_impossible_state_is_not_loaded():
    task = _task(**KEEP)
    state = _round(task, _model(task)).optimizer_state
    assert state is not None
    nan = {k: (torch.full_like(v, math.nan) if k.endswith("/exp_avg") else v) for k, v in state.items()}
    negative_v = {k: (-v - 1 if k.endswith("/exp_avg_sq") else v) for k, v in state.items()}
    negative_step = {k: (torch.tensor(-1.0) if k.endswith("/step") else v) for k, v in state.items()}
    for bad in (nan, negative_v, negative_step):
        m = _model(task)
        opt = make_optimizer(m, "adam", 0.01)
        assert not load_optimizer_state(opt, m, bad)
        assert len(opt.state) == 0


def test_a_nan_kept_state_does_not_poison_the_next_rounds():
    task = _task(**KEEP)
    state = _round(task, _model(task)).optimizer_state
    assert state is not None
    nan = {k: (torch.full_like(v, math.nan) if k.endswith("/exp_avg") else v) for k, v in state.items()}
    model = _model(task)
    out = _round(task, model, nan, seed=2)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())  # the update leaves finite
    assert _finite(out.optimizer_state)  # and the NaN is not carried on


def test_a_site_whose_state_file_holds_nan_moments_still_sends_a_finite_update(tmp_path):
    site = _site(tmp_path, **KEEP)
    params = _params(site)
    site.fit(params, {"server-round": 1, "run-id": RUN})
    path = state_path(tmp_path, RUN, "site-1")
    saved = load_state(path)
    assert saved is not None and saved.optimizer
    bad = {k: (torch.full_like(v, math.nan) if k.endswith("/exp_avg") else v) for k, v in saved.optimizer.items()}
    save_state(path, SiteState(saved.history, saved.local, saved.metrics, bad))
    again = _site(tmp_path, **KEEP)
    update, _, _ = again.fit(params, {"server-round": 2, "run-id": RUN})
    assert all(bool(torch.isfinite(torch.as_tensor(u)).all()) for u in update)
    after = load_state(path)
    assert after is not None and _finite(after.optimizer)


# ------------------------------------------------------------------ stale state


def test_turning_the_flag_off_drops_the_kept_state(tmp_path):
    from client.app import OPTIMIZER_STATE_KEY

    params = _params(_site(tmp_path, **KEEP))
    _site(tmp_path, **KEEP).fit(params, {"server-round": 1, "run-id": RUN})
    off = _site(tmp_path)
    off.fit(params, {"server-round": 2, "run-id": RUN})
    assert OPTIMIZER_STATE_KEY not in off.ctx.state.array_records  # flag off keeps nothing ...
    saved = load_state(state_path(tmp_path, RUN, "site-1"))
    assert saved is not None and saved.optimizer == {}  # ... on disk either
    on = _site(tmp_path, **KEEP)
    _, _, metrics = on.fit(params, {"server-round": 3, "run-id": RUN})
    kept = on.ctx.state.array_records[OPTIMIZER_STATE_KEY].to_torch_state_dict()
    assert kept["item_bias.weight/step"].item() == metrics["steps"]  # a fresh Adam, not round 1's


def test_sgd_neither_loads_nor_keeps_adams_state(tmp_path):
    task = _task(**KEEP)
    state = _round(task, _model(task)).optimizer_state
    assert state is not None
    m = _model(task)
    sgd = make_optimizer(m, "sgd", 0.01)
    assert not load_optimizer_state(sgd, m, state)
    assert len(sgd.state) == 0
    params = _params(_site(tmp_path, **KEEP))
    _site(tmp_path, **KEEP).fit(params, {"server-round": 1, "run-id": RUN})
    _site(tmp_path, **KEEP, **{"train.optimizer": "sgd"}).fit(params, {"server-round": 2, "run-id": RUN})
    saved = load_state(state_path(tmp_path, RUN, "site-1"))
    assert saved is not None and saved.optimizer == {}


# ------------------------------------------------------------------ damaged file


@pytest.mark.parametrize("field", ["optimizer", "local"])
def test_a_damaged_tensor_field_is_refused_by_load_state(tmp_path, field):
    path = tmp_path / RUN / "site-1.pt"
    path.parent.mkdir()
    payload = {"history": [[1, 1.5, 0.1, 8]], "local": {}, "metrics": [], "optimizer": {}}
    payload[field] = {"item_bias.weight/exp_avg": [1.0, 2.0]}
    torch.save(payload, path)
    with pytest.raises(PrivfedError, match="cannot be read"):
        load_state(path)
