"""A partner site's own configuration, and how it reaches the ClientApp.

An operator writes a site config once (``privfed site init``), then joins with it
(``privfed site join``). Site-local settings travel to the ClientApp as the SuperNode's
``--node-config``, which stays on the site's machine: the coordinator's run config cannot
see or change them.

Site-local keys (node config), each optional except ``partition-id``:

    partition-id    this site's index (0 .. num-sites-1)
    declared-size   required: the site's public training-set size n-hat, declared before
                    the run; q, steps, delta, sigma and the FedAvg weight derive from it,
                    so the real size never leaves the site (docs/PRIVACY.md)
    site-id         the pseudonym the ledger shows (default site-<partition-id>)
    key-file        the federation key (keyed tasks, e.g. the recommender)
    data-path       this site's own data file or folder; all of it is the site's
    data-format     how to read it (digits, npz, movielens, csv; must suit the task)
    users-path      recommender: optional user-attributes CSV
    device          auto, cpu, cuda or cuda:N (overrides the run's)
    epsilon-budget  a budget stricter than the run's (the lower one applies); like the
                    run's, it bounds the dataset's lifetime spend over every run (client.state)
    state-dir       where the site keeps its accounting history and site-local model
                    between rounds, and its dataset's lifetime history across runs
                    (client.state); without it a restart forgets them
    dataset-id      the name of this site's dataset for its lifetime budget (default: derived
                    from its data source and path, and its partition; :func:`dataset_identity`)
    allow-seeded-noise  true: accept a run config with dp.secure-rng = false (test federations
                    only); default false, the site refuses (:func:`refuse_seeded_noise`)
    allow-exact-metrics  true: accept a private run config with metrics.dp = false (evaluation
                    statistics sent exactly, outside epsilon); default false, the site refuses
                    (:func:`refuse_exact_metrics`)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from common.config import RunConfig, coerce
from common.data.arrays import SITE_PARTITION
from common.errors import ConfigError, PrivfedError

# Keys of the node config that change the run config at this site.
_OVERRIDES = {
    "data-path": "data.path",
    "data-format": "data.source",
    "users-path": "data.users-path",
    "device": "device",
}


DECLARED_SIZE = "declared-size"


def declared_size(node_config: Mapping[str, Any], simulated: int | None = None) -> int:
    """The site's declared public size n-hat: its node config's ``declared-size``, else
    (simulation only) the size the launcher declared for it.

    Add/remove-one DP needs the size a site's releases depend on to be public and fixed
    before the run; refusing here, with one line, is what keeps the real n from being used.
    The value itself is never repeated in the message.
    """
    value = node_config.get(DECLARED_SIZE, simulated)
    if value is None:
        raise ConfigError(
            DECLARED_SIZE,
            "missing from this site's node config: declare the site's public training-set size before the run "
            "(`privfed site init --declared-size N`; see docs/PRIVACY.md)",
        )
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(DECLARED_SIZE, "must be a positive integer (the site's public training-set size)")
    return value


def apply_site_overrides(cfg: RunConfig, node_config: Mapping[str, Any]) -> RunConfig:
    """The run config as this site runs it: its own data, device and (stricter) budget.

    A site budget below the run's ``dp.target-epsilon`` is allowed: the site then trains
    until its own budget check refuses a round. A site that sets a budget refuses a run
    with DP switched off.
    """
    flat = cfg.to_flat()
    changed = False
    for node_key, run_key in _OVERRIDES.items():
        value = node_config.get(node_key)
        if value not in (None, ""):
            flat[run_key] = value
            changed = True
    if node_config.get("data-path"):
        flat["data.partition"] = SITE_PARTITION  # the site's file is all its own data
    if changed:
        try:
            cfg = RunConfig.from_flat(flat)
        except ConfigError as exc:
            raise ConfigError(f"site config ({exc.key})", str(exc).split(": ", 1)[1]) from None
    budget = node_config.get("epsilon-budget")
    if budget not in (None, "", 0, 0.0):
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget <= 0:
            raise ConfigError("site epsilon-budget", f"must be a number > 0, got {budget!r}")
        if not cfg.dp.enabled:
            raise ConfigError(
                "site epsilon-budget",
                f"this site allows eps <= {budget:g}, but the run has dp.enabled=false: refusing to train",
            )
        # Replaced after validation: a budget below the run's target is the site's right.
        cfg = dataclasses.replace(
            cfg, dp=dataclasses.replace(cfg.dp, epsilon_budget=min(float(budget), cfg.dp.epsilon_budget))
        )
    return cfg


def _site_consents(node_config: Mapping[str, Any], key: str, virtual_site: bool) -> bool:
    """Whether this site's own node config (``key = true``) or the simulation launcher
    (``virtual_site``) accepts a weaker setting the run config asks for. The coordinator
    writes the run config, not the node config, so it cannot give this consent itself."""
    allowed = node_config.get(key, False)
    if not isinstance(allowed, bool):
        raise ConfigError(f"site {key}", "must be true or false")
    return virtual_site or allowed


def refuse_seeded_noise(cfg: RunConfig, node_config: Mapping[str, Any], *, virtual_site: bool = False) -> None:
    """Refuse a run config that asks this site for seeded noise, unless the site allows it.

    With ``dp.secure-rng = false`` every noise draw and Poisson sample of the site is a
    function of (federation.seed, partition-id, round), all in the run config: whoever holds
    it can regenerate the noise and subtract it, so the site's ε would hold against nobody
    who matters. Only the site's consent (``allow-seeded-noise``) accepts it. A run without
    noise (no DP at all) has nothing to seed.
    """
    if cfg.dp.secure_rng or not (cfg.dp.enabled or cfg.central_dp.enabled):
        return
    if not _site_consents(node_config, "allow-seeded-noise", virtual_site):
        raise ConfigError(
            "dp.secure-rng",
            "is false in the run config, which would seed this site's noise from federation.seed (anyone holding the "
            "config could remove it); this site refuses (its allow-seeded-noise is false)",
        )


def refuse_exact_metrics(cfg: RunConfig, node_config: Mapping[str, Any], *, virtual_site: bool = False) -> None:
    """Refuse a private run config that asks this site for exact (un-noised) metrics, unless the site allows it.

    With ``metrics.dp = false`` the site's evaluation statistics leave it exactly, outside
    ε (docs/PRIVACY.md, "Private metrics"). Only the site's consent (``allow-exact-metrics``)
    accepts it. A non-private run has no ε to keep.
    """
    if cfg.metrics.dp or not cfg.dp.enabled:
        return
    if not _site_consents(node_config, "allow-exact-metrics", virtual_site):
        raise ConfigError(
            "metrics.dp",
            "is false in the run config, which would send this site's evaluation statistics without noise, outside "
            "its epsilon; this site refuses (its allow-exact-metrics is false)",
        )


def dataset_identity(cfg: RunConfig, node_config: Mapping[str, Any], site_index: int) -> str:
    """The name under which this site keeps its dataset's lifetime privacy history.

    Declared by the site (``dataset-id``), or derived from where its data comes from: the
    data source, the resolved data and users paths, and the partition index unless the
    site's file is all its data (``data.partition = site``). Not from the content, so adding
    or editing a record does not start a new budget; and not from anything else the run
    config says (seed, alpha, task, num-sites), so a coordinator cannot reset a site's
    budget by changing them. The derived name has the source in clear and a hash of the rest.
    """
    declared = node_config.get("dataset-id")
    if declared not in (None, ""):
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", str(declared))
        if set(safe) == {"."}:
            raise ConfigError("site dataset-id", "must not be '.' or '..'")
        return safe
    d = cfg.data
    where = {
        "source": d.source,
        "path": str(Path(d.path).expanduser().resolve()) if d.path else "",
        "users-path": str(Path(d.users_path).expanduser().resolve()) if d.users_path else "",
        "partition": "all" if d.partition == SITE_PARTITION else site_index,
    }
    digest = hashlib.sha256(json.dumps(where, sort_keys=True).encode()).hexdigest()[:16]
    return f"{re.sub(r'[^A-Za-z0-9_-]', '_', d.source)}-{digest}"


@dataclass(frozen=True)
class SiteConfig:
    """What ``privfed site init`` writes and ``privfed site join`` reads."""

    site_id: str
    partition_id: int
    superlink: str
    ca_cert: str
    auth_private_key: str
    auth_public_key: str
    # The site's public training-set size n-hat (docs/PRIVACY.md); 0 = not declared, refused.
    declared_size: int = 0
    key_file: str = ""
    data_path: str = ""
    data_format: str = ""
    users_path: str = ""
    device: str = "auto"
    epsilon_budget: float = 0.0
    state_dir: str = ""
    dataset_id: str = ""
    allow_seeded_noise: bool = False
    allow_exact_metrics: bool = False

    def validate(self) -> None:
        if not self.site_id or any(c in self.site_id for c in " \"'="):
            raise ConfigError("site-id", f"must be a non-empty name without spaces or quotes, got {self.site_id!r}")
        if self.partition_id < 0:
            raise ConfigError("partition-id", f"must be >= 0, got {self.partition_id}")
        host, sep, port = self.superlink.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ConfigError("superlink", f"must be HOST:PORT, got {self.superlink!r}")
        for key in (
            "ca_cert",
            "auth_private_key",
            "auth_public_key",
            "key_file",
            "data_path",
            "users_path",
            "data_format",
            "state_dir",
            "dataset_id",
        ):
            if '"' in getattr(self, key):  # Flower's --node-config parser cannot carry a double quote
                raise ConfigError(key.replace("_", "-"), f"must not contain a double quote, got {getattr(self, key)!r}")
        if self.declared_size < 1:
            raise ConfigError(
                DECLARED_SIZE,
                "must be a positive integer: the site's public training-set size, declared before the run "
                "(docs/PRIVACY.md)",
            )
        if self.epsilon_budget < 0:
            raise ConfigError("epsilon-budget", f"must be >= 0 (0: the run's), got {self.epsilon_budget}")
        if self.device not in ("auto", "cpu", "cuda") and not (
            self.device.startswith("cuda:") and self.device[5:].isdigit()
        ):
            raise ConfigError("device", f"must be auto, cpu, cuda or cuda:N, got {self.device!r}")

    def node_config(self) -> str:
        """The ``--node-config`` string for ``flower-supernode`` (site-local values only)."""
        # json.dumps quotes and escapes like a TOML basic string, which Flower parses.
        items: list[str] = [
            f"partition-id={self.partition_id}",
            f"{DECLARED_SIZE}={self.declared_size}",
            f"site-id={json.dumps(self.site_id)}",
            f"device={json.dumps(self.device)}",
        ]
        for key in ("key_file", "data_path", "data_format", "users_path", "state_dir", "dataset_id"):
            value = getattr(self, key)
            if value:
                if key not in ("data_format", "dataset_id"):
                    value = str(Path(value).expanduser())
                items.append(f"{key.replace('_', '-')}={json.dumps(value)}")
        if self.epsilon_budget:
            items.append(f"epsilon-budget={self.epsilon_budget!r}")
        if self.allow_seeded_noise:
            items.append("allow-seeded-noise=true")
        if self.allow_exact_metrics:
            items.append("allow-exact-metrics=true")
        return " ".join(items)

    def to_toml(self) -> str:
        import tomli_w

        return "# privfed site config (privfed site init). Keep it at the site; it is never sent.\n" + tomli_w.dumps(
            {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}
        )

    @classmethod
    def load(cls, path: str | Path) -> SiteConfig:
        p = Path(path)
        if not p.is_file():
            raise PrivfedError(f"site config '{p}': not found (write one with `privfed site init`)")
        try:
            raw = tomllib.loads(p.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise PrivfedError(f"site config '{p}': not valid TOML ({exc})") from None
        known = {f.name.replace("_", "-"): f for f in fields(cls)}
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise ConfigError(unknown[0], f"unknown key in site config {p}")
        values: dict[str, Any] = {}
        for key, value in raw.items():
            values[known[key].name] = coerce(key, value, known[key])  # the run config's type rules
        missing = [k for k, f in known.items() if f.default is dataclasses.MISSING and k not in raw]
        if missing:
            raise ConfigError(missing[0], f"missing from site config {p}")
        cfg = cls(**values)
        cfg.validate()
        return cfg
