"""quality.png: a task's further test metrics per round (``Task.plot_metrics``), one per axis.

Each metric gets its own axis, titled with what it measures and which way is better, and
a y label with its unit or range: the metrics a task plots have different units (a VAE's
``class_tv`` is a distance in [0, 1], its ``recon_disparity.ratio`` a ratio >= 1), so one
shared "value" axis said nothing. The figure's title says where the numbers were measured
(the run's test source, :func:`server.report.eval_source`), never a split the task lacks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from common.plots import Figure, Panel, panels_figure


@dataclass(frozen=True)
class MetricLabel:
    """How a plotted metric is shown: what it measures, its axis, and which way is better."""

    what: str
    axis: str
    better: str


# Every metric some task lists in ``plot_metrics`` (tests/unit/test_report_pictures.py checks
# that none is missing). A metric without an entry is still drawn, under its own name.
METRIC_LABELS: dict[str, MetricLabel] = {
    # Generated images (VAE, GAN), against the real images of the server's test split.
    "class_tv": MetricLabel(
        "class balance of generated images: total-variation distance of their classes "
        "(by the evaluation classifier) from the real images' class shares",
        "TV distance (0 to 1)",
        "lower is better",
    ),
    "tstr": MetricLabel(
        "train on synthetic, test on real: accuracy on real images of a classifier trained on generated ones",
        "accuracy (0 to 1)",
        "higher is better",
    ),
    # VAE: reconstruction error across digit classes.
    "recon_disparity.ratio": MetricLabel(
        "reconstruction disparity across classes: worst class's mean reconstruction NLL / best class's",
        "ratio (1 = every class equal)",
        "closer to 1 is better",
    ),
    # Recommender: fairness and popularity bias on the held-out ratings at the sites.
    "unfairness.gender.value": MetricLabel(
        "Yao & Huang value unfairness, gender F vs M: mean over items of |mean signed error for F - for M|",
        "rating points",
        "lower is better",
    ),
    "unfairness.gender.non_parity": MetricLabel(
        "non-parity, gender F vs M: |mean prediction for F's ratings - for M's|",
        "rating points",
        "lower is better",
    ),
    "pop_lift": MetricLabel(
        "popularity lift: mean popularity of the top-k recommended items / of the held-out items",
        "ratio (1 = no popularity bias)",
        "closer to 1 is better",
    ),
    "coverage_site_mean": MetricLabel(
        "catalogue coverage: share of the items in some user's top-k list at a site, mean over the sites "
        "(a lower bound on the federation's)",
        "share of items (0 to 1)",
        "higher is better",
    ),
    # Tabular generator: utility and fidelity of the synthetic table against real rows.
    "tstr.lr.accuracy": MetricLabel(
        "train on synthetic, test on real: logistic regression accuracy on real rows",
        "accuracy (0 to 1)",
        "higher is better",
    ),
    "tstr.gbm.auc": MetricLabel(
        "train on synthetic, test on real: gradient boosting AUC on real rows", "AUC (0.5 = chance)", "higher is better"
    ),
    "fidelity.tv_mean": MetricLabel(
        "marginal fidelity: total-variation distance of each column, real vs synthetic, mean over columns",
        "TV distance (0 to 1)",
        "lower is better",
    ),
}


def label_for(name: str) -> MetricLabel:
    """The metric's label; an unknown metric is named as it is (with ``$`` shown literally)."""
    plain = name.replace("$", r"\$")  # matplotlib reads $...$ as maths
    return METRIC_LABELS.get(name, MetricLabel(plain, plain, "see the task's documentation"))


def quality_figure(
    metrics: Sequence[Mapping[str, Any]], names: Sequence[str], source: str, *, width: int = 95
) -> Figure | None:
    """One axis per metric in ``names`` that some round measured; None when none was.

    ``source``: where the test metrics come from (a metrics.jsonl line's ``test_source``).
    """
    panels = []
    for name in names:
        points = [(_test_round(m), float(m["test"][name])) for m in metrics if name in (m.get("test") or {})]
        if not points:
            continue
        label = label_for(name)
        panels.append(
            Panel(
                title=_wrap(f"{label.what} ({label.better})", width),
                ylabel=label.axis,
                xs=[x for x, _ in points],
                ys=[y for _, y in points],
            )
        )
    if not panels:
        return None
    where = source.replace("$", r"\$") or "the run's test data"
    return panels_figure(panels, title=_wrap(f"Further test metrics per round, measured on: {where}", width))


def _test_round(m: Mapping[str, Any]) -> int:
    """The round whose model a line's test metrics describe (the round before, under SecAgg+)."""
    return int(m.get("test_model_round", m["round"]))


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width)) or text
