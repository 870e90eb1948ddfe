"""The tabular metrics on small generated frames: hand-computed values, fairlearn on the same rows,
the site-sums path against the pooled computation, and a correction that shrinks a planted gap."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from fairlearn.metrics import (
    MetricFrame,
    demographic_parity_difference,
    equalized_odds_difference,
    false_positive_rate,
    selection_rate,
    true_positive_rate,
)
from sklearn.metrics import accuracy_score, roc_auc_score

from common.errors import ConfigError
from common.metrics.tabular import (
    TableSpec,
    balanced_cells,
    confusion_sums,
    correction,
    evaluate_all,
    fairness,
    fairness_from_sums,
    fidelity,
    fit_score,
    marginals,
    real_baseline,
    reweigh_weights,
    slug,
    sum_bounds,
    sum_schema,
    utility,
)
from common.metrics.tabular_plots import (
    MARGINALS_FILE,
    attributes,
    groups,
    methods,
    plot_correction,
    plot_gaps,
    plot_group_rates,
    plot_marginals,
    plot_utility,
    read_marginals,
    write_marginals,
)
from server import html_report
from server.html_report_tabular import tabular_section

SPEC = TableSpec(
    numeric=("age", "hours"),
    categorical=("occupation", "country"),
    label="income",
    positive=">50K",
    sensitive=("sex", "race"),
    groups={"sex": ("Female", "Male"), "race": ("White", "Black", "Asian-Pac-Islander")},
)


def adult_like(n: int, seed: int, gap: float = 1.5, balanced: bool = False) -> pd.DataFrame:
    """Adult-shaped rows whose label depends on sex by ``gap`` (log-odds), age, hours and occupation.

    ``balanced``: every sex x label cell the same size (what conditional sampling over
    sensitive x label gives), the features drawn as in the unbalanced rows of that cell.
    """
    rng = np.random.default_rng(seed)
    m = 4 * n if balanced else n
    sex = rng.choice(["Female", "Male"], m, p=[0.35, 0.65])
    race = rng.choice(["White", "Black", "Asian-Pac-Islander"], m, p=[0.7, 0.2, 0.1])
    age = rng.normal(40, 12, m).clip(17, 90).round()
    hours = rng.normal(40, 10, m).clip(1, 99).round()
    occ = rng.choice(["craft", "sales", "tech", "service"], m)
    # Many categories: the one-hot matrix is mostly zeros (the encoder must still give fairlearn dense rows).
    country = rng.choice([f"c{i:02d}" for i in range(40)], m)
    logit = -2.0 + gap * (sex == "Male") + 0.05 * (age - 40) + 0.04 * (hours - 40) + 0.8 * (occ == "tech")
    y = rng.random(m) < 1 / (1 + np.exp(-logit))
    frame = pd.DataFrame(
        {
            "age": age,
            "hours": hours,
            "occupation": occ,
            "country": country,
            "sex": sex,
            "race": race,
            "income": np.where(y, ">50K", "<=50K"),
        }
    )
    if balanced:
        cells = [frame[(frame.sex == s) & (y == v)] for s in ("Female", "Male") for v in (False, True)]
        frame = pd.concat([c.sample(n // 4, replace=True, random_state=seed) for c in cells], ignore_index=True)
    return frame


# ------------------------------------------------------------------ spec and keys


def test_slug_and_spec_refusals():
    assert slug("Asian-Pac-Islander") == "asian-pac-islander"
    assert slug("Amer Indian/Eskimo") == "amer-indian-eskimo"
    assert slug("?") == "group"  # the schema's slug: one definition for the keys it checks
    with pytest.raises(ConfigError, match="at least two"):
        TableSpec(("a",), (), "y", "1", ("s",), {"s": ("only",)})
    with pytest.raises(ConfigError, match="same slug"):
        TableSpec(("a",), (), "y", "1", ("s",), {"s": ("A b", "a-b")})
    for numeric, categorical, label in ((("a",), ("a",), "y"), (("a",), ("s",), "y"), (("a",), (), "s")):
        with pytest.raises(ConfigError, match="two roles"):
            TableSpec(numeric, categorical, label, "1", ("s",), {"s": ("f", "m")})


def test_bad_numeric_value_is_refused_without_the_value():
    rows = adult_like(50, 0).astype({"age": object})
    rows.loc[7, "age"] = "forty-one"
    with pytest.raises(ConfigError) as err:
        utility(rows, adult_like(50, 1), SPEC, 0)
    assert "forty-one" not in str(err.value) and "schema.age" in str(err.value)


def test_undeclared_group_is_refused_without_the_value():
    rows = adult_like(200, 0)
    rows.loc[3, "sex"] = "Secret-Value"
    with pytest.raises(ConfigError) as err:
        fairness(adult_like(200, 1), rows, SPEC, 0)
    assert "Secret-Value" not in str(err.value) and "groups.sex" in str(err.value)


# ------------------------------------------------------------------ utility


def _sign_rows(x: list[float], label: list[int], sex: list[str]) -> pd.DataFrame:
    """Rows of a one-feature table: the label is ``1`` / ``0``; sex is a sensitive feature."""
    return pd.DataFrame({"x": x, "sex": sex, "y": [str(v) for v in label]})


SIGN = TableSpec(
    numeric=("x",), categorical=(), label="y", positive="1", sensitive=("sex",), groups={"sex": ("F", "M")}
)


def _separable(n: int, seed: int, flip: bool = False) -> pd.DataFrame:
    """Synthetic rows where y = [x > 0] (or its opposite), independent of sex: LR learns the sign of x."""
    rng = np.random.default_rng(seed)
    x = rng.choice([-1.0, 1.0], n) * rng.uniform(1, 6, n)
    y = ((x > 0) != flip).astype(int)
    return _sign_rows(list(x), list(y), list(rng.choice(["F", "M"], n)))


def test_utility_tstr_by_hand():
    test = _sign_rows([5, 4, -3, -6, 2, -2, 3, -4], [1, 1, 0, 0, 1, 0, 0, 1], ["F", "M"] * 4)
    good = utility(_separable(400, 0), test, SIGN, 0)
    # Predictions are the sign of x: right on 6 of the 8 rows. Scores rise with x; positives
    # x = 5, 4, 2, -4 against negatives -3, -6, -2, 3 rank above 4, 4, 3 and 1 of them: AUC 12/16.
    assert good["tstr.lr.accuracy"] == pytest.approx(6 / 8)
    assert good["tstr.lr.auc"] == pytest.approx(12 / 16)
    assert good["real.majority_rate"] == pytest.approx(0.5)
    bad = utility(_separable(400, 0, flip=True), test, SIGN, 0)
    assert bad["tstr.lr.accuracy"] == pytest.approx(2 / 8) and bad["tstr.lr.auc"] == pytest.approx(4 / 16)
    # A collapsed generator (one class): the constant classifier, AUC 0.5, never a crash.
    one = _sign_rows([1.0, 2.0, -1.0], [1, 1, 1], ["F", "M", "F"])
    flat = utility(one, test, SIGN, 0)
    assert flat["tstr.lr.accuracy"] == flat["tstr.gbm.accuracy"] == pytest.approx(4 / 8)
    assert flat["tstr.lr.auc"] == pytest.approx(0.5)


def test_real_baseline_and_gbm_on_adult_like_rows():
    train, test = adult_like(3000, 0), adult_like(2000, 1)
    base = real_baseline(train, test, SPEC, 0)
    assert set(base) == {f"trtr.{m}.{k}" for m in ("lr", "gbm") for k in ("accuracy", "auc")} | {"real.majority_rate"}
    # The planted signal is learnable: both beat the majority class and rank well.
    assert base["trtr.lr.accuracy"] > base["real.majority_rate"] + 0.02
    assert base["trtr.lr.auc"] > 0.7 and base["trtr.gbm.auc"] > 0.7


# ------------------------------------------------------------------ fidelity


def test_total_variation_by_hand():
    spec = TableSpec(
        numeric=("x",), categorical=("c",), label="y", positive="1", sensitive=("s",), groups={"s": ("F", "M")},
        bins={"x": (0.0, 10.0)},
    )  # fmt: skip
    real = pd.DataFrame({"x": [-1, 5, 5, 20], "c": ["a", "a", "b", "b"], "s": ["F", "M", "F", "M"], "y": list("1010")})
    synth = pd.DataFrame({"x": [5, 5, 5, 5], "c": ["a", "a", "a", "b"], "s": ["F", "F", "F", "F"], "y": list("1111")})
    m = fidelity(synth, real, spec)
    # x: bins (<0, [0,10), >=10): real (1/4, 1/2, 1/4), synth (0, 1, 0) -> 1/2.
    assert m["fidelity.tv.x"] == pytest.approx(0.5)
    assert m["fidelity.tv.c"] == pytest.approx(0.25)  # (1/2, 1/2) against (3/4, 1/4)
    assert m["fidelity.tv.s"] == pytest.approx(0.5)
    assert m["fidelity.tv.y"] == pytest.approx(0.5)
    assert m["fidelity.tv_mean"] == pytest.approx((0.5 + 0.25 + 0.5 + 0.5) / 4)
    table = marginals(synth, real, spec)
    assert table["x"]["labels"] == ["< 0", "[0, 10)", ">= 10"] and table["x"]["real"] == [0.25, 0.5, 0.25]


def test_association_difference_by_hand():
    # Cramér's V: only (c, s) differs, 1 in the real rows (c names s), 0 in the synthetic ones
    # (a balanced 2 x 2); the other five pairs agree. Mean over 6 pairs: 1/6.
    spec = TableSpec(
        numeric=("x",), categorical=("c",), label="y", positive="1", sensitive=("s",), groups={"s": ("F", "M")},
        bins={"x": (1.5,)},
    )  # fmt: skip
    base = {"x": [1, 2] * 4, "s": list("FFFFMMMM"), "y": list("10101010")}
    real = pd.DataFrame({**base, "c": list("aaaabbbb")})
    synth = pd.DataFrame({**base, "c": list("aabbaabb")})
    m = fidelity(synth, real, spec)
    assert m["fidelity.assoc_diff"] == pytest.approx(1 / 6) and m["fidelity.assoc_max"] == pytest.approx(1.0)
    # Pearson for two numeric columns: r = 1 real, -1 synthetic -> |diff| 2 on 1 of 6 pairs.
    spec2 = TableSpec(
        numeric=("x", "z"), categorical=(), label="y", positive="1", sensitive=("s",), groups={"s": ("F", "M")},
        bins={"x": (2.5,), "z": (2.5,)},
    )  # fmt: skip
    real2 = pd.DataFrame({"x": [1, 2, 3, 4], "z": [1, 2, 3, 4], "s": list("FMFM"), "y": list("1100")})
    synth2 = real2.assign(z=[4, 3, 2, 1])
    m2 = fidelity(synth2, real2, spec2)
    assert m2["fidelity.assoc_diff"] == pytest.approx(2 / 6) and m2["fidelity.assoc_max"] == pytest.approx(2.0)
    assert fidelity(real, real, spec)["fidelity.assoc_diff"] == 0.0


# ------------------------------------------------------------------ fairness


def test_group_fairness_by_hand():
    # The TSTR classifier predicts the sign of x. Females: tp 1, fp 1, tn 2, fn 0;
    # males: tp 3, fp 1, tn 1, fn 1.
    test = _sign_rows(
        [5, 4, -3, -6, 5, 4, 3, 2, -2, -5],
        [1, 0, 0, 0, 1, 1, 1, 0, 1, 0],
        ["F"] * 4 + ["M"] * 6,
    )
    m = fairness(_separable(400, 0), test, SIGN, 0)
    assert m["fair.sex.f.accuracy"] == pytest.approx(3 / 4) and m["fair.sex.m.accuracy"] == pytest.approx(4 / 6)
    assert m["fair.sex.f.tpr"] == pytest.approx(1.0) and m["fair.sex.m.tpr"] == pytest.approx(3 / 4)
    assert m["fair.sex.f.fpr"] == pytest.approx(1 / 3) and m["fair.sex.m.fpr"] == pytest.approx(1 / 2)
    assert m["fair.sex.f.selection_rate"] == pytest.approx(1 / 2) and m["fair.sex.m.selection_rate"] == pytest.approx(
        4 / 6
    )
    assert m["fair.sex.f.n"] == 4 and m["fair.sex.m.n"] == 6
    assert m["fair.sex.dp_diff"] == pytest.approx(4 / 6 - 1 / 2)
    assert m["fair.sex.eo_diff"] == pytest.approx(max(1 - 3 / 4, 1 / 2 - 1 / 3))
    assert m["bias.sex.f.real_rate"] == pytest.approx(1 / 4) and m["bias.sex.m.real_rate"] == pytest.approx(4 / 6)
    assert m["bias.sex.real_rate_gap"] == pytest.approx(4 / 6 - 1 / 4)


def test_fairness_matches_fairlearn_on_adult_like_rows():
    synth, test = adult_like(3000, 0), adult_like(2000, 1)
    m = fairness(synth, test, SPEC, 0)
    y = (test.income == ">50K").to_numpy().astype(int)
    # The same classifier the module trains (same seed, same rows), scored by fairlearn here.
    pred = fit_score("lr", synth, test, SPEC, 0).pred
    frame = MetricFrame(
        metrics={"acc": accuracy_score, "tpr": true_positive_rate, "fpr": false_positive_rate, "sel": selection_rate},
        y_true=y,
        y_pred=pred,
        sensitive_features=test.race,
    )
    row = frame.by_group.loc["Asian-Pac-Islander"]
    assert m["fair.race.asian-pac-islander.tpr"] == pytest.approx(row["tpr"])
    assert m["fair.race.asian-pac-islander.selection_rate"] == pytest.approx(row["sel"])
    assert m["fair.race.dp_diff"] == pytest.approx(demographic_parity_difference(y, pred, sensitive_features=test.race))
    assert m["fair.race.eo_diff"] == pytest.approx(equalized_odds_difference(y, pred, sensitive_features=test.race))
    worst = (frame.by_group[["tpr", "fpr"]].max() - frame.by_group[["tpr", "fpr"]].min()).max()
    assert m["fair.race.eo_diff"] == pytest.approx(worst)  # fairlearn's worst case, by hand
    # The planted bias is in both the real and the synthetic rows (label rate by sex).
    assert m["bias.sex.male.synth_rate"] - m["bias.sex.female.synth_rate"] > 0.15
    assert m["bias.sex.male.real_rate"] == pytest.approx((y[test.sex == "Male"]).mean())


# ------------------------------------------------------------------ correction


def test_reweigh_weights_by_hand():
    rows = _sign_rows([1, 1, 1, 1, 1, 1], [1, 1, 0, 1, 0, 0], ["F", "F", "F", "M", "M", "M"])
    w = reweigh_weights(rows, SIGN, "sex")
    # P(F) = 1/2, P(y=1) = 1/2, P(F, 1) = 1/3 -> 3/4; P(F, 0) = 1/6 -> 3/2; symmetric for M.
    assert w.tolist() == pytest.approx([0.75, 0.75, 1.5, 1.5, 0.75, 0.75])
    # Weighted, the label rate is the same in both groups.
    y = np.array([1, 1, 0, 1, 0, 0])
    assert (w[:3] * y[:3]).sum() / w[:3].sum() == pytest.approx((w[3:] * y[3:]).sum() / w[3:].sum())


def test_balanced_cells_keep_the_marginals():
    rows = _sign_rows([1.0] * 10, [1, 1, 0, 0, 0, 0, 0, 0, 0, 0], ["F"] * 4 + ["M"] * 6)
    # P(F) = 0.4, P(M) = 0.6, P(1) = 0.2: n P(a) P(y) for n = 100.
    cells = balanced_cells(rows, SIGN, 100)
    assert cells == {("F", "1"): 8, ("F", "0"): 32, ("M", "1"): 12, ("M", "0"): 48}


def test_correction_shrinks_a_planted_gap():
    synth, test = adult_like(4000, 0, gap=1.5), adult_like(3000, 1, gap=1.5)
    balanced = adult_like(4000, 2, gap=1.5, balanced=True)
    m = correction(synth, balanced, test, SPEC, 0)
    before = m["correction.none.sex.dp_diff"]
    assert before > 0.2  # the planted gap shows in the TSTR classifier
    for method in ("balanced", "reweigh", "expgrad"):
        assert m[f"correction.{method}.sex.dp_diff"] <= 0.7 * before, method  # shrinks by >= 30 %
        assert m[f"correction.{method}.accuracy"] >= m["correction.none.accuracy"] - 0.15, method
    # ExponentiatedGradient meets its constraint on the training rows; on the test rows the gap is small.
    assert m["correction.expgrad.sex.dp_diff"] < 0.1
    assert 0.5 < m["correction.expgrad.auc"] <= 1.0
    assert m["correction.none.sex.eo_diff"] > m["correction.expgrad.sex.eo_diff"]
    assert "correction.balanced.accuracy" not in correction(synth, None, test, SPEC, 0)


def test_evaluate_all_is_the_union():
    synth, test = adult_like(1500, 0), adult_like(1000, 1)
    m = evaluate_all(synth, None, test, SPEC, 0)
    assert m["tstr.lr.accuracy"] == m["correction.none.accuracy"] == utility(synth, test, SPEC, 0)["tstr.lr.accuracy"]
    assert m["fair.sex.dp_diff"] == m["correction.none.sex.dp_diff"]
    assert {"fidelity.tv_mean", "fidelity.assoc_diff", "bias.race.white.synth_rate", "tstr.gbm.auc"} <= set(m)
    assert all(np.isfinite(v) for v in m.values())


# ------------------------------------------------------------------ deployment: sums


def test_site_sums_reproduce_fairlearn_on_the_pooled_rows():
    rng = np.random.default_rng(3)
    n = 3000
    race = rng.choice(SPEC.groups["race"], n, p=[0.6, 0.3, 0.1])
    sex = rng.choice(SPEC.groups["sex"], n)
    y = rng.random(n) < np.where(sex == "Male", 0.4, 0.15)
    score = np.clip(rng.normal(np.where(y, 0.6, 0.35), 0.2), 0.0, 1.0)
    pred = (score >= 0.5) | ((race == "Black") & (score >= 0.4))  # a threshold that differs by group
    total: dict[str, float] = {}
    for part in np.array_split(np.arange(n), 3):  # three sites
        site = confusion_sums(y[part], pred[part], {"sex": sex[part], "race": race[part]}, SPEC, score=score[part])
        assert tuple(site) == sum_schema(SPEC, scores=True)  # every key, in order, whatever the data
        for k, v in site.items():
            total[k] = total.get(k, 0.0) + v
    m = fairness_from_sums(total, SPEC)
    for attr, members in (("sex", sex), ("race", race)):
        dp = demographic_parity_difference(y, pred, sensitive_features=members)
        eo = equalized_odds_difference(y, pred, sensitive_features=members)
        assert m[f"fair.{attr}.dp_diff"] == pytest.approx(dp) and m[f"fair.{attr}.eo_diff"] == pytest.approx(eo)
    frame = MetricFrame(metrics=true_positive_rate, y_true=y, y_pred=pred, sensitive_features=race)
    assert m["fair.race.black.tpr"] == pytest.approx(frame.by_group["Black"])
    assert m["tstr.lr.accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["real.majority_rate"] == pytest.approx(max(y.mean(), 1 - y.mean())) and m["real.n"] == n
    assert m["bias.sex.female.real_rate"] == pytest.approx(y[sex == "Female"].mean())
    # The AUC from the summed histogram is sklearn's AUC of the scores rounded to their bins
    # (ties count half in both), and close to the AUC of the exact scores.
    binned = np.minimum(np.floor(score * 20), 19)
    assert m["tstr.lr.auc"] == pytest.approx(roc_auc_score(y, binned))
    assert m["tstr.lr.auc"] == pytest.approx(roc_auc_score(y, score), abs=0.01)
    assert "tstr.lr.auc" not in fairness_from_sums({k: v for k, v in total.items() if k.startswith("cm.")}, SPEC)


def test_sum_schema_is_public_and_suppression_hides_small_groups():
    keys = sum_schema(SPEC)
    assert len(keys) == 4 + 4 * (2 + 3) and keys[4] == "cm.sex.female.tp"
    histogram = tuple(f"roc.{side}.{i:02d}" for side in ("pos", "neg") for i in range(20))
    assert sum_schema(SPEC, scores=True)[len(keys) :] == histogram
    assert sum_bounds(SPEC, scores=True).touched == 4
    bounds = sum_bounds(SPEC)
    assert set(bounds.bounds) == set(keys) and set(bounds.bounds.values()) == {1.0} and bounds.touched == 3
    # A site without Black or Asian rows sends the same keys, as zeros.
    y = np.array([1, 0, 1, 0])
    site = confusion_sums(y, y, {"sex": np.array(["Male", "Female"] * 2), "race": np.array(["White"] * 4)}, SPEC)
    assert tuple(site) == keys and site["cm.race.black.tp"] == 0.0
    # Race: White 40, Black 8, Asian 3. With k = 5 Asian is withheld, and Black too
    # (otherwise Asian = total - White - Black); with noisy negative counts clipped at 0.
    sums = dict.fromkeys(keys, 0.0)
    sums.update({"cm.race.white.tp": 20.0, "cm.race.white.tn": 20.0, "cm.race.black.tp": 8.0})
    sums.update({"cm.race.asian-pac-islander.fn": 3.0, "cm.race.asian-pac-islander.fp": -2.0})
    m = fairness_from_sums(sums, SPEC, min_group_size=5)
    assert "fair.race.white.accuracy" in m and "fair.race.black.accuracy" not in m
    assert not any(k.startswith("fair.race.asian") for k in m) and "fair.race.dp_diff" not in m
    m1 = fairness_from_sums(sums, SPEC)
    assert m1["fair.race.asian-pac-islander.n"] == 3.0 and m1["fair.race.asian-pac-islander.tpr"] == 0.0
    assert "fair.race.asian-pac-islander.fpr" not in m1  # no negatives: undefined, left out


# ------------------------------------------------------------------ plots and the report section


@functools.cache
def _evaluation() -> dict[str, float]:
    """One seeded evaluation (the fairness corrections fit models: seconds), shared read-only."""
    return evaluate_all(adult_like(1500, 0), adult_like(1500, 2, balanced=True), adult_like(1000, 1), SPEC, 0)


def _rounds(n: int = 3) -> list[dict[str, Any]]:
    """metrics.jsonl lines of a short run: the same evaluation, its gaps shrinking by round."""
    base = _evaluation()
    tests = [{k: (v / r if k.endswith("dp_diff") else v) for k, v in base.items()} for r in range(1, n + 1)]
    tests[0].update({"trtr.lr.accuracy": 0.85, "trtr.lr.auc": 0.9})  # the anchor, reported once
    return [{"round": r, "test": test, "site_val": {}} for r, test in enumerate(tests, start=1)]


def _is_png(path: Path | None) -> bool:
    return path is not None and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_draw_from_round_metrics(tmp_path):
    lines = _rounds()
    last = lines[-1]["test"]
    assert attributes(last) == ["sex", "race"] and groups(last, "sex") == ["female", "male"]
    assert methods(last) == ["none", "balanced", "reweigh", "expgrad"]
    assert _is_png(plot_group_rates(lines, "sex", tmp_path / "rates.png"))
    assert _is_png(plot_correction(last, tmp_path / "correction.png"))
    assert _is_png(plot_utility(lines, tmp_path / "utility.png"))
    assert _is_png(plot_gaps(lines, "sex", tmp_path / "gaps.png"))
    assert plot_gaps(lines, "age", tmp_path / "no-gaps.png") is None
    table = marginals(adult_like(500, 0), adult_like(500, 1), SPEC)
    assert _is_png(plot_marginals(table, tmp_path / "marginals.png"))
    # Nothing to draw: None, and no file.
    assert plot_group_rates([{"round": 1, "test": {"loss": 1.0}}], "sex", tmp_path / "none.png") is None
    assert plot_correction({}, tmp_path / "none2.png") is None and not (tmp_path / "none2.png").exists()


def test_marginals_file_round_trip(tmp_path):
    table = marginals(adult_like(300, 0), adult_like(300, 1), SPEC)
    path = write_marginals(table, tmp_path)
    assert path.name == MARGINALS_FILE and read_marginals(tmp_path) == table
    assert (path.stat().st_mode & 0o077) == 0  # private: it holds the real rows' frequencies
    path.write_text('{"age": {"labels": 3}}')
    assert read_marginals(tmp_path) is None
    path.write_text("not json")
    assert read_marginals(tmp_path) is None


def test_report_section(tmp_path):
    assert tabular_section(tmp_path, [{"round": 1, "test": {"loss": 0.5}}]) == []
    lines = _rounds()
    write_marginals(marginals(adult_like(300, 0), adult_like(300, 1), SPEC), tmp_path)
    page = "\n".join(tabular_section(tmp_path, lines))
    last = lines[-1]["test"]
    assert f"{last['tstr.lr.accuracy']:.3f}" in page and "0.850" in page  # TSTR, and the anchor from round 1
    assert "Fairness by sex" in page and "Fairness by race" in page and "asian-pac-islander" in page
    assert f"{last['fair.sex.female.selection_rate']:.3f}" in page
    # Utility per round; per attribute the rates and the gaps per round; the correction bars; the marginals.
    assert page.count("data:image/png;base64,") == 1 + 2 * 2 + 1 + 1
    # The correction table: the gap change of ExpGrad against none, relative, as computed here.
    change = (last["correction.expgrad.sex.dp_diff"] - last["correction.none.sex.dp_diff"]) / last[
        "correction.none.sex.dp_diff"
    ]
    assert f"{change:+.0%}" in page and "ExpGrad (DP)" in page
    points = 100 * (last["correction.expgrad.accuracy"] - last["correction.none.accuracy"])
    assert f"{points:+.1f} pt" in page
    met = change <= -0.3 and points >= -2
    assert ('<td class="">yes</td>' in page) or not met
    # Without the marginals file: one picture fewer.
    (tmp_path / MARGINALS_FILE).unlink()
    assert "\n".join(tabular_section(tmp_path, lines)).count("data:image/png;base64,") == 6


def test_report_correction_table_judges_the_goal(tmp_path):
    # By hand: reweighing halves the DP gap by sex for 1 point (goal met); ExpGrad removes
    # it for 5 points (not met); none is the reference.
    test = {
        "fair.sex.dp_diff": 0.2,
        "correction.none.accuracy": 0.85,
        "correction.none.sex.dp_diff": 0.2,
        "correction.reweigh.accuracy": 0.84,
        "correction.reweigh.sex.dp_diff": 0.1,
        "correction.expgrad.accuracy": 0.80,
        "correction.expgrad.sex.dp_diff": 0.01,
    }
    page = "\n".join(tabular_section(tmp_path, [{"round": 1, "test": test}]))
    rows = {r.split("</td>")[0].rsplit(">", 1)[1]: r for r in page.split("<tr>")[1:] if "<td" in r}
    assert rows["reweighing"].count("yes") == 1 and "-1.0 pt" in rows["reweighing"] and "-50%" in rows["reweighing"]
    assert "no</td>" in rows["ExpGrad (DP)"] and "-5.0 pt" in rows["ExpGrad (DP)"] and "-95%" in rows["ExpGrad (DP)"]
    assert "yes" not in rows["none (TSTR)"] and "no</td>" not in rows["none (TSTR)"]


@pytest.mark.skipif(
    not hasattr(html_report, "tabular_section"), reason="server/html_report.py does not call tabular_section yet"
)
def test_privfed_report_renders_the_tabular_section(tmp_path):
    from simulations.cli import main as cli
    from tests.unit.test_report import _with_metrics

    run = _with_metrics(tmp_path)  # a VAE-shaped run: ledger, rounds, audit
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    with (run / "metrics.jsonl").open("w") as fh:
        for m, tab in zip(lines, _rounds(len(lines))):
            m["test"].update(tab["test"])
            fh.write(json.dumps(m) + "\n")
    write_marginals(marginals(adult_like(300, 0), adult_like(300, 1), SPEC), run)
    assert cli(["report", str(run)]) == 0
    page = (run / "report.html").read_text()
    assert "Fairness by sex" in page and "Bias correction: before and after" in page and "goal met (sex)" in page
    # The report's own three plots, and the section's seven.
    assert page.count('src="data:image/png;base64,') >= 3 + 7
    assert "tstr.lr.accuracy" not in page  # dotted keys stay out of the generic final-metrics table
