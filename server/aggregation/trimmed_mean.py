"""Flower's coordinate-wise trimmed mean of the updates (Byzantine-robust)."""

from __future__ import annotations

from flwr.server.strategy.aggregate import aggregate_trimmed_avg

from server.aggregation.base import Aggregation, RoundInputs, Staged, Usable, as_model_dtypes, register_aggregation


@register_aggregation("trimmed-mean")
class TrimmedMean(Aggregation):
    def aggregate(self, sites: list[str], usable: Usable, inputs: RoundInputs) -> tuple[Staged | None, str]:
        results = [(usable[s][0], usable[s][1]) for s in sites]
        # Flower annotates the weight as int; the trimmed mean never reads it.
        step = aggregate_trimmed_avg(results, self.cfg.federation.trim_fraction)  # type: ignore[arg-type]
        return Staged(sites, as_model_dtypes(step, inputs.global_arrays), 1.0), ""
