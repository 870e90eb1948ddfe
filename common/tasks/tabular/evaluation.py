"""From encoded rows to what the metrics read: data frames, the TableSpec, the sites' classifier.

Everything here is fixed by the schema (public): column names, category lists, and the
numeric ranges that scale the classifier's inputs. The metrics themselves live in
:mod:`common.metrics.tabular` (scored by the server on its own test split, or summed from
the sites' confusion counts in a deployment).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from common.data.tabular import Layout, decode_numeric

if TYPE_CHECKING:
    import pandas as pd

    from common.metrics.tabular import TableSpec


def table_spec(layout: Layout) -> TableSpec:
    """The metrics' view of the schema (numeric and categorical features, label, sensitive groups)."""
    from common.metrics.tabular import TableSpec

    s = layout.schema
    return TableSpec(
        numeric=tuple(c.name for c in s.features if c.role == "numeric"),
        categorical=tuple(c.name for c in s.features if c.role == "categorical"),
        label=s.label.name,
        positive=s.label.positive,
        sensitive=tuple(c.name for c in s.sensitive),
        groups={c.name: c.categories for c in s.sensitive},
    )


def to_frame(layout: Layout, x: torch.Tensor, y: torch.Tensor) -> pd.DataFrame:
    """Encoded rows as a data frame of values (numeric decoded exactly; categories by name)."""
    import pandas as pd

    xs, ys = x.detach().cpu().numpy(), y.detach().cpu().numpy()
    slots = layout.slots()
    cols: dict[str, object] = {}
    for c in (*layout.features, *layout.sensitive):
        s = slots[c.name]
        if c.role == "numeric":
            cols[c.name] = decode_numeric(c, xs[:, s], xs[:, s + 1])
        else:
            cols[c.name] = np.asarray(c.categories, dtype=object)[xs[:, s].astype(np.int64)]
    label = layout.schema.label
    cols[label.name] = np.asarray(label.categories, dtype=object)[ys.astype(np.int64)]
    return pd.DataFrame(cols)


def design_matrix(layout: Layout, x: torch.Tensor) -> np.ndarray:
    """The sites' classifier inputs: one-hot categories (features and sensitive columns) and
    numeric values scaled by their declared range to [0, 1] (public scaling, no fitted scaler)."""
    xs = x.detach().cpu().numpy()
    slots = layout.slots()
    parts = []
    for c in (*layout.features, *layout.sensitive):
        s = slots[c.name]
        if c.role == "numeric":
            v = decode_numeric(c, xs[:, s], xs[:, s + 1])
            parts.append(((v - c.bins[0]) / (c.bins[-1] - c.bins[0]))[:, None])
        else:
            parts.append(np.eye(len(c.categories))[xs[:, s].astype(np.int64)])
    return np.concatenate(parts, axis=1)


def positive_index(layout: Layout) -> int:
    label = layout.schema.label
    return label.categories.index(label.positive)


def fit_site_classifier(layout: Layout, x: torch.Tensor, y: torch.Tensor, seed: int) -> object:
    """Logistic regression on synthetic rows (drawn from the released model with a fixed seed,
    so every site fits the same classifier and their confusion counts add up)."""
    from sklearn.linear_model import LogisticRegression

    target = (y.cpu().numpy() == positive_index(layout)).astype(np.int64)
    if len(np.unique(target)) < 2:
        return ConstantClassifier(int(target[0]) if len(target) else 0)
    return LogisticRegression(max_iter=500, random_state=seed).fit(design_matrix(layout, x), target)


class ConstantClassifier:
    """What a model that generates one label class predicts (a classifier cannot be fitted)."""

    def __init__(self, value: int) -> None:
        self.value = value

    def predict(self, features: np.ndarray) -> np.ndarray:
        return np.full(len(features), self.value, dtype=np.int64)


def group_arrays(layout: Layout, x: torch.Tensor) -> dict[str, np.ndarray]:
    """Each sensitive column's group names per row."""
    xs = x.detach().cpu().numpy()
    slots = layout.slots()
    return {
        c.name: np.asarray(c.categories, dtype=object)[xs[:, slots[c.name]].astype(np.int64)] for c in layout.sensitive
    }
