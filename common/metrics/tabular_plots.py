"""The tabular task's pictures: per-group rates per round, the correction before/after, marginals.

Drawn from what a run writes: the rounds' test metrics (metrics.jsonl, keys of
:mod:`common.metrics.tabular`) and the marginal frequencies the task saves with
:func:`write_marginals`. Headless (matplotlib's Agg backend, set in :mod:`common.plots`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from common.deploy.fileio import write_text_atomically
from common.plots import line_plot, plt

# The file, in the run directory, that holds the last evaluation's marginals (:func:`write_marginals`).
MARGINALS_FILE = "tabular-marginals.json"
Series = tuple[list[float], list[float]]  # (rounds, values) of one line
METHOD_NAMES = {
    "none": "none (TSTR)",
    "balanced": "balanced sampling",
    "reweigh": "reweighing",
    "expgrad": "ExpGrad (DP)",
}


# ------------------------------------------------------------------ keys


def attributes(test: Mapping[str, Any]) -> list[str]:
    """The sensitive attributes (as slugs) that a round's metrics report gaps for, in key order."""
    found = (re.fullmatch(r"fair\.([a-z0-9-]+)\.dp_diff", k) for k in test)
    return list(dict.fromkeys(m.group(1) for m in found if m))


def groups(test: Mapping[str, Any], attr: str) -> list[str]:
    """The groups (slugs) of ``attr`` with a per-group rate or a label rate, in key order."""
    pattern = re.compile(rf"(?:fair|bias)\.{re.escape(attr)}\.([a-z0-9-]+)\.[a-z_]+")
    found = (pattern.fullmatch(k) for k in test)
    return list(dict.fromkeys(m.group(1) for m in found if m))


def methods(test: Mapping[str, Any]) -> list[str]:
    """The correction methods a round reports, in key order (``none`` first when present)."""
    found = (re.fullmatch(r"correction\.([a-z0-9-]+)\.accuracy", k) for k in test)
    return list(dict.fromkeys(m.group(1) for m in found if m))


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# ------------------------------------------------------------------ plots


def plot_group_rates(
    metrics: Sequence[Mapping[str, Any]], attr: str, path: Path, rate: str = "selection_rate"
) -> Path | None:
    """Per group of ``attr``: the TSTR classifier's ``rate`` and the synthetic rows' label rate,
    per round; the real label rates as labelled horizontal lines. None when no round has them."""
    keys: dict[str, str] = {}
    real: dict[str, float] = {}
    for m in metrics:
        test = m.get("test") or {}
        for g in groups(test, attr):
            keys[f"{g}: classifier {rate.replace('_', ' ')}"] = f"fair.{attr}.{g}.{rate}"
            keys[f"{g}: synthetic label rate"] = f"bias.{attr}.{g}.synth_rate"
            if _finite(test.get(f"bias.{attr}.{g}.real_rate")):
                real[f"{g}: real label rate"] = float(test[f"bias.{attr}.{g}.real_rate"])
    series = _per_round(metrics, keys)
    if not series:
        return None
    return line_plot(
        dict(sorted(series.items())),
        path,
        title=f"Per-group rates by {attr}, per round",
        xlabel="round",
        ylabel="rate",
        hlines=real,
    )


def _per_round(metrics: Sequence[Mapping[str, Any]], keys: Mapping[str, str]) -> dict[str, Series]:
    """``{name: (rounds, values)}`` of each test key in ``keys`` (name -> key), over the rounds that have it."""
    series: dict[str, Series] = {}
    for m in metrics:
        test = m.get("test") or {}
        for name, key in keys.items():
            if _finite(test.get(key)):
                xs, ys = series.setdefault(name, ([], []))
                xs.append(float(m.get("round", len(xs) + 1)))
                ys.append(float(test[key]))
    return series


def plot_utility(metrics: Sequence[Mapping[str, Any]], path: Path) -> Path | None:
    """TSTR accuracy and AUC of both classifiers per round; the TRTR anchors and the majority
    rate as labelled horizontal lines. None when no round has a TSTR number."""
    pairs = [(kind, what) for kind in ("lr", "gbm") for what in ("accuracy", "auc")]
    series = _per_round(metrics, {f"TSTR {k} {w}": f"tstr.{k}.{w}" for k, w in pairs})
    if not series:
        return None
    last: dict[str, float] = {}
    for m in metrics:
        last.update({k: float(v) for k, v in (m.get("test") or {}).items() if _finite(v)})
    pairs = [(kind, what) for kind in ("lr", "gbm") for what in ("accuracy", "auc")]
    lines = {f"TRTR {k} {w}": last[f"trtr.{k}.{w}"] for k, w in pairs if f"trtr.{k}.{w}" in last}
    if "real.majority_rate" in last:
        lines["majority class"] = last["real.majority_rate"]
    return line_plot(series, path, title="Utility per round (train synthetic, test real)", xlabel="round",
                     ylabel="accuracy / AUC", hlines=lines)  # fmt: skip


def plot_gaps(metrics: Sequence[Mapping[str, Any]], attr: str, path: Path) -> Path | None:
    """The DP and EO gaps by ``attr`` per round, for each correction method (before: ``none``)."""
    names = list(dict.fromkeys(n for m in metrics for n in methods(m.get("test") or {})))
    keys = {f"{METHOD_NAMES.get(n, n)}: {g.upper()} gap": f"correction.{n}.{attr}.{g}_diff" for n in names
            for g in ("dp", "eo")}  # fmt: skip
    series = _per_round(metrics, keys)
    if not series:
        return None
    return line_plot(series, path, title=f"Gaps by {attr} per round, before and after correction", xlabel="round",
                     ylabel="difference between groups")  # fmt: skip


def plot_correction(test: Mapping[str, Any], path: Path) -> Path | None:
    """Bars per correction method: TSTR accuracy, and each attribute's DP and EO gaps. None
    when the metrics have no correction."""
    names = methods(test)
    if not names:
        return None
    attrs = [a for a in attributes(test) if any(f"correction.{m}.{a}.dp_diff" in test for m in names)]
    panels = [("accuracy", [f"correction.{m}.accuracy" for m in names])]
    for a in attrs:
        panels.append((f"DP gap by {a}", [f"correction.{m}.{a}.dp_diff" for m in names]))
        panels.append((f"EO gap by {a}", [f"correction.{m}.{a}.eo_diff" for m in names]))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6), squeeze=False)
    labels = [METHOD_NAMES.get(m, m) for m in names]
    colours = [f"C{i}" for i in range(len(names))]
    for ax, (title, keys) in zip(axes[0], panels):
        values = [float(test[k]) if _finite(test.get(k)) else 0.0 for k in keys]
        bars = ax.bar(range(len(names)), values, color=colours)
        ax.bar_label(bars, fmt="%.3f", fontsize=7)
        ax.set_xticks(range(len(names)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
        if title == "accuracy":
            low = min(values)
            ax.set_ylim(max(0.0, low - 0.1), min(1.0, max(values) + 0.05))
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Bias correction: before (none) and after", fontsize=10)
    return _save(fig, path, 110)


def plot_marginals(table: Mapping[str, Mapping[str, Any]], path: Path, max_columns: int = 16) -> Path | None:
    """Real against synthetic frequency of every column (:func:`common.metrics.tabular.marginals`),
    side-by-side bars, one small panel per column (the first ``max_columns``)."""
    cols = list(table)[:max_columns]
    if not cols:
        return None
    ncols = min(4, len(cols))
    nrows = math.ceil(len(cols) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.3 * ncols, 2.6 * nrows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, col in zip(axes.ravel(), cols):
        m = table[col]
        labels, real, synth = list(m["labels"]), list(m["real"]), list(m["synth"])
        ax.axis("on")
        xs = range(len(labels))
        ax.bar([x - 0.2 for x in xs], real, width=0.4, label="real", color="C0")
        ax.bar([x + 0.2 for x in xs], synth, width=0.4, label="synthetic", color="C1")
        tv = 0.5 * sum(abs(a - b) for a, b in zip(real, synth))
        ax.set_title(f"{_plain(col)} (TV {tv:.3f})", fontsize=8)
        ax.set_xticks(list(xs), [_plain(str(label)[:14]) for label in labels], rotation=60, ha="right", fontsize=6)
        ax.tick_params(axis="y", labelsize=6)
    axes.ravel()[0].legend(fontsize=7)
    fig.suptitle("Marginals: real against synthetic", fontsize=10)
    return _save(fig, path, 100)


# ------------------------------------------------------------------ files


def write_marginals(table: Mapping[str, Mapping[str, Any]], run_dir: Path) -> Path:
    """Save the marginals where the report finds them (``run_dir / MARGINALS_FILE``), atomically."""
    path = Path(run_dir) / MARGINALS_FILE
    write_text_atomically(path, json.dumps(table, indent=1, sort_keys=False))
    return path


def read_marginals(run_dir: Path) -> dict[str, dict[str, Any]] | None:
    """The saved marginals, or None when the run has none or the file is not the expected shape."""
    path = Path(run_dir) / MARGINALS_FILE
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(obj, dict):
        return None
    keys = ("labels", "real", "synth")
    ok = all(isinstance(v, dict) and all(isinstance(v.get(k), list) for k in keys) for v in obj.values())
    return obj if ok else None


def _plain(text: str) -> str:
    """Declared names as literal text: matplotlib reads ``$...$`` as maths (and fails on bad TeX)."""
    return text.replace("$", r"\$")


def _save(fig: Any, path: Path, dpi: int) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
