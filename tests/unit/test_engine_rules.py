"""What each DP engine accepts: only parameters it clips, every use of them seen, every task.

Finding 9 of issue 18: an extra parameter on a Linear got an uninitialised "clipped"
gradient, a functional use of a layer's weight lost its gradient silently, and the Opacus
engine crashed on the GAN.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common.data.arrays import ArrayData
from common.errors import ConfigError
from common.privacy.accounting import RoundPlan
from common.privacy.engines import ENGINES, FastDPStep, OpacusDPStep
from common.privacy.engines.rules import RULES
from common.privacy.engines.rules.linear import LinearRule
from common.privacy.plan import plan_round
from common.privacy.training import run_local_round
from common.tasks import get_task
from tests.conftest import make_cfg

ENGINE_CLASSES = [FastDPStep, OpacusDPStep]


def _plan(n: int, C: float = 1.0, q: float = 1.0) -> RoundPlan:
    return RoundPlan(
        dataset_size=n, sample_rate=q, steps=1, noise_multiplier=0.0, max_grad_norm=C, delta=1e-5, accountant="rdp"
    )


class _ScaledOut(nn.Module):
    """A Linear with an extra trainable parameter that its per-example rule knows nothing of."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 2)
        self.lin.scale = nn.Parameter(torch.ones(2))

    def forward(self, x):
        return self.lin(x) * self.lin.scale


@pytest.mark.parametrize("engine", ENGINE_CLASSES)
def test_an_extra_parameter_on_a_layer_is_refused_in_one_line_naming_it(engine):
    model = _ScaledOut()
    with pytest.raises(ConfigError, match=r"dp.engine.*lin\.scale is another trainable parameter") as err:
        engine(model, torch.optim.SGD(model.parameters(), lr=0.0), _plan(8))
    assert len(str(err.value).splitlines()) == 1
    model.lin.scale.requires_grad_(False)  # frozen, it is a constant: accepted
    engine(model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0), _plan(8)).close()


def test_gradient_buffers_start_at_zero_not_at_old_memory(monkeypatch):
    """A coordinate no rule writes is 0 in the release (plus noise), never stale memory."""
    model = nn.Sequential(nn.Linear(4, 3))
    eng = FastDPStep(model, torch.optim.SGD(model.parameters(), lr=0.0), _plan(5))
    empty = torch.empty

    def poisoned_empty(*args, **kwargs):  # what "uninitialised" may hold
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    def weight_only(self, module, a, g, scale, out):  # a rule that writes only the weight
        torch.mm((g * scale.unsqueeze(1)).t(), a, out=out[module.weight])

    monkeypatch.setattr(torch, "empty", poisoned_empty)
    monkeypatch.setattr(LinearRule, "write_grad", weight_only)
    eng.step(model(torch.randn(5, 4)).pow(2).sum(1))
    eng.close()
    assert torch.equal(model[0].bias.grad, torch.zeros(3))
    assert torch.isfinite(model[0].weight.grad).all()


class _Tied(nn.Module):
    """Weight tying: the embedding table is also the output layer, used functionally."""

    def __init__(self, functional: bool):
        super().__init__()
        self.functional = functional
        self.emb = nn.Embedding(6, 4)
        self.lin = nn.Linear(4, 4)
        self.out = nn.Linear(4, 6)

    def forward(self, idx):
        h = torch.tanh(self.lin(self.emb(idx)))
        return F.linear(h, self.emb.weight) if self.functional else self.out(h)


@pytest.mark.parametrize("engine", ENGINE_CLASSES)
def test_a_parameter_used_outside_its_layer_is_refused_not_dropped(engine):
    torch.manual_seed(0)
    idx = torch.tensor([0, 1, 2, 4])
    for functional in (False, True):
        model = _Tied(functional)
        params = [p for p in model.parameters() if p.requires_grad]
        if functional:
            model.out.requires_grad_(False)  # unused: only the tied table is the output layer
            params = [p for p in model.parameters() if p.requires_grad]
        eng = engine(model, torch.optim.SGD(params, lr=0.0), _plan(len(idx), C=100.0))
        loss = model(idx).pow(2).sum(1)
        if functional:
            with pytest.raises(RuntimeError, match=r"emb\.weight is used outside its (layer|module)'s forward") as err:
                eng.step(loss)
            assert len(str(err.value).splitlines()) == 1
        else:
            eng.step(loss)  # the same layers, each used through its own forward: fine
        eng.close()


def test_opacus_refuses_a_training_mode_forward_that_misses_the_loss():
    """Opacus pairs stored inputs with backward calls by order; a stray one would mispair."""
    model = nn.Sequential(nn.Linear(4, 2))
    eng = OpacusDPStep(model, torch.optim.SGD(model.parameters(), lr=0.0), _plan(3))
    model(torch.randn(3, 4))  # training mode, grad enabled, never backpropagated
    with pytest.raises(RuntimeError, match="without its output reaching the DP loss"):
        eng.step(model(torch.randn(3, 4)).pow(2).sum(1))
    eng.close()


# Each layer type the fast engine has a rule for: a model using it, and a batch of inputs.
_BUILDERS = {
    nn.Linear: (lambda: nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)), lambda: torch.randn(12, 6) * 3),
    nn.Embedding: (lambda: nn.Sequential(nn.Embedding(7, 3)), lambda: torch.randint(0, 7, (12,))),
}


def test_every_rule_has_an_agreement_case():
    assert set(_BUILDERS) == set(RULES)


@pytest.mark.parametrize("layer", list(_BUILDERS), ids=lambda t: t.__name__)
def test_fast_and_opacus_agree_on_clipped_gradients_per_layer_type(layer):
    build, inputs = _BUILDERS[layer]
    torch.manual_seed(0)
    model, x = build(), inputs()
    grads = {}
    for engine in ENGINE_CLASSES:
        m = copy.deepcopy(model)
        eng = engine(m, torch.optim.SGD(m.parameters(), lr=0.0), _plan(len(x), C=0.3))
        eng.step(m(x).pow(2).sum(1))
        grads[engine] = [p.grad.clone() for p in m.parameters()]
        eng.close()
    for a, b in zip(grads[FastDPStep], grads[OpacusDPStep]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    # clipping was active, or agreement proves little
    full = copy.deepcopy(model)
    full(x).pow(2).sum().backward()
    assert sum(float(p.grad.norm()) ** 2 for p in full.parameters()) ** 0.5 > 0.3


_RECSYS = {
    "data.source": "synthetic",
    "data.partition": "region",
    "recsys.synthetic-users": 150,
    "recsys.synthetic-items": 60,
    "recsys.synthetic-ratings-per-user": 20,
    "recsys.num-buckets": 4096,
    "recsys.min-group-size": 5,
}
_TASKS = {
    "vae": ({}, None),
    "gan": ({"gan.features": 256, "gan.hidden-dim": 32}, None),
    "recsys": (_RECSYS, bytes(range(32))),
}


@pytest.mark.parametrize("engine", sorted(ENGINES))
@pytest.mark.parametrize("task_name", sorted(_TASKS))
def test_every_engine_trains_every_task(task_name, engine):
    """dp.engine = opacus is the documented fallback: it must run a round of each task
    (the GAN's extra discriminator passes on generated images crashed it)."""
    extra, key = _TASKS[task_name]
    cfg = make_cfg(task=task_name, **{"num-sites": 3, "dp.engine": engine, "dp.noise-multiplier": 1.0, **extra})
    task = get_task(task_name)(cfg, key) if key else get_task(task_name)(cfg)
    train = task.site_data(0)[0]
    train = ArrayData(train.x[:200], None if train.y is None else train.y[:200])
    torch.manual_seed(0)
    model = task.build_model(0)
    before = copy.deepcopy(model.state_dict())
    plan = plan_round(cfg, len(train))
    out = run_local_round(task, model, train, plan, torch.device("cpu"), seed=3)
    assert out.steps_taken == plan.steps > 0
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
