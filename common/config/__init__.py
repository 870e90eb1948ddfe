"""Run configuration: one typed schema, one flat key space, one-line errors.

``schema`` holds the sections (each validates its own keys), ``run`` their aggregate,
``rules`` the cross-section rules, ``loading`` the parsing (flat keys, TOML, overrides)
and the registry of task tables. Import the public names from here.


``loading`` is imported on first use of its names (PEP 562 ``__getattr__``): it applies
the rules, which use the privacy analysis in ``common.privacy.client_level``, which reads
config sections. Importing it eagerly here would make ``import common.config.schema``
(for instance from ``common.privacy``) re-enter ``common.privacy`` half-initialised.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from common.config.limits import (
    AGGREGATIONS,
    CORRUPTIONS,
    DEVICE_CHOICES,
    FAULT_STAGES,
    MAX_STEPS,
    MIN_DELTA,
    MIN_SECURE_SITES,
    SIGMA_RANGE,
    auto_delta,
)
from common.config.run import SECTIONS, RunSections
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

if TYPE_CHECKING:
    from common.config.loading import (
        MOVED_KEYS,
        RunConfig,
        coerce,
        flatten,
        parse_override,
        register_task_spec,
        registered_tasks,
        task_spec,
    )

_LAZY = {
    "MOVED_KEYS",
    "RunConfig",
    "coerce",
    "flatten",
    "parse_override",
    "register_task_spec",
    "registered_tasks",
    "task_spec",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module("common.config.loading"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AGGREGATIONS",
    "CORRUPTIONS",
    "DEVICE_CHOICES",
    "FAULT_STAGES",
    "MAX_STEPS",
    "MIN_DELTA",
    "MIN_SECURE_SITES",
    "MOVED_KEYS",
    "SECTIONS",
    "SIGMA_RANGE",
    "AuditConfig",
    "CentralDPConfig",
    "DPConfig",
    "DataConfig",
    "FaultsConfig",
    "FederationConfig",
    "MetricsConfig",
    "RunConfig",
    "RunSections",
    "SecAggConfig",
    "TrainConfig",
    "auto_delta",
    "coerce",
    "flatten",
    "parse_override",
    "register_task_spec",
    "registered_tasks",
    "task_spec",
]
