"""FedAvg over updates: the weighted sum, divided by the sum of the weights in end_fit (pipeline weighting stage)."""

from __future__ import annotations

import numpy as np

from server.aggregation.base import Aggregation, RoundInputs, Staged, Usable, register_aggregation


def weighted_sum(sites: list[str], usable: Usable, global_arrays: list[np.ndarray]) -> Staged:
    """The sites' updates times their weights, summed in site order (so a seeded run repeats bit for bit)."""
    total = [np.sum([usable[s][0][i] * usable[s][1] for s in sites], axis=0) for i in range(len(global_arrays))]
    return Staged(sites, total, float(sum(usable[s][1] for s in sites)))


@register_aggregation("fedavg")
class FedAvgRule(Aggregation):
    def aggregate(self, sites: list[str], usable: Usable, inputs: RoundInputs) -> tuple[Staged | None, str]:
        return weighted_sum(sites, usable, inputs.global_arrays), ""
