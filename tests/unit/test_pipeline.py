"""The update pipeline (common/pipeline): each stage's site step undone or checked by its server step,
the order of the built list, and weighting decided in one place."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from common.errors import PrivfedError
from common.pipeline import Aggregate, Pipeline, ServerContext, SiteContext, SiteUpdate, Stage, build_pipeline
from common.pipeline.stages.client_level_dp import ClientLevelDP
from common.pipeline.stages.eval_sums import EvalSums
from common.pipeline.stages.faults import FaultInjection
from common.pipeline.stages.norm_bound import NormBound
from common.pipeline.stages.secagg import SecAgg
from common.pipeline.stages.secagg_guard import SecAggGuard
from common.pipeline.stages.update_checks import UpdateChecks
from common.pipeline.stages.weighting import Weighting
from common.privacy.accounting import RoundPlan
from common.privacy.client_level import update_norm
from common.privacy.secagg_stats import SecureStats
from tests.conftest import make_cfg, make_registry, make_strategy, server_key
from tests.unit.test_server_client import _reply, _round

SECURE = {"secagg.enabled": True}
CDP = {"central-dp.enabled": True, "num-sites": 40, "fraction-fit": 0.5}


def _site(rnd=1, trained=True):
    return SiteContext(site_index=0, server_round=rnd, trained=trained)


def _server(model, central=None):
    return ServerContext(1, model, [], central=central)


# ------------------------------------------------------------------ the built list
@pytest.mark.parametrize(
    "flat, names",
    [
        ({}, ["norm_bound", "weighting", "update_checks"]),
        (SECURE, ["norm_bound", "secagg_guard", "weighting", "update_checks", "secagg"]),
        (CDP, ["norm_bound", "client_level_dp", "weighting", "update_checks"]),
        (
            # (sample-level DP off: with secure rounds of >= 3 sites its budget must not run out mid-run)
            {**SECURE, **CDP, "num-sites": 200, "fraction-fit": 0.5, "central-dp.clip-norm": 1.0, "dp.enabled": False},
            ["norm_bound", "client_level_dp", "secagg_guard", "weighting", "update_checks", "secagg"],
        ),
        ({"faults.corrupt-rate": 0.5}, ["norm_bound", "faults", "weighting", "update_checks"]),
    ],
)
def test_built_order(flat, names):
    assert build_pipeline(make_cfg(**flat)).names == names


def test_eval_sums_come_after_clip_and_guard_and_before_masking():
    task = SimpleNamespace(sum_keys=lambda: ("sse", "count"), frozen_entries=lambda: ((), ()))
    names = build_pipeline(make_cfg(**SECURE), task).names
    assert names.index("secagg_guard") < names.index("eval_sums") < names.index("weighting") < names.index("secagg")


def test_site_runs_forward_and_server_in_reverse():
    seen = []

    class Probe(Stage):
        def __init__(self, name):
            self.name = name

        def site(self, update, ctx):
            seen.append(("site", self.name))
            return update

        def server(self, agg, ctx):
            seen.append(("server", self.name))
            return agg

    p = Pipeline([Probe("a"), Probe("b")])
    p.site(SiteUpdate([], 1), _site())
    p.server(Aggregate([]), _server([]))
    assert seen == [("site", "a"), ("site", "b"), ("server", "b"), ("server", "a")]


# ------------------------------------------------------------------ one stage at a time
def test_client_level_dp_clips_at_the_site_and_noises_at_the_server():
    cfg = make_cfg(**CDP)
    stage = ClientLevelDP(1.0, cfg.secagg)
    up = stage.site(SiteUpdate([np.array([3.0, 4.0], np.float32)], 5), _site())
    assert update_norm(up.arrays) == pytest.approx(1.0, rel=1e-6)
    assert stage.check(up.arrays, 5, 5, _server(up.arrays)) == ""
    assert "exceeds central-dp.clip-norm=1" in stage.check([np.array([3.0, 4.0])], 5, 5, _server(up.arrays))
    plan = RoundPlan(40, 0.5, 1, 0.0, 1.0, 1e-5, "rdp")  # z = 0: the step is exactly sum / qN
    central = SimpleNamespace(plan=plan, clip_norm=1.0, noise_rng=lambda rnd: np.random.default_rng(rnd))
    out = stage.release(Aggregate([np.array([2.0, 4.0])]), _server([np.zeros(2)], central))
    assert np.allclose(out.arrays[0], [0.1, 0.2])
    assert stage.release(Aggregate([np.ones(2)]), _server([np.zeros(2)])).arrays[0].tolist() == [1.0, 1.0]


def test_secagg_guard_refuses_what_masking_would_hide():
    guard = SecAggGuard(8.0)
    ok = SiteUpdate([np.array([1.0, -7.9])], 1)
    assert guard.site(ok, _site()) is ok
    with pytest.raises(PrivfedError, match="NaN or Inf"):
        guard.site(SiteUpdate([np.array([np.nan])], 1), _site())
    with pytest.raises(PrivfedError, match="clipping-range=8"):
        guard.site(SiteUpdate([np.array([9.0])], 1), _site())
    guard.site(SiteUpdate([np.array([np.nan])], 0), _site(trained=False))  # a zero update is not checked


def test_injected_corruption_is_caught_by_the_server_checks():
    cfg = make_cfg(**{"faults.corrupt-rate": 1.0, "faults.corrupt-kinds": "nan"})
    stage = FaultInjection(cfg.faults, cfg.federation.seed)
    model = [np.zeros(3, np.float32)]
    up = stage.site(SiteUpdate([np.ones(3, np.float32)], 4), _site())
    assert np.isnan(up.arrays[0]).any()
    assert "NaN or Inf" in build_pipeline(cfg).check(up.arrays, 4, 4, _server(model))


def test_eval_sums_round_trip_through_the_secure_sum():
    sa = make_cfg(**SECURE).secagg
    codec = SecureStats(("sse", "count"), sa)
    stage, model = EvalSums(codec), [np.zeros(2, np.float32)]
    ups = []
    for sse, count in ((1.25, 3.0), (2.5, 4.0)):
        ctx = SiteContext(0, 1, evaluate=lambda sse=sse, count=count: {"sse": sse, "count": count})
        stage.before_training(ctx)
        ups.append(stage.site(SiteUpdate([np.ones(2, np.float32)], 1), ctx))
    assert all(len(u.payload()) == 2 for u in ups)
    total = [np.sum([u.payload()[i] for u in ups], axis=0) for i in range(2)]
    ctx = _server(model)
    out = stage.server(Aggregate(total, count=2), ctx)
    assert ctx.sums == {"sse": 3.75, "count": 7.0} and len(out.arrays) == 1
    # Without the extra array: a failure, and the aggregate untouched.
    ctx = _server(model)
    assert stage.server(Aggregate(total[:1]), ctx).arrays == total[:1] and "no evaluation statistics" in ctx.failures[0]


def test_secagg_turns_flowers_mean_into_the_sum():
    out = SecAgg().server(Aggregate([np.full(2, 0.5, np.float32)], count=4), _server([np.zeros(2)]))
    assert out.arrays[0].dtype == np.float64 and out.arrays[0].tolist() == [2.0, 2.0]


def test_weighting_at_the_site_and_the_server():
    plain, secure = Weighting(secure=False, uniform=False), Weighting(secure=True, uniform=True)
    assert plain.site(SiteUpdate([], 30), _site()).num_examples == 30
    assert secure.site(SiteUpdate([], 30), _site()).num_examples == 1
    assert (plain.weight(30), secure.weight(30)) == (30, 1)
    assert "num_examples=3 but dataset_size=4" in plain.check([], 3, 4, _server([]))
    assert plain.release(Aggregate([np.array([8.0])], divisor=4.0), _server([])).arrays[0].tolist() == [2.0]
    central = SimpleNamespace()  # client-level DP divides by qN itself
    assert plain.release(Aggregate([np.array([8.0])], 4.0), _server([], central)).arrays[0].tolist() == [8.0]


def test_update_checks_and_norm_bounds():
    model = [np.zeros(3, np.float32)]
    assert "expected 1 arrays" in UpdateChecks().check([], 1, 1, _server(model))
    assert "dtype/shape" in UpdateChecks().check([np.zeros(2, np.float32)], 1, 1, _server(model))
    bound = NormBound(10.0, 5.0, central=False)
    assert "max-update-norm=10" in bound.check([np.full(3, 10.0)], 1, 1, _server(model))
    usable = {s: ([np.full(3, v)], 1.0) for s, v in (("a", 1.0), ("b", 1.1), ("c", 100.0))}
    rejected: dict[str, str] = {}
    bound.check_round(usable, rejected)
    assert sorted(usable) == ["a", "b"] and "median" in rejected["c"]


def test_checks_keep_their_order_malformed_before_norms():
    cfg = make_cfg(**CDP, **{"max-update-norm": 0.5})
    p, model = build_pipeline(cfg), [np.zeros(3, np.float32)]
    ctx = _server(model, SimpleNamespace(clip_norm=1.0))
    nan_and_big = [np.array([np.nan, 100.0, 0.0], np.float32)]
    assert "NaN or Inf" in p.check(nan_and_big, 1, 1, ctx)
    assert "central-dp.clip-norm" in p.check([np.array([3.0, 0, 0], np.float32)], 1, 1, ctx)
    assert "max-update-norm" in p.check([np.array([0.8, 0, 0], np.float32)], 1, 1, ctx)


# ------------------------------------------------------------------ one place decides weighting
def test_the_strategy_weighs_sites_by_the_pipelines_weighting_stage(tmp_path):
    replies = [_reply("a", [np.full(3, 1.0, np.float32)], n=10), _reply("b", [np.full(3, 4.0, np.float32)], n=30)]
    s = make_strategy(tmp_path, [np.zeros(3, np.float32)])
    assert np.allclose(_round(s, 1, replies, [])[0], 3.25)  # by example count
    (tmp_path / "u").mkdir()
    s = make_strategy(tmp_path / "u", [np.zeros(3, np.float32)])
    stages = [Weighting(secure=False, uniform=True) if st.name == "weighting" else st for st in s.pipeline]
    s.pipeline = Pipeline(stages)
    assert np.allclose(_round(s, 1, replies, [])[0], 2.5)  # equal weights: the stage decided


def test_a_strategy_refuses_a_pipeline_built_from_another_config(tmp_path):
    """A client-level DP run handed a plain pipeline would skip the noise and the /qN while
    ledgering "released" (found in review): the strategy refuses the pair before any round."""
    from server.ledger import Ledger
    from server.strategy import DeltaFedAvg

    cdp = make_cfg(
        **{"central-dp.enabled": True, "dp.enabled": False, "fraction-fit": 0.5, "num-sites": 10, "rounds": 2}
    )
    plain = make_cfg(**{"dp.enabled": False, "num-sites": 10})
    ids = {"registry": make_registry({}), "server_key": server_key()}
    with Ledger(tmp_path / "l.sqlite", run_id="t") as ledger:
        with pytest.raises(PrivfedError, match="not the one the run config builds") as err:
            DeltaFedAvg(cdp, None, ledger, build_pipeline(plain), initial_arrays=[np.zeros(3)], **ids)
        assert "\n" not in str(err.value)
        DeltaFedAvg(cdp, None, ledger, build_pipeline(cdp), initial_arrays=[np.zeros(3)], **ids)  # the matching pair
