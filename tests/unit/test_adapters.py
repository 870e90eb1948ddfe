"""Low-rank adapters (common.tasks.adapters, vae.adapter-rank): fewer coordinates for DP-SGD
to noise, the same starting model, exact clipping by both engines."""

from __future__ import annotations

import copy

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
    from types import SimpleNamespace

    from server.recorder import RunRecorder

    def row(site, eps, delta, accountant="rdp", mechanism="dp-sgd"):
        return SimpleNamespace(
            site_id=site,
            eps_total=eps,
            delta=delta,
            accountant=accountant,
            neighbouring="add-remove",
            mechanism=mechanism,
        )

    rows = [row("a", 7.99, 1e-5), row("b", 8.0, 5e-6), row("b", 8.3, 5e-6, mechanism="gaussian-metrics")]
    ledger = SimpleNamespace(rows=lambda: rows, spent=lambda: {"a": 7.99, "b": 8.3})
    fake = SimpleNamespace(ledger=ledger, task=SimpleNamespace(privacy_unit="image"))
    fake._eps_max = lambda: RunRecorder._eps_max(fake)  # type: ignore[attr-defined]
    caption = RunRecorder.sample_caption(fake, 30)  # type: ignore[arg-type]
    assert caption == "round 30: ε ≤ 8.30 per site, δ ≤ 1e-05\nunit: one image (add-remove), RDP accountant"
    ledger.rows = lambda: [row("a", float("inf"), 0.0, accountant="none")]
    assert RunRecorder.sample_caption(fake, 3) == "round 3: no DP (ε = ∞)"  # type: ignore[arg-type]
