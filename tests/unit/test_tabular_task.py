"""The tabular task: the model under the fast DP engine, conditional sampling, the learnt cell prior,
the balanced correction, evaluation through the metrics API (stubbed here), the sites' sums."""

from __future__ import annotations

import math
import sys
import types
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from common.data.arrays import ArrayData
from common.errors import ConfigError
from common.privacy.engines import make_engine
from common.privacy.metrics_dp import MetricBounds
from common.privacy.plan import plan_round
from common.privacy.training import make_optimizer, run_local_round
from common.tasks import get_task
from common.tasks.tabular.model import TabularVAE
from tests.conftest import make_cfg
from tests.unit.test_tabular_data import generated_rows, write_table

KEY = b"f" * 32


# ------------------------------------------------------------ the metrics API (helper M's), stubbed


@dataclass(frozen=True)
class StubSpec:
    numeric: tuple[str, ...]
    categorical: tuple[str, ...]
    label: str
    positive: str
    sensitive: tuple[str, ...]
    groups: dict[str, tuple[str, ...]]
    bins: dict[str, tuple[float, ...]] = field(default_factory=dict)
    categories: dict[str, tuple[str, ...]] = field(default_factory=dict)


CELLS = ("tp", "fp", "tn", "fn")
SCORE_BINS = 4


def _sum_schema(spec: StubSpec, *, scores: bool = False) -> tuple[str, ...]:
    keys = [f"cm.{c}" for c in CELLS]
    for a in spec.sensitive:
        keys += [f"cm.{a}.{g.lower()}.{c}" for g in spec.groups[a] for c in CELLS]
    if scores:
        keys += [f"roc.{side}.{i}" for side in ("pos", "neg") for i in range(SCORE_BINS)]
    return tuple(keys)


def _sum_bounds(spec: StubSpec, *, scores: bool = False) -> MetricBounds:
    return MetricBounds(dict.fromkeys(_sum_schema(spec, scores=scores), 1.0), 1 + len(spec.sensitive) + int(scores))


def _confusion_sums(y_true, y_pred, groups, spec, *, score=None) -> dict[str, float]:  # noqa: ANN001
    out = dict.fromkeys(_sum_schema(spec, scores=score is not None), 0.0)

    def add(mask: np.ndarray, prefix: str) -> None:
        t, p = y_true[mask], y_pred[mask]
        for name, cell in zip(CELLS, ((1, 1), (0, 1), (0, 0), (1, 0))):
            out[prefix + name] += float(((t == cell[0]) & (p == cell[1])).sum())

    add(np.ones(len(y_true), dtype=bool), "cm.")
    for a in spec.sensitive:
        for g in spec.groups[a]:
            add(groups[a] == g, f"cm.{a}.{g.lower()}.")
    if score is not None:
        b = np.minimum((score * SCORE_BINS).astype(int), SCORE_BINS - 1)
        for side, m in (("pos", y_true == 1), ("neg", y_true == 0)):
            for i in range(SCORE_BINS):
                out[f"roc.{side}.{i}"] = float((b[m] == i).sum())
    return out


def _fairness_from_sums(sums, spec, *, min_group_size=1, model="lr") -> dict[str, float]:  # noqa: ANN001
    out = {}
    for a in spec.sensitive:
        rates = []
        for g in spec.groups[a]:
            n = sum(sums.get(f"cm.{a}.{g.lower()}.{c}", 0.0) for c in CELLS)
            pos = sums.get(f"cm.{a}.{g.lower()}.tp", 0.0) + sums.get(f"cm.{a}.{g.lower()}.fp", 0.0)
            if n >= min_group_size:
                rates.append(pos / n)
        out[f"fair.{a}.dp_diff"] = max(rates) - min(rates) if rates else 0.0
    return out


@dataclass(frozen=True)
class Scored:
    pred: np.ndarray
    score: np.ndarray


def _fit_score(kind, train, test, spec, seed):  # noqa: ANN001, ANN202
    """The stand-in TSTR classifier: logistic regression on one-hot features."""
    import pandas as pd
    from sklearn.linear_model import LogisticRegression

    cols = list(spec.numeric) + list(spec.categorical) + list(spec.sensitive)
    xs = pd.get_dummies(train[cols].astype({c: str for c in cols if c not in spec.numeric}))
    xt = pd.get_dummies(test[cols].astype({c: str for c in cols if c not in spec.numeric})).reindex(
        columns=xs.columns, fill_value=0
    )
    y = (train[spec.label] == spec.positive).to_numpy(dtype=int)
    if len(set(y)) < 2:
        return Scored(np.full(len(test), y[0]), np.full(len(test), 0.5))
    clf = LogisticRegression(max_iter=1000, random_state=seed).fit(xs.to_numpy(float), y)
    score = clf.predict_proba(xt.to_numpy(float))[:, 1]
    return Scored((score >= 0.5).astype(int), score)


@pytest.fixture
def metrics_api(monkeypatch):  # noqa: ANN201
    """A stand-in for common.metrics.tabular with the contract's names; records evaluate_all's calls."""
    mod = types.ModuleType("common.metrics.tabular")
    calls: list[tuple] = []

    def evaluate_all(synth, balanced, real_test, spec, seed):  # noqa: ANN001, ANN202
        calls.append((synth, balanced, real_test, spec, seed))
        return {"tstr.lr.accuracy": 0.5, "fair.sex.dp_diff": 0.1}

    mod.TableSpec = StubSpec  # type: ignore[attr-defined]
    mod.evaluate_all = evaluate_all  # type: ignore[attr-defined]
    mod.sum_schema = _sum_schema  # type: ignore[attr-defined]
    mod.sum_bounds = _sum_bounds  # type: ignore[attr-defined]
    mod.confusion_sums = _confusion_sums  # type: ignore[attr-defined]
    mod.fairness_from_sums = _fairness_from_sums  # type: ignore[attr-defined]
    mod.fit_score = _fit_score  # type: ignore[attr-defined]
    mod.CELLS = CELLS  # type: ignore[attr-defined]
    mod.slug = str.lower  # type: ignore[attr-defined]  (the stub's keys; the schema's slug agrees on these)
    monkeypatch.setitem(sys.modules, "common.metrics.tabular", mod)
    return calls


def make_task(tmp_path, n=600, persons=0, key=KEY, **flat):  # noqa: ANN001, ANN201
    data, schema = write_table(tmp_path, generated_rows(n, seed=3, persons=persons))
    cfg = make_cfg(
        **{
            "task": "tabular",
            "num-sites": 2,
            "data.source": "csv",
            "data.path": str(data),
            "data.partition": "iid",
            "tabular.schema": str(schema),
            "tabular.eval-samples": 400,
            "train.batch-size": 64,
            "dp.secure-rng": False,
            **flat,
        }
    )
    return get_task("tabular")(cfg, key)


# ------------------------------------------------------------------ model and DP


@pytest.mark.parametrize("model", ["marginal", "vae"])
def test_the_fast_engine_clips_the_whole_model_and_a_dp_round_takes_the_planned_steps(tmp_path, model):
    task = make_task(tmp_path, **{"tabular.model": model, "dp.noise-multiplier": 1.0})
    net = task.build_model()
    assert all(type(m).__name__ in ("Linear", "ReLU", "Sequential", "TabularVAE") for m in net.modules())
    train = task.site_data(0)[0]
    plan = plan_round(task.cfg, len(train))
    make_engine("fast", net, make_optimizer(net, "adam", 1e-3), plan).close()  # refuses an unclipped parameter
    before = [p.detach().clone() for p in net.parameters()]
    out = run_local_round(task, net, train, plan, torch.device("cpu"), seed=5)
    assert out.steps_taken == plan.steps and plan.noise_multiplier == 1.0
    assert all(not torch.equal(a, b) for a, b in zip(before, net.parameters()))  # every layer got its noisy step
    assert math.isfinite(out.metrics["train_loss"])


def test_per_row_loss_is_the_sum_of_its_terms(tmp_path):
    task = make_task(tmp_path, **{"tabular.model": "vae", "tabular.beta": 0.5})
    net = task.build_model()
    batch = task.site_data(0)[0].subset(np.arange(16))
    torch.manual_seed(1)
    loss = task.per_sample_loss(net, batch)
    torch.manual_seed(1)
    prior, recon, kl = net.loss_terms(batch.x, batch.y)
    assert loss.shape == (16,) and torch.allclose(loss, prior + recon + 0.5 * kl)
    assert bool((prior > 0).all()) and bool((recon > 0).all()) and bool((kl >= 0).all())


def test_the_model_is_fixed_by_the_schema_not_by_the_rows(tmp_path):
    """Privacy rule: shapes and initialisation come from the declared schema only."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    small, large = make_task(tmp_path / "a", n=300), make_task(tmp_path / "b", n=900)
    torch.manual_seed(0)
    s1 = small.build_model().state_dict()
    torch.manual_seed(0)
    s2 = large.build_model().state_dict()
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)


def _train_nonprivate(task, rounds: int = 8):  # noqa: ANN001, ANN202
    torch.manual_seed(0)
    net = task.build_model()
    cfg = task.cfg
    for r in range(rounds):
        for s in range(cfg.federation.num_sites):
            train = task.site_data(s)[0]
            run_local_round(task, net, train, plan_round(cfg, len(train)), torch.device("cpu"), seed=r * 10 + s)
    return net


def test_the_cell_prior_learns_the_label_by_group_distribution(tmp_path):
    task = make_task(tmp_path, n=1500, **{"dp.enabled": False, "train.lr": 0.05, "train.local-epochs": 2.0})
    net = _train_nonprivate(task)
    sites = [task.site_data(s)[0] for s in range(2)]
    cells = torch.cat([task.layout.cell_of(t.x, t.y) for t in sites])
    empirical = torch.bincount(cells, minlength=task.layout.cells()).double() / len(cells)
    learnt = net.cell_probs().detach().double()
    assert float((learnt - empirical).abs().sum()) / 2 < 0.06  # TV distance


def test_synthetic_rows_carry_the_label_signal(tmp_path):
    """Trained without DP, the generator's rows teach a classifier the real rows' label."""
    from common.tasks.tabular.evaluation import to_frame

    task = make_task(tmp_path, n=2000, **{"dp.enabled": False, "train.lr": 0.05, "train.local-epochs": 2.0})
    net = _train_nonprivate(task)
    test = task.server_test_data()
    assert test is not None and test.y is not None
    synth = to_frame(task.layout, *task.synthesize(net, 3000, seed=1))
    real = to_frame(task.layout, test.x, test.y)
    spec = StubSpec(("age", "score"), ("job", "region"), "income", "high", ("sex",), {"sex": ("F", "M")})
    pred = _fit_score("lr", synth, real, spec, 0).pred
    truth = (real["income"] == "high").to_numpy(dtype=int)
    majority = max(truth.mean(), 1 - truth.mean())
    assert (pred == truth).mean() > majority + 0.03


def test_conditional_sampling_draws_exactly_the_requested_cells(tmp_path):
    task = make_task(tmp_path)
    net = task.build_model()
    cells = torch.tensor([0, 1, 2, 3] * 25)
    frame = task.sample_frame(net, 100, seed=4, cells=cells)
    label, (sex,) = task.layout.cell_parts(cells)
    assert frame["income"].tolist() == [["low", "high"][int(i)] for i in label]
    assert frame["sex"].tolist() == [["F", "M"][int(i)] for i in sex]
    assert set(frame.columns) == {"age", "score", "job", "region", "sex", "income"}  # no identifier
    assert frame["age"].between(18, 90).all() and (frame["age"] == frame["age"].round()).all()


def test_balanced_weights_remove_the_label_group_dependence(tmp_path):
    task = make_task(tmp_path)
    net = task.build_model()
    with torch.no_grad():  # a prior where the label depends on sex: cells (label, sex)
        net.prior.bias.copy_(torch.log(torch.tensor([0.5, 0.2, 0.05, 0.25])))
        net.prior.weight.zero_()
    w = task.cell_weights(net, balanced=True).reshape(2, 2)
    w = w / w.sum()
    p_label, p_sex = w.sum(1), w.sum(0)
    assert torch.allclose(w, p_label[:, None] * p_sex[None, :], atol=1e-6)  # independent
    assert torch.allclose(p_label, torch.tensor([0.7, 0.3], dtype=w.dtype), atol=1e-6)  # base rate kept
    assert torch.allclose(p_sex, torch.tensor([0.55, 0.45], dtype=w.dtype), atol=1e-6)  # group sizes kept
    uniform = make_task(tmp_path, **{"tabular.balance": "uniform"})
    assert torch.equal(uniform.cell_weights(net, True), torch.ones(4, dtype=torch.float64))


# ------------------------------------------------------------------ evaluation


def test_server_evaluation_scores_synthetic_and_balanced_rows_on_the_real_test_split(tmp_path, metrics_api):
    task = make_task(tmp_path)
    net = task.build_model()
    test = task.server_test_data()
    assert test is not None
    out = task.evaluate(net, test)
    assert out["tstr.lr.accuracy"] == 0.5 and out["neg_elbo"] > 0
    ((synth, balanced, real, spec, seed),) = metrics_api
    assert len(synth) == len(balanced) == 400 and len(real) == len(test)
    assert spec.label == "income" and spec.positive == "high" and spec.sensitive == ("sex",)
    assert spec.numeric == ("age", "score") and spec.categorical == ("job", "region")
    assert spec.groups == {"sex": ("F", "M")}
    assert list(real.columns) == list(synth.columns)
    assert real["income"].tolist() == [["low", "high"][int(i)] for i in test.y]


def test_site_sums_add_up_to_the_metrics_of_the_union(tmp_path, metrics_api):
    # k = 1: no group is withheld at a site (with k > 1 a small group's exact counts stay home,
    # tests/unit/test_review_tabular.py), so the sums must add up exactly.
    task = make_task(tmp_path, **{"tabular.min-group-size": 1})
    net = task.build_model()
    val = task.site_data(0)[1]
    half = len(val) // 2
    parts = [val.subset(np.arange(half)), val.subset(np.arange(half, len(val)))]
    whole = task.evaluate(net, val)
    pieces = [task.evaluate(net, p) for p in parts]
    assert whole["n"] == len(val) and {"loss_sum", "cm.sex.f.tp"} <= whole.keys()
    combined = task.combine_metrics([(len(p), m) for p, m in zip(parts, pieces)])
    assert combined["n"] == len(val)
    assert combined["neg_elbo"] == pytest.approx(whole["loss_sum"] / len(val))
    assert combined["fair.sex.dp_diff"] == pytest.approx(task.combine_sums(whole)["fair.sex.dp_diff"])
    assert sum(whole[f"cm.{c}"] for c in CELLS) == len(val)


def test_sum_keys_only_where_the_sites_hold_the_real_rows(tmp_path, metrics_api):
    assert make_task(tmp_path).sum_keys() == ()
    site = make_task(tmp_path, **{"data.partition": "site"})
    assert site.server_test_data() is None
    keys = site.sum_keys()
    assert keys[:2] == ("loss_sum", "n") and "cm.sex.m.fn" in keys and len(keys) == 2 + 4 + 8 + 2 * SCORE_BINS


def test_metric_bounds_count_the_keys_one_row_touches(tmp_path, metrics_api):
    task = make_task(tmp_path, **{"data.partition": "site", "metrics.loss-bound": 40.0})
    bounds = task.metric_bounds()
    # loss_sum and n, the overall confusion cell, the row's sex group's cell and its score bin.
    assert bounds.touched == 5
    assert bounds.bounds["loss_sum"] == 40.0 and set(bounds.bounds) == set(task.sum_keys())
    net = task.build_model()
    sums = task.dp_evaluate(net, task.site_data(0)[1])
    assert sums["loss_sum"] <= 40.0 * sums["n"]


def test_person_key_reaches_the_site_data(tmp_path):
    task = make_task(tmp_path, persons=80)
    assert task.has_person_key()
    train, val = task.site_data(0)
    assert train.person is not None and val.person is not None and len(train.person) == len(train)
    assert not make_task(tmp_path).has_person_key()


def test_a_user_level_round_samples_the_tables_persons(tmp_path):
    """Issue 21 meets 22: a table with a person key trains under dp.unit = user; n counts persons."""
    task = make_task(tmp_path, persons=80, **{"dp.unit": "user", "dp.noise-multiplier": 1.0})
    train = task.site_data(0)[0]
    persons = task.unit_count(train)
    assert task.site_sizes()[0] == persons < len(train) and task.privacy_unit == "user"
    plan = plan_round(task.cfg, persons)
    torch.manual_seed(0)
    model = task.build_model(0)
    out = run_local_round(task, model, train, plan, torch.device("cpu"), seed=1)
    assert out.steps_taken == plan.steps > 0
    with pytest.raises(ConfigError) as err:  # no person key declared: refused, naming the key
        make_task(tmp_path, **{"dp.unit": "user"}).site_sizes()
    assert err.value.key == "dp.unit"


def test_user_level_site_sums_read_each_persons_first_rows_and_bounds_scale_with_them(tmp_path):
    user = make_task(tmp_path, persons=40, **{"dp.unit": "user", "dp.max-records-per-user": 2})
    row = make_task(tmp_path, persons=40)
    val = user.site_data(0)[1]
    assert int(torch.bincount(val.person).max()) > 2  # someone has more validation rows than the cap
    torch.manual_seed(0)
    net = user.build_model()
    sums = user.dp_evaluate(net, val)
    assert sums["n"] == float(sum(min(int(c), 2) for c in torch.bincount(val.person)))
    assert row.dp_evaluate(net, val)["n"] == len(val)
    b_user, b_row = user.metric_bounds(), row.metric_bounds()
    assert b_user.touched == b_row.touched
    assert all(b_user.bounds[k] == 2 * b_row.bounds[k] for k in b_row.bounds)


def test_save_samples_writes_synthetic_rows_without_identifiers(tmp_path):
    task = make_task(tmp_path)
    out = task.save_samples(task.build_model(), tmp_path / "samples" / "round-001.png")
    header = out.read_text().splitlines()[0].split(",")
    assert out.suffix == ".csv" and set(header) == {"age", "score", "job", "region", "sex", "income"}


@pytest.mark.parametrize(
    ("flat", "key"),
    [
        ({"tabular.model": "gan"}, "tabular.model"),
        ({"tabular.balance": "none"}, "tabular.balance"),
        ({"tabular.eval-samples": 10}, "tabular.eval-samples"),
        ({"data.partition": "column", "tabular.partition-column": "nope"}, "tabular.partition-column"),
    ],
)
def test_config_errors_name_the_key(tmp_path, flat, key):
    with pytest.raises(ConfigError) as exc:
        make_task(tmp_path, **flat)
    assert exc.value.key == key


def test_csv_source_needs_a_schema(tmp_path):
    data, _ = write_table(tmp_path, generated_rows(50))
    cfg = make_cfg(**{"task": "tabular", "data.source": "csv", "data.path": str(data), "data.partition": "iid"})
    with pytest.raises(ConfigError) as exc:
        get_task("tabular")(cfg, KEY)
    assert exc.value.key == "tabular.schema"


def test_vae_sampling_is_seeded(tmp_path):
    task = make_task(tmp_path, **{"tabular.model": "vae"})
    net = task.build_model()
    assert isinstance(net, TabularVAE) and net.latent_dim > 0
    a, b = task.synthesize(net, 50, seed=3), task.synthesize(net, 50, seed=3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], task.synthesize(net, 50, seed=4)[0])
    assert isinstance(ArrayData(a[0], a[1]), ArrayData)
