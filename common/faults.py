"""Injected faults (simulation and tests only): the seeded decisions of ``[faults]``.

:class:`common.config.FaultsConfig` says what to inject; these functions decide, for one
site and round, whether and how, from seeded streams (:mod:`common.seeds`), so a faulty
run reproduces exactly. Faults touch no privacy mechanism: a dropped or crashed site has
either spent nothing (before training) or its spend is ledgered as usual.
"""

from __future__ import annotations

from common.config.schema import FaultsConfig
from common.seeds import FAULT_CORRUPTION, FAULT_DROPOUT, FAULT_EVENT, fault_draw


def _ints(text: str) -> set[int]:
    return {int(p) for p in text.split(",") if p.strip()}


def _in_fault_rounds(faults: FaultsConfig, server_round: int) -> bool:
    return not faults.rounds.strip() or server_round in _ints(faults.rounds)


def event(faults: FaultsConfig, seed: int, site_index: int, server_round: int, kind: str, rate: float) -> bool:
    """Whether a seeded fault of ``kind`` (crash, corrupt, delay) hits this site this round."""
    if rate <= 0 or not _in_fault_rounds(faults, server_round):
        return False
    u = fault_draw(seed, site_index, server_round, FAULT_EVENT, sum(map(ord, kind))).random()
    return bool(u < rate)


def corruption(faults: FaultsConfig, seed: int, site_index: int, server_round: int) -> str:
    """Which corruption a corrupted update gets (seeded, among corrupt-kinds)."""
    kinds = [k.strip() for k in faults.corrupt_kinds.split(",") if k.strip()]
    return kinds[int(fault_draw(seed, site_index, server_round, FAULT_CORRUPTION).integers(len(kinds)))]


def drops(faults: FaultsConfig, seed: int, site_index: int, server_round: int, stage: str) -> bool:
    """Whether this site drops out at ``stage`` of ``server_round`` (deterministic)."""
    if stage != faults.dropout_stage or not _in_fault_rounds(faults, server_round):
        return False
    if faults.dropout_sites.strip():
        return site_index in _ints(faults.dropout_sites)
    if faults.dropout_rate <= 0:
        return False
    u = fault_draw(seed, site_index, server_round, FAULT_DROPOUT).random()
    return bool(u < faults.dropout_rate)
