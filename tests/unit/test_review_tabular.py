"""Hostile review of issue 22 (the DP tabular generator): each test is one attack on a claim,
and fails on the code as reviewed. Records are generated here (tests.unit.test_tabular_data)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.common import Code, EvaluateRes, Status

from common.data.tabular import load_table
from common.data.tabular_schema import load_schema
from common.errors import DataError
from common.tasks import get_task
from tests.conftest import make_cfg, make_registry, make_strategy, sign_reply, site_key
from tests.unit.test_tabular_data import SCHEMA, generated_rows, write_table

KEY = b"f" * 32


def make_task(tmp_path, n=600, persons=0, key=KEY, schema=None, **flat):  # noqa: ANN001, ANN201
    """tests.unit.test_tabular_task.make_task, on the real metrics module (no stub)."""
    data, schema_path = write_table(tmp_path, generated_rows(n, seed=3, persons=persons), schema=schema)
    cfg = make_cfg(
        **{
            "task": "tabular",
            "num-sites": 2,
            "data.source": "csv",
            "data.path": str(data),
            "data.partition": "iid",
            "tabular.schema": str(schema_path),
            "tabular.eval-samples": 400,
            "train.batch-size": 64,
            "dp.secure-rng": False,
            **flat,
        }
    )
    return get_task("tabular")(cfg, key)


# ------------------------------------------------------------------ (4) metrics.dp sensitivity


def test_vae_loss_sum_moves_by_more_than_its_bound_when_one_validation_row_is_removed(tmp_path):
    """Claim: under metrics.dp one row moves ``loss_sum`` by at most ``metric_bounds()['loss_sum']``.

    With ``tabular.model = "vae"`` the site's per-row loss draws the reparameterisation noise
    from ONE fixed-seed generator for the whole batch (``_losses``: seed 1234, ``torch.randn(N, d)``),
    so row i's noise is the i-th draw: removing row 0 hands every other row a different eps and
    changes every other row's clipped loss. The seed is fixed and public, so the noise is not
    randomness the adversary lacks: the released sum is a deterministic function whose
    sensitivity is up to N x B, not B, and the Gaussian noise calibrated to B does not cover it.
    """
    task = make_task(
        tmp_path,
        n=3000,
        **{"tabular.model": "vae", "data.partition": "site", "metrics.dp": True, "metrics.loss-bound": 400.0},
    )
    bound = task.metric_bounds().bounds["loss_sum"]
    torch.manual_seed(0)
    net = task.build_model()
    # A model whose per-row loss depends on z (a server may send any weights; a trained decoder
    # depends on z too, less steeply). Rows cost ~60-370 nats here, inside the bound.
    with torch.no_grad():
        for p in net.decoder.parameters():
            p.mul_(8.0)
    val = task.site_data(0)[1]
    full = task.dp_evaluate(net, val)["loss_sum"]
    minus_first = task.dp_evaluate(net, val.subset(np.arange(1, len(val))))["loss_sum"]
    assert abs(full - minus_first) <= bound + 1e-6, (full, minus_first, bound)


# ------------------------------------------------------------------ (5) a malicious site vs the server


def test_a_string_in_a_tabular_sum_crashes_the_servers_aggregate_evaluate(tmp_path):
    """Claim: a malicious site cannot crash the server through the tabular sums.

    The reply shape check lets a metric be a short string; ``TabularTask.combine_metrics``
    adds every sum key with ``sum(m.get(k, 0.0) ...)``, so one registered, correctly signed
    site whose ``cm.tp`` is ``"1"`` raises TypeError inside ``aggregate_evaluate`` (not inside
    the per-reply try), and Flower's ``evaluate_round`` does not catch it: the server dies.
    """
    task = make_task(tmp_path, **{"data.partition": "site"})
    reg = make_registry({"a": 100, "b": 100, "m": 100})
    s = make_strategy(tmp_path, [np.zeros(3, np.float32)], registry=reg, task=task)
    keys = task.sum_keys()

    def reply(site: str, node: int, value):  # noqa: ANN001, ANN202
        metrics = {"site_id": site, **dict.fromkeys(keys, 1.0), "neg_elbo": 1.0, "cm.tp": value}
        sign_reply(metrics, site_key(site), s.run_id, 1, "evaluate")
        return SimpleNamespace(node_id=node), EvaluateRes(Status(Code.OK, ""), 1.0, 1, metrics)

    results = [reply("a", 1, 3.0), reply("b", 2, 3.0), reply("m", 9, "1")]
    s.aggregate_evaluate(1, results, [])  # must not raise
    assert "tstr.lr.accuracy" in s.records[1].test
