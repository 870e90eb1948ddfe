"""The whole configuration of a run as data: every section, and the task's own table.

Parsing and cross-section validation live in :mod:`common.config.loading` (``RunConfig``,
a ``RunSections`` that knows how to build itself); code that only reads a configuration,
such as the privacy analysis in :mod:`common.privacy.client_level`, types against this
class and so does not depend on the loader.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any, Self

from common.config.limits import key_of
from common.config.schema import (
    AuditConfig,
    CentralDPConfig,
    DataConfig,
    DPConfig,
    FaultsConfig,
    FederationConfig,
    MetricsConfig,
    SecAggConfig,
    TrainConfig,
)

# Section prefix -> (RunSections field, dataclass). Top-level keys are FederationConfig's.
SECTIONS: dict[str, tuple[str, type]] = {
    "data": ("data", DataConfig),
    "train": ("train", TrainConfig),
    "dp": ("dp", DPConfig),
    "audit": ("audit", AuditConfig),
    "secagg": ("secagg", SecAggConfig),
    "central-dp": ("central_dp", CentralDPConfig),
    "faults": ("faults", FaultsConfig),
    "metrics": ("metrics", MetricsConfig),
}


@dataclass(frozen=True)
class RunSections:
    """The sections of a run's configuration (validated when built by ``RunConfig.from_flat``)."""

    federation: FederationConfig = field(default_factory=FederationConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dp: DPConfig = field(default_factory=DPConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    central_dp: CentralDPConfig = field(default_factory=CentralDPConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    # The task plug-in's own dataclass (e.g. VAEConfig), under the task's name.
    task_params: Any = None

    # Convenience accessors for the keys everything reads.
    @property
    def task(self) -> str:
        return self.federation.task

    @property
    def scenario(self) -> str:
        return self.federation.scenario

    def to_flat(self) -> dict[str, Any]:
        """All keys, defaults included: the form Flower's run_config and the run dir store."""
        out: dict[str, Any] = {}
        parts = [("", self.federation), *((prefix, getattr(self, name)) for prefix, (name, _) in SECTIONS.items())]
        if self.task_params is not None:
            parts.append((self.task, self.task_params))
        for prefix, obj in parts:
            for f in fields(obj):
                key = key_of(f.name) if not prefix else f"{prefix}.{key_of(f.name)}"
                out[key] = getattr(obj, f.name)
        return out

    def to_nested(self) -> dict[str, Any]:
        """The flat keys regrouped into TOML tables (for the resolved config file)."""
        nested: dict[str, Any] = {}
        for key, value in self.to_flat().items():
            section, _, leaf = key.rpartition(".")
            (nested.setdefault(section, {}) if section else nested)[leaf] = value
        return nested

    @property
    def uniform_weights(self) -> bool:
        """Whether the aggregate weighs every site equally (see FederationConfig.weighting)."""
        w = self.federation.weighting
        return w == "uniform" or (w == "auto" and (self.secagg.enabled or self.central_dp.enabled))

    @property
    def qffl_lipschitz(self) -> float:
        """L of q-fedavg: federation.qffl-lipschitz, or 1 / train.lr when 0 (the paper's choice)."""
        return self.federation.qffl_lipschitz or 1.0 / self.train.lr

    def replace(self, **federation_changes: Any) -> Self:
        return dataclasses.replace(self, federation=dataclasses.replace(self.federation, **federation_changes))
