"""Flower's Krum and multi-Krum on the updates (Byzantine-robust; needs 2f + 3 updates)."""

from __future__ import annotations

from flwr.server.strategy.aggregate import aggregate_krum

from server.aggregation.base import Aggregation, RoundInputs, Staged, Usable, as_model_dtypes, register_aggregation


@register_aggregation("krum", "multi-krum")
class Krum(Aggregation):
    def aggregate(self, sites: list[str], usable: Usable, inputs: RoundInputs) -> tuple[Staged | None, str]:
        results = [(usable[s][0], usable[s][1]) for s in sites]
        name, f = self.cfg.federation.aggregation, self.cfg.federation.byzantine_sites
        if len(results) < 2 * f + 3:
            return None, f"{name} needs at least {2 * f + 3} updates for byzantine-sites={f}, got {len(results)}"
        # Flower annotates the weight as int; multi-Krum's weighted mean takes our float weights as they are.
        step = aggregate_krum(results, f, len(results) - f if name == "multi-krum" else 0)  # type: ignore[arg-type]
        return Staged(sites, as_model_dtypes(step, inputs.global_arrays), 1.0), ""
