"""Evaluation sums inside the SecAgg+ vector: exact through Flower's quantization, the same
metrics as the plain combination, never clipped, and absent from the clear replies."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from flwr.common.secure_aggregation.ndarrays_arithmetic import (
    factor_combine,
    factor_extract,
    parameters_addition,
    parameters_mod,
    parameters_multiply,
)
from flwr.common.secure_aggregation.quantization import dequantize, quantize

from common.errors import ConfigError, PrivfedError
from common.privacy.secagg_stats import FRACTION_BITS, SecureStats, secure_statistics
from common.tasks import get_task
from tests.conftest import declared, make_cfg
from tests.unit.test_recsys import KEY
from tests.unit.test_recsys import SMALL as RECSYS_SMALL

SMALL = {**RECSYS_SMALL, "num-sites": 4, "secagg.enabled": True}


def _task(**overrides):
    return get_task("recsys")(make_cfg(**{**SMALL, **overrides}), KEY)


def _secagg_mean(vectors: list[np.ndarray], sa, seed: int = 0) -> np.ndarray:
    """What Flower's SecAgg+ hands the strategy for these site vectors (num_examples = 1,
    max_weight = 1): each site's steps of ``_collect_masked_vectors`` (weighting, stochastic
    quantization, a mask, mod), then the unmask stage's sum and dequantization. The masks
    here are random and cancel in the sum, as the protocol's do once unmasked."""
    rng = np.random.default_rng(seed)
    masks = [rng.integers(0, sa.modulus_range, size=vectors[0].shape) for _ in vectors]
    masks[-1] = (-sum(masks[:-1])) % sa.modulus_range
    ratio = round(1.0 * sa.quantization_range)
    total = [np.zeros(1, np.int64), np.zeros(vectors[0].shape, np.int64)]
    for v, mask in zip(vectors, masks):
        x = parameters_multiply([v], ratio / sa.quantization_range)
        q = factor_combine(ratio, quantize(x, sa.clipping_range, sa.quantization_range))
        upload = parameters_mod(parameters_addition(q, [np.zeros(1, np.int64), mask]), sa.modulus_range)
        total = parameters_addition(total, upload)
    q_total, body = factor_extract(parameters_mod(total, sa.modulus_range))
    (mean,) = dequantize(body, sa.clipping_range, sa.quantization_range)
    mean += -(len(vectors) - 1) * sa.clipping_range
    return mean * (sa.quantization_range / q_total)


def _site_metrics(task) -> list[tuple[int, dict[str, float]]]:
    torch.manual_seed(0)
    out = []
    for s in range(task.cfg.federation.num_sites):
        _, val = task.site_data(s)
        out.append((len(val), task.evaluate(task.build_model(s), val)))
    return out


def test_sums_survive_secagg_exactly_and_combine_like_the_plain_metrics():
    task = _task()
    sa = task.cfg.secagg
    codec = secure_statistics(task.sum_keys(), sa)
    assert codec is not None and codec.width == len(task.sum_keys()) * codec.digits
    sites = _site_metrics(task)
    packed = [codec.pack(m, task.is_sum_key) for _, m in sites]
    # Within SecAgg+'s range (never clipped), and on its grid (quantization changes nothing).
    assert max(float(np.abs(p).max()) for p in packed) <= sa.clipping_range / 2
    for p in packed:
        (q,) = quantize([p], sa.clipping_range, sa.quantization_range)
        assert np.array_equal(q - sa.quantization_range // 2, np.rint(p / sa.step))

    mean = _secagg_mean(packed, sa)
    sums = codec.unpack(mean * len(sites))  # the strategy's mean -> sum
    plain_sums = {k: sum(m.get(k, 0.0) for _, m in sites) for k in task.sum_keys()}
    for key in task.sum_keys():
        assert sums[key] == pytest.approx(plain_sums[key], rel=1e-12, abs=len(sites) * 2.0**-FRACTION_BITS), key
    assert sums["n_ratings"] == plain_sums["n_ratings"] > 0  # counts are exact

    # Aggregating the sufficient statistics securely gives the plain (centralised) metrics.
    secure = task.combine_sums(sums)
    plain = task.combine_metrics(sites)
    plain.pop("item_collision_rate")  # a max over sites, not a sum: not in the secure sum
    assert set(secure) == set(plain)
    assert any(k.startswith("group.gender.") for k in secure) and "unfairness.gender.value" in secure
    for key, value in plain.items():
        assert secure[key] == pytest.approx(value, rel=1e-9, abs=1e-9), key


def test_a_statistic_that_does_not_fit_is_refused_in_one_line():
    codec = SecureStats(("sse", "n_ratings"), make_cfg(**{"secagg.enabled": True}).secagg)
    for bad in (3e14, -1e15, float("nan")):
        with pytest.raises(PrivfedError, match="'sse'") as info:
            codec.pack({"sse": bad, "n_ratings": 10.0})
        assert "\n" not in str(info.value) and "not sent rather than clipped" in str(info.value)
    # Just inside the range it round-trips; a sum the schema lacks is refused, not dropped.
    big = 2.0**47
    assert codec.unpack(codec.pack({"sse": big, "n_ratings": -3.5}))["sse"] == big
    with pytest.raises(PrivfedError, match="'group.gender.X.sse' is not in the task's sum_keys"):
        codec.pack({"group.gender.X.sse": 1.0}, lambda k: k.endswith(".sse"))


def test_secagg_settings_that_cannot_carry_the_sums_exactly_are_refused_up_front():
    from common.preflight import preflight

    with pytest.raises(ConfigError) as info:
        preflight(make_cfg(**{**SMALL, "secagg.clipping-range": 10.0}))
    assert info.value.key == "secagg.clipping-range" and "\n" not in str(info.value)
    # Without SecAgg+, or for a task without sums, there is nothing to carry.
    assert secure_statistics(_task(**{"secagg.enabled": False}).sum_keys(), make_cfg().secagg) is None
    assert get_task("vae")(make_cfg(task="vae")).sum_keys() == ()


def test_a_site_sends_its_sums_with_the_update_and_only_its_primary_metric_in_the_clear():
    from flwr.app import Context, RecordDict

    from client.app import SiteClient
    from common.tasks.base import get_state

    cfg = make_cfg(**{**SMALL, "dp.noise-multiplier": 1.0, "rounds": 2})
    site = SiteClient(
        cfg,
        1,
        "site-1",
        Context(run_id=1, node_id=1, node_config={"partition-id": 1}, state=RecordDict(), run_config={}),
        KEY,
        declared=declared(cfg, 1, KEY),
    )
    server_model = site.task.build_model()
    params = get_state(server_model, site.task.shared_keys(server_model))
    # The model the site holds when the round starts: the global one plus its local part.
    before = site.task.evaluate(site._model(params)[0], site.val_data)
    arrays, n, _ = site.fit(params, {"server-round": 1})
    assert n == 1 and len(arrays) == len(params) + 1
    assert [a.shape for a in arrays[:-1]] == [p.shape for p in params]
    sent = site.pipeline.get("eval_sums").codec.unpack(arrays[-1])
    for key in site.task.sum_keys():
        assert sent[key] == pytest.approx(before.get(key, 0.0), abs=2.0**-FRACTION_BITS), key
    _, _, reply = site.evaluate(params, {})
    assert set(reply) - {"signature"} == {"site_id", "rmse", "history"}  # (this site was built without a key)


@pytest.mark.slow
def test_secure_run_records_group_metrics_from_the_masked_sum_only(tmp_path, monkeypatch):
    """Recommender, 4 sites, SecAgg+: the evaluate replies hold no sums, yet every round's
    record has the group metrics, equal to the plain metrics of the model they describe."""
    from flwr.app import Context, RecordDict
    from flwr.common import parameters_to_ndarrays

    from client.app import SiteClient
    from common.deploy.keys import load_key, write_key
    from server.strategy import DeltaFedAvg
    from simulations.launcher import resolve, simulate

    sent: dict[int, list] = {}
    replies: dict[int, list[tuple[int, dict]]] = {}
    fit, evaluate = DeltaFedAvg.configure_fit, DeltaFedAvg.aggregate_evaluate

    def configure_fit(self, rnd, parameters, client_manager):
        sent[rnd] = parameters_to_ndarrays(parameters)
        return fit(self, rnd, parameters, client_manager)

    def aggregate_evaluate(self, rnd, results, failures):
        replies[rnd] = [(res.num_examples, dict(res.metrics)) for _, res in results]
        return evaluate(self, rnd, results, failures)

    monkeypatch.setattr(DeltaFedAvg, "configure_fit", configure_fit)  # the server runs in-process
    monkeypatch.setattr(DeltaFedAvg, "aggregate_evaluate", aggregate_evaluate)
    # The sites run in this process (backend=in-process): the checks are on what the server
    # receives and records, and Ray's start-up was most of the run's time.
    key_file = str(write_key(tmp_path / "fed.key"))
    overrides = [
        "num-sites=4",
        "rounds=2",
        "secagg.enabled=true",
        "recsys.synthetic-users=200",
        "recsys.synthetic-items=80",
        "recsys.num-buckets=512",
        "train.batch-size=128",
        "dp.target-epsilon=0.0",
        "dp.noise-multiplier=1.0",
        "audit.mia=false",
        "sample-every=0",
        f"run-dir={tmp_path / 'run'}",
        "backend=in-process",
    ]
    simulate("recsys-synthetic", overrides, key_file=key_file)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    task = get_task("recsys")(resolve("recsys-synthetic", overrides), None)

    # What the server received in the clear: per site its own RMSE, no sum of any kind.
    assert sorted(replies) == [1, 2] and all(len(r) == 4 for r in replies.values())
    for _, metrics in replies[1] + replies[2]:
        assert set(metrics) == {"site_id", "rmse", "history", "signature"}
        assert not any(task.is_sum_key(k) or k.startswith(("group.", "yh.")) for k in metrics)

    sites = [f"site-{i}" for i in range(4)]
    assert [(m["round"], m["test_model_round"], m["test_sites"]) for m in lines] == [(1, 0, sites), (2, 1, sites)]
    assert all("group.gender.F.rmse" in m["test"] and "unfairness.gender.non_parity" in m["test"] for m in lines)

    # Round 1's record: the initial model, as a plain run's sites would report and combine it.
    plain_cfg = resolve("recsys-synthetic", overrides + ["secagg.enabled=false"])
    key = load_key(key_file)
    plain = []
    for i in range(4):
        ctx = Context(run_id=1, node_id=i, node_config={"partition-id": i}, state=RecordDict(), run_config={})
        _, n, metrics = SiteClient(plain_cfg, i, f"site-{i}", ctx, key, declared=declared(plain_cfg, i, key)).evaluate(
            sent[1], {}
        )
        assert "group.gender.F.sse" in metrics  # the plain reply carries the sums
        plain.append((n, metrics))
    expected = task.combine_metrics(plain)
    expected.pop("item_collision_rate")
    assert set(lines[0]["test"]) == set(expected)
    for k, v in expected.items():
        assert lines[0]["test"][k] == pytest.approx(v, rel=1e-9, abs=1e-9), k

    # Round 2's record describes model 1, which the sites' round-1 replies measured in the clear.
    # The replies' weight is each site's declared n-hat, not its held-out count: the test reads the counts itself.
    keyed = get_task("recsys")(plain_cfg, key)
    held_out = {f"site-{i}": len(keyed.site_data(i)[1]) for i in range(4)}
    assert all(n == declared(plain_cfg, int(m["site_id"][5:]), key) for n, m in replies[1])
    counts = [(held_out[m["site_id"]], m) for _, m in replies[1]]
    pooled = math.sqrt(sum(n * m["rmse"] ** 2 for n, m in counts) / sum(n for n, _ in counts))
    assert lines[1]["test"]["rmse"] == pytest.approx(pooled, rel=1e-9)
    assert lines[1]["test"]["rmse"] != pytest.approx(lines[0]["test"]["rmse"], rel=1e-3)  # the model moved
