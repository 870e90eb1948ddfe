"""Pictures people would rather look at than read: sample grids and per-round curves."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def image_grid(images: np.ndarray, path: Path, title: str | None = None, cols: int | None = None) -> Path:
    """Save (N, H, W) images in [0, 1] as a grid PNG: ``cols`` per row (default: square-ish).
    ``title``: a caption above the grid (the privacy claim the samples were made under)."""
    n = images.shape[0]
    cols = cols or int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    head = 0.18 * (title.count("\n") + 1) + 0.1 if title else 0.0  # inches for the caption's lines
    height = rows * 0.6 + head
    fig, axes = plt.subplots(rows, cols, figsize=(max(cols * 0.6, 4.0 if title else 0.0), height))
    for i, ax in enumerate(np.atleast_1d(axes).ravel()):
        ax.axis("off")
        if i < n:
            ax.imshow(images[i], cmap="gray_r", vmin=0.0, vmax=1.0, interpolation="nearest")
    if title:
        fig.suptitle(title, fontsize=8)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - (head + 0.05) / height, wspace=0.05, hspace=0.05)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def line_figure(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    hlines: Mapping[str, float] | None = None,
) -> Figure:
    """One line per named (x, y) series, plus optional labelled horizontal lines, on one axis.

    Returned unsaved, so that a test can read its title and labels (:func:`save_figure`)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, (xs, ys) in series.items():
        ax.plot(list(xs), list(ys), marker="o", markersize=3, label=label)
    for label, y in (hlines or {}).items():
        if math.isfinite(y):
            ax.axhline(y, linestyle="--", color="gray", linewidth=1)
            ax.annotate(label, (ax.get_xlim()[0], y), fontsize=8, va="bottom", color="gray")
    if xlabel == "round":
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if 1 < len(series) <= 12:
        ax.legend(fontsize=7, ncol=2)
    return fig


@dataclass(frozen=True)
class Panel:
    """One axis of :func:`panels_figure`: one metric, its own title, y label and scale."""

    title: str
    ylabel: str
    xs: Sequence[float]
    ys: Sequence[float]


def panels_figure(panels: Sequence[Panel], *, title: str, xlabel: str = "round") -> Figure:
    """One metric per axis, stacked, sharing x: metrics of different units and ranges never
    share a y axis (one chart with a TV distance and a ratio on the same scale says nothing)."""
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 0.6 + 2.3 * len(panels)), sharex=True, squeeze=False)
    for ax, p in zip(axes[:, 0], panels, strict=True):
        ax.plot(list(p.xs), list(p.ys), marker="o", markersize=3)
        ax.set_title(p.title, fontsize=9, loc="left")
        ax.set_ylabel(p.ylabel, fontsize=8)
        ax.grid(alpha=0.3)
        if xlabel == "round":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[-1, 0].set_xlabel(xlabel)
    fig.suptitle(title, fontsize=10)
    return fig


def save_figure(fig: Figure, path: Path, dpi: int = 110) -> Path:
    """Lay out, save as PNG and close ``fig``."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def line_plot(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: Path,
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    hlines: Mapping[str, float] | None = None,
) -> Path:
    """:func:`line_figure`, saved to ``path``."""
    return save_figure(line_figure(series, title=title, xlabel=xlabel, ylabel=ylabel, hlines=hlines), path)
