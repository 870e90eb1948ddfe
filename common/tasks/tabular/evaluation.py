"""From encoded rows to what the metrics read: data frames, the TableSpec, group names.

Everything here is fixed by the schema (public): column names, category lists, bin edges. The metrics themselves live in
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
        # Inner edges: the declared range's ends add no cell (every value lies inside it).
        bins={c.name: c.bins[1:-1] for c in s.features if c.role == "numeric"},
        categories={c.name: c.categories for c in s.features if c.role == "categorical"},
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


def group_arrays(layout: Layout, x: torch.Tensor) -> dict[str, np.ndarray]:
    """Each sensitive column's declared group name per row."""
    xs = x.detach().cpu().numpy()
    slots = layout.slots()
    return {
        c.name: np.asarray(c.categories, dtype=object)[xs[:, slots[c.name]].astype(np.int64)] for c in layout.sensitive
    }
