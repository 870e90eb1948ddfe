"""The GAN's privacy argument and DP plumbing (quality metrics come with the GAN scenarios)."""

from __future__ import annotations

import copy

import pytest
import torch
from opacus.validators import ModuleValidator

from common.data.arrays import ArrayData
from common.errors import ConfigError
from common.privacy.accounting import RoundPlan
from common.privacy.engines import FastDPStep, OpacusDPStep
from common.privacy.plan import plan_round
from common.privacy.training import run_local_round
from common.tasks import get_task
from tests.conftest import make_cfg


def gan_task(**kw):
    return get_task("gan")(make_cfg(task="gan", **{"num-sites": 3, "gan.features": 256, "gan.hidden-dim": 32, **kw}))


class _NoRealUpdates:
    """A session that hands out real batches but never lets them update D."""

    def __init__(self, data, batches=4, size=16):
        self.data, self.n, self.size = data, batches, size

    def batches(self):
        for i in range(self.n):
            idx = torch.arange(i * self.size, (i + 1) * self.size)
            yield ArrayData(self.data.x[idx], self.data.y[idx])

    def step(self, per_sample_loss):
        pass


@pytest.mark.parametrize("center", [0, 8])
def test_generator_training_does_not_depend_on_the_real_data_once_d_is_fixed(center):
    task = gan_task(**{"gan.center-samples": center})
    torch.manual_seed(0)
    model = task.build_model()
    real_a = task.site_data(0)[0]
    # a different "real" dataset: other images, other labels
    real_b = ArrayData(torch.rand_like(real_a.x), (real_a.y + 3) % 10)
    finals = []
    for data in (real_a, real_b):
        m = copy.deepcopy(model)
        torch.manual_seed(1)  # same latent noise and fake labels in both runs
        task.train(m, _NoRealUpdates(data))
        finals.append(m.state_dict())
    for key in finals[0]:
        assert torch.equal(finals[0][key], finals[1][key]), key
    # and the generator did train, so the equality is not vacuous
    assert not torch.equal(finals[0]["generator.net.0.weight"], model.state_dict()["generator.net.0.weight"])


@pytest.mark.parametrize("centred", [False, True])
def test_discriminator_is_dp_compatible_and_clipped_exactly(centred):
    task = gan_task()
    torch.manual_seed(0)
    model = task.build_model()
    D = task.private_module(model)
    assert ModuleValidator.validate(D, strict=False) == []
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in D.modules())
    with torch.no_grad():  # a non-trivial head so that gradients differ per example
        D.head.weight.normal_(0, 1)
        D.embed.weight.normal_(0, 1)
    if centred:  # the offset from generated images (gan.center-samples) is clipped exactly too
        y_c = torch.arange(40) % 10
        with torch.no_grad():
            D.set_center(model.generator(y_c), y_c)
    batch = task.site_data(0)[0]
    batch = ArrayData(batch.x[:32], batch.y[:32])
    plan = RoundPlan(32, 1.0, 1, 0.0, 0.3, 1e-5, "rdp")

    def grads(engine):
        m = copy.deepcopy(model)
        m.discriminator.center = D.center
        eng = engine(m.discriminator, torch.optim.SGD(m.discriminator.parameters(), lr=0.0), plan)
        eng.step(task.per_sample_loss(m, batch))
        out = {n: p.grad.clone() for n, p in m.discriminator.named_parameters() if p.requires_grad}
        eng.close()
        return out

    fast, ref = grads(FastDPStep), grads(OpacusDPStep)
    assert set(fast) == {"head.weight", "head.bias", "embed.weight"}  # the random features are frozen
    for name in ref:
        assert torch.allclose(fast[name], ref[name], rtol=1e-4, atol=1e-6), name


def test_a_dp_round_takes_the_planned_steps_and_keeps_the_random_features():
    task = gan_task(**{"dp.noise-multiplier": 1.0})
    torch.manual_seed(0)
    model = task.build_model()
    before = copy.deepcopy(model.state_dict())
    train = task.site_data(0)[0]
    plan = plan_round(task.cfg, len(train))
    out = run_local_round(task, model, train, plan, torch.device("cpu"), seed=3)
    assert out.steps_taken == plan.steps > 0
    after = model.state_dict()
    assert torch.equal(after["discriminator.features.weight"], before["discriminator.features.weight"])
    assert not torch.equal(after["discriminator.head.weight"], before["discriminator.head.weight"])
    # the same seed everywhere: every site and the server build the same random features
    assert torch.equal(task.build_model().discriminator.features.weight, before["discriminator.features.weight"])
    metrics = task.evaluate(model, task.server_test_data())
    assert set(metrics) >= {"d_loss", "d_real", "d_fake"}


def test_feature_centring_is_per_label_never_federated_and_cleared_after_training():
    task = gan_task(**{"gan.center-samples": 4, "dp.noise-multiplier": 1.0})
    torch.manual_seed(0)
    model = task.build_model()
    D = model.discriminator
    fake = torch.rand(6, task.input_dim)
    labels = torch.tensor([0, 0, 3, 3, 3, 9])
    D.set_center(fake, labels)
    phi = D.phi(fake)
    assert D.center is not None and D.center.shape == (10, 256)
    assert torch.allclose(D.center[3], phi[2:5].mean(0)) and torch.allclose(D.center[9], phi[5])
    assert torch.equal(D.center[1], torch.zeros(256))  # a label without samples: no offset
    with torch.no_grad():
        D.embed.weight.normal_(0, 1)
    # the offset shifts D by a per-label constant only: G's gradient through D is unchanged
    x = torch.rand(5, task.input_dim, requires_grad=True)
    y = torch.tensor([3, 3, 9, 1, 0])
    (g_centred,) = torch.autograd.grad(D(x, y).sum(), x)
    D.clear_center()
    (g_plain,) = torch.autograd.grad(D(x, y).sum(), x)
    assert torch.allclose(g_centred, g_plain, atol=1e-6)
    assert not any("center" in k for k in model.state_dict())  # nothing extra on the wire
    train = task.site_data(0)[0]
    run_local_round(task, model, train, plan_round(task.cfg, len(train)), torch.device("cpu"), seed=3)
    assert D.center is None  # evaluation and the released model see plain features


def test_center_samples_must_not_be_negative():
    with pytest.raises(ConfigError, match="gan.center-samples"):
        gan_task(**{"gan.center-samples": -1})


# ------------------------------------------------------------------ quality metrics


def test_fid_of_a_set_against_itself_is_zero_and_grows_with_a_shift():
    import numpy as np

    from common.metrics.image_quality import frechet_distance

    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 8))
    assert abs(frechet_distance(a, a)) < 1e-4
    assert frechet_distance(a, a + 1.0) == pytest.approx(8.0, rel=0.01)  # |mu shift|^2 = 8


def test_tstr_on_real_data_is_high_and_class_metrics_add_up():
    import numpy as np

    from common.metrics.image_quality import class_shares, total_variation, tstr_accuracy

    task = gan_task()
    train = torch.cat([task.site_data(i)[0].x for i in range(3)]), torch.cat([task.site_data(i)[0].y for i in range(3)])
    test = task.server_test_data()
    assert tstr_accuracy(train[0].numpy(), train[1].numpy(), test.x.numpy(), test.y.numpy()) > 0.9
    shares = class_shares(np.array([0, 0, 1, 3]), 4)
    assert shares.tolist() == [0.5, 0.25, 0.0, 0.25]
    assert total_variation(shares, np.full(4, 0.25)) == pytest.approx(0.25)
    # the evaluation classifier is good at real digits it never saw (the quality part of the
    # test split), or its labels and features mean little. It trains on about 180 images.
    clf = task.eval_classifier()
    quality = task.quality_data()
    assert (clf(quality.x).argmax(1) == quality.y).float().mean() > 0.88


def test_eval_classifier_reads_no_site_image():
    """Bit-identical whatever the sites hold: it trains on the server's classifier part only."""
    import dataclasses

    task = gan_task()
    reference = task.eval_classifier().state_dict()
    other = gan_task()
    split = other._split
    noisy = tuple((ArrayData(torch.rand_like(t.x), t.y), v) for t, v in split.sites)
    other._split = dataclasses.replace(split, sites=noisy)
    assert other.site_data(0)[0].x.shape == split.sites[0][0].x.shape
    again = other.eval_classifier().state_dict()
    assert all(torch.equal(reference[k], again[k]) for k in reference)
    # and its metrics are measured on the other part of the test split
    assert len(task.quality_data()) + len(task.classifier_data()) == len(task.server_test_data())


def test_gan_class_counts_are_withheld_below_the_minimum():
    from common.tasks.gan.classes import class_counts

    labels = torch.tensor([0] * 12 + [1] * 3 + [2] * 20)
    assert class_counts(labels, 4, 1) == {"class.0.n": 12.0, "class.1.n": 3.0, "class.2.n": 20.0, "class.3.n": 0.0}
    # class 1 (3) and the empty class 3 are small; together 3 < 10, so class 0 goes too
    assert class_counts(labels, 4, 10) == {"class.2.n": 20.0}
    with pytest.raises(Exception, match="gan.min-group-size"):
        gan_task(**{"gan.min-group-size": 0})


def test_total_mode_collapse_is_a_failure(monkeypatch):
    from common.errors import TrainingFailure

    task = gan_task(**{"gan.eval-samples": 100, "gan.collapse-rounds": 2})
    torch.manual_seed(0)
    model = task.build_model()
    one = task.server_test_data().x[0]
    healthy = model.generator.forward
    monkeypatch.setattr(model.generator, "forward", lambda labels, generator=None: one.expand(len(labels), -1).clone())
    # One collapsed round is tolerated (DP GANs often recover), and said so in the metrics ...
    assert task.evaluate(model, task.server_test_data())["collapsed"] == 1.0
    # ... a recovery resets the count ...
    monkeypatch.setattr(model.generator, "forward", healthy)
    assert task.evaluate(model, task.server_test_data())["collapsed"] == 0.0
    monkeypatch.setattr(model.generator, "forward", lambda labels, generator=None: one.expand(len(labels), -1).clone())
    assert task.evaluate(model, task.server_test_data())["collapsed"] == 1.0
    # ... and gan.collapse-rounds in a row end the run.
    with pytest.raises(
        TrainingFailure, match="total mode collapse: 100% of generated images are class .* 2 evaluation"
    ):
        task.evaluate(model, task.server_test_data())
    monkeypatch.setattr(
        model.generator, "forward", lambda labels, generator=None: torch.full((len(labels), 64), float("nan"))
    )
    with pytest.raises(TrainingFailure, match="NaN/Inf"):
        task.evaluate(model, task.server_test_data())


def test_a_round_where_every_update_is_nan_ends_the_run_and_keeps_the_last_checkpoint(tmp_path):
    import numpy as np

    from common.errors import TrainingFailure
    from common.tasks.base import get_state
    from server.callbacks import RoundOutcome
    from server.callbacks.divergence import Divergence
    from server.recorder import RunRecorder
    from server.workflow import RoundLoop
    from tests.conftest import make_strategy, signed
    from tests.unit.test_server_client import _reply

    task = gan_task()
    recorder = RunRecorder(task.cfg, task, tmp_path / "run")
    model = task.build_model()
    init = get_state(model, task.shared_keys(model))
    strategy = make_strategy(init=init, ledger=recorder.ledger, num_sites=2, primary_metric="fid")
    loop = RoundLoop(
        round_outcome=lambda rnd: RoundOutcome(
            rnd, strategy.record(rnd), recorder.load_global(strategy.global_arrays), recorder.ledger
        ),
        record_round=lambda out, secs, extra, ok: recorder.write_round(out.rnd, out.record, secs, extra, ok),
        callbacks=[Divergence()],
        num_sites=2,
        site_wait_seconds=1,
    )
    good = [np.zeros_like(a) for a in init]
    strategy.aggregate_fit(1, signed(strategy, 1, [_reply("a", good), _reply("b", good, node=2)]), [])
    assert loop.end_round(1, 0.1)
    ckpt = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    nan = [np.full_like(a, np.nan) if a.dtype.kind == "f" else a for a in init]
    strategy.aggregate_fit(2, signed(strategy, 2, [_reply("a", nan), _reply("b", nan, node=2)]), [])
    with pytest.raises(TrainingFailure, match="diverged in round 2"):
        loop.end_round(2, 0.1)
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == ckpt  # still round 1's
    # the sites' privacy spend for the diverged round is still in the ledger
    assert [(r.round, r.status) for r in recorder.ledger.rows()][-2:] == [(2, "rejected"), (2, "rejected")]
