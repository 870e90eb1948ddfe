"""Layers that never train (a GAN's random features, a VAE adapter's random base) stay as
initialised: the server refuses a plain update that moves them and zeroes them in every
aggregate.

Not a privacy stage (honest sites send exactly 0 there: no gradient reaches a frozen
parameter). It protects the model: without it one site could rewrite a frozen layer for
good, since honest sites never train it back, and under SecAgg+ nobody could see it.
First in the list, so that at the server, where stages run in reverse, its check is the last
and its release comes after client-level DP's noise (which it must not let into a frozen
layer either).
"""

from __future__ import annotations

import numpy as np

from common.pipeline.base import Aggregate, ServerContext, Stage


class FrozenEntries(Stage):
    name = "frozen_entries"

    def __init__(self, indices: tuple[int, ...], names: tuple[str, ...]) -> None:
        self.indices, self.names = indices, names  # positions in the wire format, and their keys

    def check(self, arrays: list[np.ndarray], num_examples: int, dataset_size: int, ctx: ServerContext) -> str:
        for i, name in zip(self.indices, self.names):
            if i < len(arrays) and np.any(arrays[i] != 0):
                return f"the update changes {name}, a layer that never trains (it must be 0)"
        return ""

    def release(self, agg: Aggregate, ctx: ServerContext) -> Aggregate:
        arrays = list(agg.arrays)
        for i in self.indices:
            if i < len(arrays):
                arrays[i] = np.zeros_like(arrays[i])
        return Aggregate(arrays, agg.divisor, agg.count)
