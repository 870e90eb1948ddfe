"""The tabular task's part of ``privfed report``: utility, fidelity, fairness by group, bias
correction before/after, and the marginals, as tables and embedded plots.

:func:`server.html_report.write_report` calls :func:`tabular_section` with the run's
metrics; it returns [] for a run of another task, so the call needs no condition. Every
number comes from metrics.jsonl (the task's keys, :mod:`common.metrics.tabular`) and the
marginals file the task saved (:data:`common.metrics.tabular_plots.MARGINALS_FILE`).
Values are the last round that reported each key.
"""

from __future__ import annotations

import base64
import html
import math
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from common.metrics.tabular_plots import (
    METHOD_NAMES,
    attributes,
    groups,
    methods,
    plot_correction,
    plot_gaps,
    plot_group_rates,
    plot_marginals,
    plot_utility,
    read_marginals,
)

CLASSIFIER_NAMES = {"lr": "logistic regression", "gbm": "gradient boosting"}


def latest(metrics: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Every test key at the last round that reported it (TRTR anchors may be reported once)."""
    out: dict[str, float] = {}
    for m in metrics:
        for k, v in (m.get("test") or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[k] = float(v)
    return out


def tabular_section(run_dir: Path, metrics: Sequence[Mapping[str, Any]]) -> list[str]:
    """HTML parts for the tabular task (headings, tables, images); [] when the run has none of its metrics."""
    last = latest(metrics)
    if not any(k.startswith(("tstr.", "fair.", "correction.")) for k in last):
        return []
    marginals = read_marginals(run_dir)
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        images: dict[str, str] = {}
        if p := plot_utility(metrics, t / "utility.png"):
            images["utility"] = _b64(p)
        for attr in attributes(last):
            if p := plot_group_rates(metrics, attr, t / f"rates-{attr}.png"):
                images[f"rates-{attr}"] = _b64(p)
            if p := plot_gaps(metrics, attr, t / f"gaps-{attr}.png"):
                images[f"gaps-{attr}"] = _b64(p)
        if p := plot_correction(last, t / "correction.png"):
            images["correction"] = _b64(p)
        if marginals and (p := plot_marginals(marginals, t / "marginals.png")):
            images["marginals"] = _b64(p)

    parts = ["<h2>Synthetic table: utility (train on synthetic, test on real)</h2>"]
    rows = []
    for kind, name in CLASSIFIER_NAMES.items():
        cells = [_v(last.get(f"{p}.{kind}.{k}")) for p in ("tstr", "trtr") for k in ("accuracy", "auc")]
        if any(c != "–" for c in cells):
            rows.append([name, *cells])
    if rows:
        parts.append(_table(["classifier", "TSTR accuracy", "TSTR AUC", "TRTR accuracy", "TRTR AUC"], rows))
    if "real.majority_rate" in last:
        parts.append(
            f'<p class="note">Majority-class rate of the real test rows: {last["real.majority_rate"]:.3f} '
            "(a generator whose classifier sits there has taught it nothing). TRTR: the same classifier "
            "trained on real rows, the anchor.</p>"
        )
    if "utility" in images:
        parts.append(_img(images["utility"], "TSTR accuracy and AUC per round"))

    tv = {k[len("fidelity.tv.") :]: v for k, v in last.items() if k.startswith("fidelity.tv.")}
    if tv:
        parts.append("<h2>Fidelity</h2>")
        summary = [
            ["mean total variation over columns", _v(last.get("fidelity.tv_mean"))],
            ["mean |association difference| (Pearson r, Cramér's V)", _v(last.get("fidelity.assoc_diff"))],
            ["largest |association difference|", _v(last.get("fidelity.assoc_max"))],
        ]
        parts.append(_table(["measure", "value"], [r for r in summary if r[1] != "–"]))
        parts.append(_table(["column", "total variation"], [[c, _v(v)] for c, v in tv.items()]))
    if "marginals" in images:
        parts.append(_img(images["marginals"], "per-column marginals, real against synthetic"))

    for attr in attributes(last):
        parts.append(f"<h2>Fairness by {html.escape(attr)} (TSTR logistic regression on real rows)</h2>")
        header = ["group", "n", "accuracy", "TPR", "FPR", "selection rate", "synthetic label rate", "real label rate"]
        stats = ("n", "accuracy", "tpr", "fpr", "selection_rate")
        body = [
            [
                g,
                *[_v(last.get(f"fair.{attr}.{g}.{s}"), 0 if s == "n" else 3) for s in stats],
                _v(last.get(f"bias.{attr}.{g}.synth_rate")),
                _v(last.get(f"bias.{attr}.{g}.real_rate")),
            ]
            for g in groups(last, attr)
        ]
        parts.append(_table(header, body))
        parts.append(
            f"<p>Demographic-parity difference {_v(last.get(f'fair.{attr}.dp_diff'))}, "
            f"equalised-odds difference {_v(last.get(f'fair.{attr}.eo_diff'))}; label-rate gap between groups: "
            f"synthetic {_v(last.get(f'bias.{attr}.synth_rate_gap'))}, "
            f"real {_v(last.get(f'bias.{attr}.real_rate_gap'))}.</p>"
        )
        if f"rates-{attr}" in images:
            parts.append(_img(images[f"rates-{attr}"], f"per-group rates by {attr} per round"))

    names = methods(last)
    if names:
        attrs = attributes(last)
        parts.append("<h2>Bias correction: before and after</h2>")
        header = ["method", "accuracy", "Δ accuracy", "AUC"]
        for a in attrs:
            header += [f"DP gap ({a})", f"DP gap change ({a})", f"EO gap ({a})"]
        if attrs:
            header.append(f"goal met ({attrs[0]})")
        body = []
        base_acc = last.get("correction.none.accuracy")
        for m in names:
            acc = last.get(f"correction.{m}.accuracy")
            reference = m == "none"
            row = [METHOD_NAMES.get(m, m), _v(acc), "–" if reference else _delta(acc, base_acc, points=True)]
            row.append(_v(last.get(f"correction.{m}.auc")))
            for a in attrs:
                dp = last.get(f"correction.{m}.{a}.dp_diff")
                row += [
                    _v(dp),
                    "–" if reference else _delta(dp, last.get(f"correction.none.{a}.dp_diff")),
                    _v(last.get(f"correction.{m}.{a}.eo_diff")),
                ]
            if attrs:
                dp = last.get(f"correction.{m}.{attrs[0]}.dp_diff")
                base_dp = last.get(f"correction.none.{attrs[0]}.dp_diff")
                row.append("–" if reference else _goal(acc, base_acc, dp, base_dp))
            body.append(row)
        parts.append(_table(header, body))
        parts.append(
            '<p class="note">Every row is a logistic regression tested on the real rows. none: trained on the '
            "synthetic rows; balanced: on rows drawn by conditional sampling over sensitive attribute × label; "
            "reweighing: Kamiran &amp; Calders weights on the synthetic rows; ExpGrad: fairlearn's "
            "ExponentiatedGradient under demographic parity. Δ accuracy in points against none; gap change "
            "relative to none. Goal: the DP gap −30 % or better, for at most 2 points of accuracy.</p>"
        )
        if "correction" in images:
            parts.append(_img(images["correction"], "bias correction before and after"))
        for a in attrs:
            if f"gaps-{a}" in images:
                parts.append(_img(images[f"gaps-{a}"], f"gaps by {a} per round, before and after correction"))
    return parts


def _goal(acc: float | None, base_acc: float | None, dp: float | None, base_dp: float | None) -> str:
    """The issue's goal for a correction: the DP gap at least 30 % smaller, for at most 2 points of accuracy."""
    if acc is None or base_acc is None or dp is None or base_dp is None:
        return "–"
    return "yes" if dp <= 0.7 * base_dp and acc >= base_acc - 0.02 else "no"


# The page's table and image markup, as server.html_report writes them (same CSS classes). Not
# imported from there: server.html_report imports this module, and the import graph has no cycles
# (tests/unit/test_imports.py counts lazy imports too).
def _table(header: list[str], rows: list[list[Any]]) -> str:
    def cells(tag: str, values: list[Any]) -> str:
        return "".join(
            f'<{tag} class="{"l" if i == 0 else ""}">{html.escape(str(v))}</{tag}>' for i, v in enumerate(values)
        )

    body = "".join(f"<tr>{cells('td', r)}</tr>" for r in rows)
    return f"<table><tr>{cells('th', header)}</tr>{body}</table>"


def _img(b64: str, alt: str) -> str:
    return f'<p><img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}"></p>'


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def _v(value: float | None, digits: int = 3) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    return f"{value:.{digits}f}"


def _delta(value: float | None, base: float | None, points: bool = False) -> str:
    """``value`` against ``base``: in points of accuracy, or as a relative change of a gap."""
    if value is None or base is None or not (math.isfinite(value) and math.isfinite(base)):
        return "–"
    if points:
        return f"{100 * (value - base):+.1f} pt"
    return f"{(value - base) / base:+.0%}" if base > 0 else "–"
