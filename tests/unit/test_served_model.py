"""federation.ema-decay: the server serves an average of the global models (server.averaging).

Post-processing of the rounds' releases: these tests pin what is averaged, what the server
evaluates and sends for evaluation, that a resumed run keeps the average, and the combination
it refuses (site evaluation under SecAgg+, which measures the model the sites train from).
"""

from __future__ import annotations

from unittest.mock import Mock

import numpy as np
import pytest
import torch
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy

from common.config import RunConfig
from common.errors import ConfigError
from server.averaging import ServedModel
from tests.conftest import make_strategy


def _arrays(v: float) -> list[np.ndarray]:
    return [np.full(2, v, np.float32), np.array([int(v)], np.int64)]


def test_without_decay_the_served_model_is_the_global_model():
    served = ServedModel(0.0)
    g = _arrays(3.0)
    served.update(g)
    assert served.arrays(g) is g and served.started() is None


def test_the_average_starts_at_the_first_changed_model_and_weighs_older_ones_by_the_decay():
    served = ServedModel(0.75)
    init = _arrays(0.0)
    assert served.arrays(init) is init  # no round has changed the model: the initial one is served
    served.update(_arrays(4.0))  # the first round's model, not the random init, starts the average
    assert served.arrays(init)[0].tolist() == [4.0, 4.0]
    served.update(_arrays(8.0))
    avg = served.arrays(init)
    assert avg[0].tolist() == [5.0, 5.0] and avg[0].dtype == np.float32  # 0.75 * 4 + 0.25 * 8
    assert avg[1].tolist() == [8]  # integer state (counters) is taken as it is, not averaged
    state = served.started()
    assert state is not None and state[0].tolist() == [5.0, 5.0]
    # A resumed run continues the average from its checkpoint.
    again = ServedModel(0.75, state)
    again.update(_arrays(1.0))
    assert again.arrays(init)[0].tolist() == [4.0, 4.0]


@pytest.mark.parametrize("value", [1.0, -0.1, 1.5])
def test_a_decay_outside_0_1_is_refused_naming_the_key(value):
    with pytest.raises(ConfigError) as info:
        RunConfig.from_flat({"ema-decay": value})
    assert info.value.key == "ema-decay" and "\n" not in str(info.value)


def _manager(n: int) -> SimpleClientManager:
    cm = SimpleClientManager()
    for i in range(n):
        proxy = Mock(spec=ClientProxy)
        proxy.cid, proxy.node_id = str(i), i
        cm.register(proxy)
    return cm


def test_the_server_evaluates_and_sends_for_evaluation_the_served_model():
    s = make_strategy(init=[np.zeros(2, np.float32)], ema_decay=0.5)
    seen: list[list[np.ndarray]] = []
    s.central_eval = lambda rnd, arrays: seen.append(arrays) or {"loss": 0.0}
    s.global_arrays = [np.full(2, 2.0, np.float32)]
    s.served.update(s.global_arrays)
    s.global_arrays = [np.full(2, 4.0, np.float32)]
    s.served.update(s.global_arrays)
    # Flower hands evaluate() the global model; the average (3.0) is what is measured.
    s.evaluate(2, ndarrays_to_parameters(s.global_arrays))
    assert seen[-1][0].tolist() == [3.0, 3.0]
    s.central_eval = None  # the sites evaluate (a task without a server-held split)
    instructions = s.configure_evaluate(2, ndarrays_to_parameters(s.global_arrays), _manager(3))
    assert len(instructions) == 3
    for _, ins in instructions:
        assert parameters_to_ndarrays(ins.parameters)[0].tolist() == [3.0, 3.0]


def test_without_decay_the_sites_evaluate_what_flower_hands_over():
    s = make_strategy(init=[np.zeros(2, np.float32)])
    params = ndarrays_to_parameters([np.full(2, 7.0, np.float32)])
    (_, ins), *_ = s.configure_evaluate(1, params, _manager(2))
    assert parameters_to_ndarrays(ins.parameters)[0].tolist() == [7.0, 7.0]


def test_site_evaluation_under_secure_sums_is_refused_with_an_average(tmp_path):
    """Under SecAgg+ the sites' evaluation sums ride on fit and measure the model they train
    from: the averaged model would be reported as evaluated without ever being evaluated."""
    from common.runtime import cached_task
    from tests.conftest import make_cfg

    flat = {"task": "recsys", "data.source": "synthetic", "data.partition": "region"}
    flat |= {"secagg.enabled": True, "num-sites": 4}
    task = cached_task(make_cfg(**flat))
    assert make_strategy(tmp_path, secure=True, task=task, num_sites=4).secure_sums  # the case exists
    with pytest.raises(ConfigError) as info:
        make_strategy(tmp_path, secure=True, task=task, num_sites=4, ema_decay=0.5)
    assert info.value.key == "ema-decay"


def test_the_checkpoint_keeps_the_average_and_resume_finds_it(tmp_path):
    from server.recorder import RunRecorder
    from server.resume import resume_point
    from tests.unit.test_gan import gan_task

    task = gan_task(**{"ema-decay": 0.5})
    recorder = RunRecorder(task.cfg, task, tmp_path / "run")
    keys = recorder.keys
    glob = [v.detach().numpy().copy() for k, v in recorder.model.state_dict().items() if k in keys]
    served = [a + 1.0 for a in glob]
    released = recorder.load_global(glob, served)
    assert released is recorder.model and recorder.released is recorder.served_model  # MIA: global; samples: average
    recorder.save_checkpoint(1)
    recorder.ledger.close()
    payload = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    first = keys[0]
    assert torch.equal(payload["state"][first], torch.as_tensor(glob[0]))  # the sites train on from this
    assert torch.equal(payload["served"][first], torch.as_tensor(served[0]))
    from server.ledger import Ledger

    with Ledger(tmp_path / "run" / "ledger.sqlite", run_id="run") as ledger:
        point = resume_point(tmp_path / "run", ledger, "gan")
    assert point.served is not None and torch.equal(point.served[first], torch.as_tensor(served[0]))
