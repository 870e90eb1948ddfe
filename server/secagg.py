"""SecAgg+ as privfed runs it: Flower's ``SecAggPlusWorkflow``, fitted to each round.

Flower's workflow takes fixed ``num_shares``/``reconstruction_threshold``. With Poisson
site sampling (central DP) the number of sampled sites changes every round, so the
strategy reports each round's sample and we set both from ``[secagg]`` before the
protocol starts. We also tell the strategy when a round halts after sites trained:
Flower's workflow then returns without calling ``aggregate_fit``, and the privacy those
sites spent must still reach the ledger.
"""

from __future__ import annotations

import time
from typing import Any, cast

from flwr.server import Grid, LegacyContext
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, Key

from common.config import MIN_SECURE_SITES, SecAggConfig
from common.privacy.secagg_params import shares_and_threshold


class PrivfedSecAgg(SecAggPlusWorkflow):
    def __init__(self, cfg: SecAggConfig, strategy: Any) -> None:
        super().__init__(
            num_shares=1.0,  # replaced per round in fit_to_sample
            reconstruction_threshold=1.0,
            max_weight=1.0,  # sites send num_examples = 1: equal weights, no precision lost
            clipping_range=cfg.clipping_range,
            quantization_range=cfg.quantization_range,
            modulus_range=cfg.modulus_range,
            timeout=cfg.timeout or None,
        )
        self.cfg = cfg
        self.strategy = strategy
        strategy.on_sample = self.fit_to_sample

    def fit_to_sample(self, sampled: int) -> None:
        """Set this round's shares and threshold (called by the strategy after sampling)."""
        if sampled >= MIN_SECURE_SITES:
            self.num_shares, self.reconstruction_threshold = shares_and_threshold(self.cfg, sampled)

    # Each stage is timed (seconds per stage go to metrics.jsonl as ``secagg_seconds``).
    def setup_stage(self, grid: Grid, context: LegacyContext, state: Any) -> bool:
        return self._forget_early_dropouts(self._timed("setup", super().setup_stage, grid, context, state), state)

    def share_keys_stage(self, grid: Grid, context: LegacyContext, state: Any) -> bool:
        return self._forget_early_dropouts(
            self._timed("share_keys", super().share_keys_stage, grid, context, state), state
        )

    @staticmethod
    def _forget_early_dropouts(ok: bool, state: Any) -> bool:
        """Drop sites that left before sharing their keys from the protocol's bookkeeping.

        Flower 1.41 builds the unmask stage's "dead" list from every *sampled* site, so one
        that vanished at setup (an offline site: the common case) is asked for shares nobody
        holds and every survivor's unmask fails. Nobody trained yet, so nothing is lost by
        treating such a site as never sampled.
        """
        if ok:
            state.sampled_node_ids = set(state.active_node_ids)
            for nid in list(state.nid_to_neighbours):
                state.nid_to_neighbours[nid] &= state.active_node_ids
        return ok

    def collect_masked_vectors_stage(self, grid: Grid, context: LegacyContext, state: Any) -> bool:
        # Includes local training: sites train when they receive this stage's message.
        ok = self._timed("train_and_mask", super().collect_masked_vectors_stage, grid, context, state)
        if not ok:
            self._lost(context, state, "too few sites sent a masked update to unmask the sum")
        return ok

    def unmask_stage(self, grid: Grid, context: LegacyContext, state: Any) -> bool:
        if len(state.legacy_results) < MIN_SECURE_SITES:
            # Unmasking a sum of 1 or 2 updates would hand each site (or the server) the others'.
            self._lost(
                context,
                state,
                f"only {len(state.legacy_results)} masked update(s); a secure sum needs {MIN_SECURE_SITES}",
            )
            return False
        # Includes the strategy's aggregate_fit, which Flower calls at the end of this stage.
        ok = self._timed("unmask", super().unmask_stage, grid, context, state)
        if not ok:
            self._lost(context, state, "too few sites returned shares to unmask the sum")
        return ok

    def _timed(self, name: str, stage: Any, grid: Grid, context: LegacyContext, state: Any) -> bool:
        t0 = time.perf_counter()
        try:
            return stage(grid, context, state)
        except Exception as exc:
            # A malformed share or masked vector must not crash the run or lose the spend.
            self._lost(context, state, f"{name} stage raised {type(exc).__name__}: {str(exc)[:200]}")
            return False
        finally:
            self.strategy.record(_round(context)).secagg_seconds[name] = time.perf_counter() - t0

    def _lost(self, context: LegacyContext, state: Any, why: str) -> None:
        if getattr(state, "lost_reported", False):
            return
        state.lost_reported = True
        rnd = _round(context)
        reason = (
            f"secure aggregation failed: {why} (threshold {state.threshold} of {state.num_shares} shares, "
            f"{len(state.active_node_ids)} of {len(state.sampled_node_ids)} sites left)"
        )
        self.strategy.secure_round_lost(rnd, list(state.legacy_results), list(state.failures), reason)


def _round(context: LegacyContext) -> int:
    # Flower's DefaultWorkflow stores the round as an int (and reads it back with the same cast).
    return cast(int, context.state.config_records[MAIN_CONFIGS_RECORD][Key.CURRENT_ROUND])
