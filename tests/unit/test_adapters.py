"""Low-rank adapters (common.tasks.adapters, vae.adapter-rank): fewer coordinates for DP-SGD
to noise, the same starting model, exact clipping by both engines."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from common.data.arrays import ArrayData
from common.errors import ConfigError
from common.privacy.accounting import RoundPlan
from common.privacy.engines import FastDPStep, OpacusDPStep
from common.tasks import get_task
from common.tasks.adapters import LowRankAdapter, add_adapters
from tests.conftest import make_cfg


def _vae_task(rank: int):
    return get_task("vae")(make_cfg(**{"vae.adapter-rank": rank, "vae.hidden-dim": 64}))


def _trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_adapters_train_a_few_directions_and_start_at_the_base_model():
    torch.manual_seed(0)
    full = _vae_task(0).build_model()
    torch.manual_seed(0)
    adapted = _vae_task(4).build_model()
    # 8 linear layers; rank 4 trains A (4 x in) and B (out x 4, + bias) of each.
    layers = [m for m in full.modules() if isinstance(m, nn.Linear)]
    assert _trainable(adapted) == sum(4 * (m.in_features + m.out_features) + m.out_features for m in layers)
    assert _trainable(adapted) < _trainable(full) / 4
    assert all(isinstance(m, LowRankAdapter) for m in (adapted.mu, adapted.logvar, adapted.decoder[-1]))
    bases = [m.base for m in adapted.modules() if isinstance(m, LowRankAdapter)]
    assert len(bases) == len(layers) and not any(p.requires_grad for b in bases for p in b.parameters())
    x = torch.rand(5, 64)
    with torch.no_grad():  # B = 0: the adapted model is the base model until it trains
        assert torch.equal(full.encode(x)[0], adapted.encode(x)[0])
        assert torch.equal(full.decoder(torch.ones(2, 8)), adapted.decoder(torch.ones(2, 8)))


def test_rank_zero_leaves_the_model_alone():
    m = nn.Sequential(nn.Linear(3, 3))
    assert add_adapters(m, 0) is m and isinstance(m[0], nn.Linear)


def _grads(engine_cls, model, loss, n):
    m = copy.deepcopy(model)
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.0)
    plan = RoundPlan(
        dataset_size=n, sample_rate=1.0, steps=1, noise_multiplier=0.0, max_grad_norm=1.0, delta=1e-5, accountant="rdp"
    )
    eng = engine_cls(m, opt, plan)
    eng.step(loss(m))
    out = {k: p.grad.detach().clone() for k, p in m.named_parameters() if p.requires_grad}
    frozen = {k: p.grad for k, p in m.named_parameters() if not p.requires_grad}
    eng.close()
    return out, frozen


def test_fast_engine_clips_the_adapted_vae_as_opacus_does_and_leaves_the_base_alone():
    task = _vae_task(4)
    data = task.site_data(0)[0]
    batch = ArrayData(data.x[:32], None)
    torch.manual_seed(0)
    model = task.build_model()

    def loss(m):
        torch.manual_seed(5)  # the same reparameterisation noise for both engines
        return task.per_sample_loss(m, batch)

    fast, fast_frozen = _grads(FastDPStep, model, loss, len(batch))
    ref, _ = _grads(OpacusDPStep, model, loss, len(batch))
    assert fast.keys() == ref.keys() and all(".A." in k or ".B." in k for k in fast)
    for k in fast:
        assert torch.allclose(fast[k], ref[k], rtol=1e-4, atol=1e-6), k
    assert all(g is None for g in fast_frozen.values())  # no gradient, so no update, on the base


@pytest.mark.parametrize("rank", [-1, 65])
def test_a_rank_out_of_range_is_refused_naming_the_key(rank):
    with pytest.raises(ConfigError, match=r"vae\.adapter-rank") as e:
        make_cfg(**{"vae.adapter-rank": rank})
    assert "\n" not in str(e.value)


def test_sample_grids_are_captioned_with_the_privacy_claim():
    """Issue 24: the sample grid says under which ε, δ, unit, relation and accountant it was made."""
    rows = [_row("a", 7.99, 1e-5), _row("b", 8.0, 5e-6), _row("b", 8.3, 5e-6, mechanism="gaussian-metrics")]
    caption = _caption(rows, {"a": 7.99, "b": 8.3}, rnd=30)
    assert caption == "round 30: ε ≤ 8.3 per site, δ ≤ 1e-05\nunit: one image (add-remove), RDP accountant"
    assert _caption([_row("a", float("inf"), 0.0, accountant="none")], {}, rnd=3) == "round 3: no DP (ε = ∞)"


def test_the_server_refuses_an_update_that_moves_a_frozen_layer_and_zeroes_it_in_aggregates():
    """Hostile review (issue 24): the frozen adapter base is federated; one site's small delta
    on it passed every check, entered FedAvg and stayed for good (honest sites never train it
    back; under SecAgg+ nobody could see it). Now refused by name, and zeroed in any aggregate."""
    from common.pipeline import build_pipeline
    from common.pipeline.base import Aggregate, ServerContext
    from common.tasks.base import get_state

    task = _vae_task(4)
    model = task.build_model()
    keys = task.shared_keys(model)
    indices, names = task.frozen_entries()
    assert names and all(".base." in k for k in names) and [keys[i] for i in indices] == list(names)
    pipeline = build_pipeline(task.cfg, task)
    global_arrays = get_state(model, keys)
    honest = [np.zeros_like(a) for a in global_arrays]
    ctx = ServerContext(1, global_arrays)
    assert pipeline.check(honest, 100, 100, ctx) == ""
    poisoned = [a.copy() for a in honest]
    poisoned[indices[0]][...] = 1e-3  # small, finite, within any norm bound
    reason = pipeline.check(poisoned, 100, 100, ctx)
    assert names[0] in reason and "never trains" in reason
    stage = pipeline.get("frozen_entries")
    released = stage.release(Aggregate([a + 1.0 for a in honest]), ctx)  # e.g. a SecAgg+ sum, or noise
    assert all((released.arrays[i] == 0).all() for i in indices)
    trained = [i for i in range(len(keys)) if i not in indices]
    assert all((released.arrays[i] == 1.0).all() for i in trained)


def test_a_model_without_frozen_layers_gets_no_frozen_stage():
    from common.pipeline import build_pipeline

    task = _vae_task(0)
    assert task.frozen_entries() == ((), ()) and "frozen_entries" not in build_pipeline(task.cfg, task).names


def _caption(rows, spent, rnd=5):
    from types import SimpleNamespace

    from server.recorder import RunRecorder

    ledger = SimpleNamespace(rows=lambda: rows, spent=lambda: spent)
    fake = SimpleNamespace(ledger=ledger, task=SimpleNamespace(privacy_unit="image"))
    fake._eps_max = lambda: RunRecorder._eps_max(fake)  # type: ignore[attr-defined]
    return RunRecorder.sample_caption(fake, rnd)  # type: ignore[arg-type]


def _row(site, eps, delta, accountant="rdp", mechanism="dp-sgd"):
    from types import SimpleNamespace

    return SimpleNamespace(
        site_id=site, eps_total=eps, delta=delta, accountant=accountant, neighbouring="add-remove", mechanism=mechanism
    )


def test_the_caption_never_claims_less_than_the_ledger_spent():
    """Hostile review (issue 24): "ε ≤ {:.2f}" and "δ ≤ {:.0e}" rounded to nearest, so ε 1.004
    was captioned "ε ≤ 1.00" and δ 1.4e-5 "δ ≤ 1e-05". Bounds round up."""
    import re

    caption = _caption([_row("a", 1.004, 1.4e-5)], {"a": 1.004})
    eps = float(re.search(r"ε ≤ ([0-9.]+)", caption).group(1))  # type: ignore[union-attr]
    delta = float(re.search(r"δ ≤ ([0-9.e+-]+)", caption).group(1))  # type: ignore[union-attr]
    assert eps >= 1.004 and delta >= 1.4e-5, caption


def test_a_client_level_dp_run_is_captioned_with_its_site_level_claim():
    """Hostile review (issue 24): with client-level DP only, the grid said "no DP (ε = ∞)"."""
    from common.identifiers import CENTRAL_SITE_ID

    caption = _caption([_row(CENTRAL_SITE_ID, 2.0, 1e-3, mechanism="client-level")], {CENTRAL_SITE_ID: 2.0})
    assert "no DP" not in caption and "site-level ε ≤ 2" in caption and "δ ≤ 0.001" in caption
