"""Reading a run configuration: flat keys, TOML tables, ``key=value`` overrides.

Every setting has a flat key such as ``rounds`` or ``dp.noise-multiplier``. The same
keys are used by scenario TOML files (as nested tables), by ``privfed simulate``
overrides (``dp.noise-multiplier=1.2``), by Flower's ``[tool.flwr.app.config]`` and by
``flwr run --run-config``. Both the ServerApp and the ClientApp parse their
``context.run_config`` through :func:`RunConfig.from_flat`, so a run is configured
identically on every side.

Task-specific settings live in a table named after the task (``[vae]``). A task plug-in
is a package ``common/tasks/<name>/``; its light ``config`` module declares the table's
dataclass and what the task accepts (``SPEC``, a :class:`TaskSpec`) without importing
torch, and its ``task`` module holds the model code, loaded only when a run builds the
task (``common.tasks.get_task``). The config never imports a task module statically: it
finds the plug-ins by the package's name (:data:`TASK_PLUGINS`), the way an entry point is
loaded (tasks import the config to read it, so a static import back would be a cycle), and
imports only their ``config`` modules, so reading and checking a config (``privfed
config``, a typo's one-line error) loads neither torch nor Flower.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import math
import pkgutil
import tomllib
from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from common.config.limits import key_of
from common.config.rules import TaskSpec, check_rules
from common.config.run import SECTIONS, RunSections
from common.config.schema import FederationConfig
from common.errors import ConfigError

# The package whose subpackages are the task plug-ins, and the light module of each that
# holds its TaskSpec (as SPEC).
TASK_PLUGINS = "common.tasks"
SPEC_MODULE = "config"
_TASKS: dict[str, TaskSpec] = {}
_discovered = False

# Keys that moved to a task's own table: a one-line error names the new key.
MOVED_KEYS = {
    "fairness.recsys-correction": "recsys.correction",
    "fairness.recsys-lambda": "recsys.correction-lambda",
    "fairness.gan-class-target": "gan.class-target",
}


def register_task_spec(spec: TaskSpec) -> None:
    """Make task ``spec.name`` (and its ``[name]`` table, ``spec.config_cls``) known to the config."""
    if spec.name in _TASKS and _TASKS[spec.name] is not spec:
        raise RuntimeError(f"task {spec.name!r} registered twice")
    _TASKS[spec.name] = spec


def discover_tasks() -> None:
    """Register the SPEC of every plug-in package (its light ``config`` module only: no model code)."""
    global _discovered
    if _discovered:
        return
    package = importlib.import_module(TASK_PLUGINS)
    for mod in pkgutil.iter_modules(package.__path__):
        if not mod.ispkg:  # shared code (base, images), not a plug-in
            continue
        module = importlib.import_module(f"{TASK_PLUGINS}.{mod.name}.{SPEC_MODULE}")
        spec = getattr(module, "SPEC", None)
        if not isinstance(spec, TaskSpec) or spec.name != mod.name:
            raise RuntimeError(f"{module.__name__} must define SPEC, a TaskSpec named {mod.name!r}")
        register_task_spec(spec)
    _discovered = True


def registered_tasks() -> dict[str, TaskSpec]:
    """Every task plug-in (discovered on first use)."""
    discover_tasks()
    return dict(_TASKS)


def task_spec(name: str) -> TaskSpec:
    """The registered task ``name``; a ConfigError naming ``task`` if there is none."""
    if name not in _TASKS:
        discover_tasks()
    if name not in _TASKS:
        raise ConfigError("task", f"unknown task {name!r} (known: {', '.join(sorted(_TASKS))})")
    return _TASKS[name]


class RunConfig(RunSections):
    """The whole, validated configuration of a run."""

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]) -> RunConfig:
        """Parse and validate a flat ``{key: value}`` mapping; unknown keys are errors."""
        flat = dict(flat)
        task_name = flat.get("task", FederationConfig.task)
        task = task_spec(str(task_name))  # ConfigError naming 'task' if unknown
        sections: dict[str, type] = {
            "": FederationConfig,
            **{prefix: section for prefix, (_, section) in SECTIONS.items()},
            task.name: task.config_cls,
        }

        buckets: dict[str, dict[str, Any]] = {name: {} for name in sections}
        for key, value in flat.items():
            if key in MOVED_KEYS:
                raise ConfigError(key, f"moved to the task's table (did you mean {MOVED_KEYS[key]!r}?)")
            section, _, leaf = key.rpartition(".")
            if section not in sections:
                raise ConfigError(key, f"unknown key{_suggest(key, sections)}")
            known = {key_of(f.name): f for f in fields(sections[section])}
            if leaf not in known:
                raise ConfigError(key, f"unknown key{_suggest(key, sections)}")
            buckets[section][known[leaf].name] = coerce(key, value, known[leaf])

        built = {name: sections[name](**values) for name, values in buckets.items()}
        cfg = cls(
            federation=built[""],
            task_params=built[task.name],
            **{name: built[prefix] for prefix, (name, _) in SECTIONS.items()},
        )
        for part in (cfg.federation, *(getattr(cfg, name) for name, _ in SECTIONS.values()), cfg.task_params):
            part.validate()
        check_rules(cfg, task)
        return cfg


def flatten(nested: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"dp": {"delta": 1e-5}}`` -> ``{"dp.delta": 1e-5}`` (how Flower flattens run config tables)."""
    out: dict[str, Any] = {}
    for key, value in nested.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(flatten(value, full))
        else:
            out[full] = value
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """Parse one ``key=value`` command-line override; the value is read as a TOML literal."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(text, "override must look like key=value")
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word such as dp.engine=opacus
    return key, value


def coerce(key: str, value: Any, f: dataclasses.Field) -> Any:
    """Check a value against the field's declared type; ints widen to floats."""
    expected = f.type if isinstance(f.type, str) else f.type.__name__
    if expected == "float" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, float),
        "bool": isinstance(value, bool),
        "str": isinstance(value, str),
    }.get(expected, True)
    if not ok:
        raise ConfigError(key, f"must be {expected}, got {value!r} ({type(value).__name__})")
    if expected == "float" and math.isnan(value):
        raise ConfigError(key, "must be a number, got nan")
    if expected == "float" and math.isinf(value) and key not in _INFINITY_OK:
        raise ConfigError(key, f"must be finite, got {value}")
    return value


# Keys where infinity means "no limit".
_INFINITY_OK = {"dp.epsilon-budget", "central-dp.epsilon-budget"}


def _suggest(key: str, sections: Mapping[str, type]) -> str:
    known = [(f"{s}.{key_of(f.name)}" if s else key_of(f.name)) for s, cls in sections.items() for f in fields(cls)]
    table, _, leaf = key.partition(".")
    if table == "federation" and leaf in known:
        # The scenario files' [federation] table is the top level of a flat key: rounds=15.
        return f" (the [federation] table's keys take no prefix: did you mean {leaf!r}?)"
    close = [k for k in known if k.startswith(key)] or difflib.get_close_matches(key, known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
