"""Hostile review of i25-ema (federation.ema-decay): failing tests for the bugs found.

Each test states what an uninterrupted / correctly labelled run would do; on i25-ema
(23140f1) they fail.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays

from common.errors import ConfigError
from common.tasks.base import get_state
from server.averaging import ServedModel
from tests.conftest import make_cfg, make_strategy
from tests.unit.test_served_model import _manager


# --------------------------------------------------------------------------- 1. resume
def test_resume_after_a_round_that_changed_nothing_does_not_average_in_the_initial_model(tmp_path):
    """Round 1 is recorded (ok, checkpointed) without changing the model (too few usable
    updates, every site failed...). Uninterrupted, the average starts at the first model a
    round produces. The checkpoint, though, stores recorder.served_model, which load_global
    set to the *global (initial) arrays* because ServedModel had nothing yet; resume then
    takes the random initial model as the average and weighs it 0.8 in round 2's average."""
    from server.ledger import Ledger
    from server.recorder import RunRecorder
    from server.resume import resume_point
    from tests.unit.test_gan import gan_task

    decay = 0.8
    task = gan_task(**{"ema-decay": decay})
    run = tmp_path / "run"
    recorder = RunRecorder(task.cfg, task, run)
    keys = recorder.keys
    init = get_state(recorder.model, keys)
    served = ServedModel(decay)  # strategy.served: round 1 changed nothing, so no update()
    # server/app.py outcome(): what is checkpointed after round 1
    # (with the fix, outcome() passes served.started(): None until a round changed the model)
    recorder.load_global(init, served.started() if hasattr(served, "started") else served.arrays(init))
    recorder.save_checkpoint(1)
    recorder.ledger.close()

    # server/app.py _run_federation on resume (lines 98-102), verbatim
    with Ledger(run / "ledger.sqlite", run_id="run") as ledger:
        point = resume_point(run, ledger, "gan")
    served_arrays = None
    if point.served is not None and task.cfg.federation.ema_decay > 0:
        average = task.build_model()
        average.load_state_dict(point.served)
        served_arrays = get_state(average, keys)
    resumed = ServedModel(decay, served_arrays)

    # round 2 changes the model, in both runs alike
    g2 = [a + 1.0 if np.issubdtype(a.dtype, np.floating) else a for a in init]
    served.update(g2)
    resumed.update(g2)
    for a, b in zip(served.arrays(g2), resumed.arrays(g2)):
        np.testing.assert_array_equal(a, b)  # fails: resumed = 0.8 * init + 0.2 * g2, uninterrupted = g2


# --------------------------------------------------------------------------- 2. q-fedavg
def test_q_fedavg_losses_are_those_of_the_model_the_sites_trained_from():
    """q-FedAvg's F_k is 'the site's loss under the current global model w^t', read from the
    site's previous evaluate reply (server/aggregation/qfedavg.py). Under ema-decay the sites
    are sent the average for evaluation, so F_k becomes the loss of a different model.
    Either the combination is refused, or the sites evaluate the global model."""
    try:
        s = make_strategy(init=[np.zeros(2, np.float32)], aggregation="q-fedavg", ema_decay=0.5)
    except ConfigError as exc:
        assert exc.key == "ema-decay"
        return
    s.global_arrays = [np.full(2, 2.0, np.float32)]
    s.served.update(s.global_arrays)
    s.global_arrays = [np.full(2, 4.0, np.float32)]
    s.served.update(s.global_arrays)
    instructions = s.configure_evaluate(2, ndarrays_to_parameters(s.global_arrays), _manager(3))
    for _, ins in instructions:
        # fails: the sites get [3, 3] (the average), and their loss feeds q-FFL's next step
        assert parameters_to_ndarrays(ins.parameters)[0].tolist() == [4.0, 4.0]


# --------------------------------------------------------------------------- 3. labels
MIA = {
    "mia_auc": 0.51,
    "mia_advantage": 0.02,
    "mia_chance_advantage": 0.05,
    "mia_advantage_bound": 0.46,
    "mia_eps": 1.0,
    "mia_delta": 1e-5,
    "mia_examples": 200,
}


def _ema_run(tmp_path):
    from server.recorder import config_toml
    from tests.unit.test_audit import _run_dir
    from tests.unit.test_report_facts import _write_metrics

    run = _run_dir(tmp_path)
    source = "server-held split; model: average of the global models, ema-decay 0.8"
    _write_metrics(
        run,
        [
            {"round": r, "primary_metric": "fid", "test": {"fid": 90.0, "tstr": 0.6}, "test_source": source}
            for r in (1, 2, 3)
        ],
    )
    (run / "config.toml").write_text(config_toml(make_cfg(task="gan", **{"ema-decay": 0.8})))
    (run / "samples").mkdir()
    # a real (tiny) PNG, so the HTML report can embed it
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.imsave(run / "samples" / "final.png", np.zeros((4, 4)))
    return run


def test_summary_md_does_not_call_the_average_the_final_global_model(tmp_path):
    from server.ledger import Ledger
    from server.report import write_summary

    run = _ema_run(tmp_path)
    with Ledger(run / "ledger.sqlite", run_id="run") as ledger:
        write_summary(run, ledger, "fid", "gan-digits", mia=dict(MIA), plot_metrics=("tstr",))
    md = (run / "summary.md").read_text()
    assert "average of the global models" in md  # the test metrics are labelled
    # fails: "## Samples from the final global model", though server/app.py draws final.png
    # from recorder.released (the average)
    assert "## Samples from the average of the global models" in md


def test_report_html_does_not_call_the_average_the_final_global_model(tmp_path):
    from server.html_report import write_report
    from server.ledger import Ledger
    from server.report import write_summary

    run = _ema_run(tmp_path)
    with Ledger(run / "ledger.sqlite", run_id="run") as ledger:
        write_summary(run, ledger, "fid", "gan-digits", mia=dict(MIA), plot_metrics=("tstr",))
    write_report(run)
    page = (run / "report.html").read_text()
    assert "Generated from the average of the global models" in page  # fails: "...the final global model."


# --------------------------------------------------------------------------- 4. the audit
def test_the_membership_attack_targets_a_model_the_sites_received(tmp_path):
    """Every global model is released to the sampled sites (they train from it); the average
    never leaves the server except for evaluation. The empirical privacy check should attack
    the strongest release, the last global model, not its smoothed average (server/app.py
    passes recorder.released to run_metrics, and outcome() puts it in RoundOutcome.model for
    the per-round attack). Checked on the recorder: what load_global hands the callbacks."""
    from server.recorder import RunRecorder
    from tests.unit.test_gan import gan_task

    task = gan_task(**{"ema-decay": 0.8})
    recorder = RunRecorder(task.cfg, task, tmp_path / "run")
    keys = recorder.keys
    glob = get_state(recorder.model, keys)
    served = [a + 1.0 if np.issubdtype(a.dtype, np.floating) else a for a in glob]
    attacked = recorder.load_global(glob, served)  # RoundOutcome.model; recorder.released at the end
    recorder.ledger.close()
    first = keys[0]
    # fails: the attacked model holds the average's weights, not the released global model's
    assert torch.equal(attacked.state_dict()[first], torch.as_tensor(glob[0]))


# --------------------------------------------------------------------------- 5. dtype
def test_a_float16_average_keeps_moving():
    """The average is kept in the arrays' own dtype: in float16, (1 - d) * (g - s) below half
    an ulp of s is rounded away every round and the average stops following the models."""
    served = ServedModel(0.9)
    served.update([np.full(1, 100.0, np.float16)])
    for _ in range(20):
        served.update([np.full(1, 101.0, np.float16)])
    avg = float(served.arrays([np.zeros(1, np.float16)])[0][0])
    expected = 101.0 - 0.9**20  # 100.88 in exact arithmetic
    assert avg == pytest.approx(expected, abs=0.07)  # fails: stuck at 100.25 (ulp at 100 is 0.0625)


# --------------------------------------------------------------------------- 6. memory with decay 0
def test_without_decay_no_copy_of_the_model_is_kept():
    """ema-decay = 0 is every scenario but gan-digits: ServedModel.update still copies the
    whole global model every round and keeps it, though arrays() never returns it."""
    served = ServedModel(0.0)
    served.update([np.zeros(1000, np.float32)])
    assert served._arrays is None  # fails: a full, unused copy of the global model is held
