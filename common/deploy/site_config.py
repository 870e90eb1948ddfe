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
    signing-key     required (deployment): the site's Ed25519 private key (PEM, mode 0600) that
                    signs every reply (common.deploy.signing; `privfed site init` makes it)
    server-key      required (deployment): the coordinator's Ed25519 public key, 64 hex digits;
                    the site checks the ledger receipts it is sent against it

The site's own policy (:class:`SitePolicy`), limits the coordinator's run config cannot
loosen; a run config outside one is refused (:class:`PolicyRefusal`) before any data is read:

    allowed-tasks          comma-separated task names this site trains (default: any)
    min-noise-multiplier   the smallest DP-SGD sigma the site accepts
    max-epsilon-per-round  the largest epsilon one round may spend (the plan's, at its delta)
    max-delta              the largest delta the site accepts
    min-group-size         a floor on the task's ``<task>.min-group-size`` (where it has one)
    privacy-unit           user: this site trains only under user-level DP (``dp.unit = "user"``);
                           a run config asking for record-level DP, whose epsilon protects one
                           record and a person only by group privacy, is refused (default: any)

Which code runs at the site is policy too, but not a node-config key: ``approved-apps`` in
the site config lists the app hashes the site approved (common.deploy.app_approval), and
``privfed site join`` starts a SuperExec that refuses every other app (client.supervisor).

Secure noise (``allow-seeded-noise``, default false) and a lifetime budget per dataset
(``epsilon-budget``, independent of the run id: client.state.Lifetime) are policy too.
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
from typing import TYPE_CHECKING, Any

from common.config import RunConfig, coerce
from common.config.limits import SITE_PARTITION
from common.errors import ConfigError, PrivfedError
from common.identifiers import site_id_problem

if TYPE_CHECKING:
    from common.deploy.signing import Ed25519PrivateKey

# Keys of the node config that change the run config at this site.
_OVERRIDES = {
    "data-path": "data.path",
    "data-format": "data.source",
    "users-path": "data.users-path",
    "device": "device",
}


DECLARED_SIZE = "declared-size"

# Every node-config key a site may set (the module docstring; SiteConfig.node_config writes
# them), plus the ones Flower's simulation engine sets itself.
NODE_CONFIG_KEYS = (
    "partition-id",
    "num-partitions",
    DECLARED_SIZE,
    "site-id",
    "key-file",
    "data-path",
    "data-format",
    "users-path",
    "device",
    "epsilon-budget",
    "state-dir",
    "dataset-id",
    "allow-seeded-noise",
    "allow-exact-metrics",
    "signing-key",
    "server-key",
    "allowed-tasks",
    "min-noise-multiplier",
    "max-epsilon-per-round",
    "max-delta",
    "min-group-size",
    "privacy-unit",
)


def check_node_config_keys(node_config: Mapping[str, Any]) -> None:
    """Refuse a node-config key privfed does not know, naming the closest known one.

    A mistyped key (``epsilon_budget`` for ``epsilon-budget``) would otherwise be ignored
    and the site would train under the run's weaker setting without a word: for a
    privacy limit that is a silent loss of protection (issue 20, finding 7).
    """
    import difflib

    for key in node_config:
        if key not in NODE_CONFIG_KEYS:
            close = difflib.get_close_matches(str(key).replace("_", "-"), NODE_CONFIG_KEYS, n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(
                str(key),
                f"is not a privfed site setting{hint}; a mistyped setting would be ignored, so this site refuses "
                "(docs/DEPLOYMENT.md lists the keys)",
            )


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


class PolicyRefusal(ConfigError):
    """A run config outside this site's own policy: refused at the site, never loosened by the coordinator.

    ``key`` is the *run config* key refused (e.g. ``dp.noise-multiplier``); the message names
    the site's limit, never a value. The refusal reaches the server's ledger as a signed token
    in the failure text (client.mods.failure_text): :meth:`bind` gives the exception the site's
    signing key and id, :meth:`sign_for` then builds ``refusal_token`` once the instruction's run
    id and round are known (they travel in the message, not in the ClientApp's context).
    """

    refusal_token: str = ""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(key, message)
        self._signer: Ed25519PrivateKey | None = None
        self.site_id = ""

    def bind(self, signer: Ed25519PrivateKey | None, site_id: str) -> PolicyRefusal:
        self._signer, self.site_id = signer, site_id
        return self

    def sign_for(self, run_id: str, rnd: int) -> PolicyRefusal:
        """Attach the signed token ("site S refused key K in round R of run U"); no-op without a key."""
        from common.deploy.signing import refusal_claim, refusal_token

        if self._signer is not None:
            self.refusal_token = refusal_token(self._signer, refusal_claim(run_id, rnd, self.site_id, self.key))
        return self


POLICY_KEYS = ("allowed-tasks", "min-noise-multiplier", "max-epsilon-per-round", "max-delta", "min-group-size")


@dataclass(frozen=True)
class SitePolicy:
    """The site's own limits (node config; module docstring). 0 / empty: no limit."""

    allowed_tasks: tuple[str, ...] = ()
    min_noise_multiplier: float = 0.0
    max_epsilon_per_round: float = 0.0
    max_delta: float = 0.0
    min_group_size: int = 0
    privacy_unit: str = ""

    @property
    def needs_dp(self) -> bool:
        return bool(self.min_noise_multiplier or self.max_epsilon_per_round or self.max_delta or self.privacy_unit)

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> SitePolicy:
        """Read and check the policy keys; a malformed one is the site's own error (ConfigError)."""
        values: dict[str, Any] = {}
        tasks = node_config.get("allowed-tasks", "")
        if not isinstance(tasks, str):
            raise ConfigError("site allowed-tasks", "must be a comma-separated string of task names")
        values["allowed_tasks"] = tuple(t.strip() for t in tasks.split(",") if t.strip())
        for key in ("min-noise-multiplier", "max-epsilon-per-round", "max-delta"):
            v = node_config.get(key, 0.0)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0 or v == float("inf"):
                raise ConfigError(f"site {key}", "must be a finite number >= 0 (0: no limit)")
            values[key.replace("-", "_")] = float(v)
        if values["max_delta"] >= 1:
            raise ConfigError("site max-delta", "must be < 1")
        k = node_config.get("min-group-size", 0)
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ConfigError("site min-group-size", "must be an integer >= 0 (0: no floor)")
        values["min_group_size"] = k
        unit = node_config.get("privacy-unit", "")
        if unit not in ("", "record", "user"):
            raise ConfigError("site privacy-unit", "must be record or user (empty: either)")
        values["privacy_unit"] = "" if unit == "record" else unit
        return cls(**values)


def check_allowed_task(cfg: RunConfig, policy: SitePolicy) -> None:
    """The first policy check: a task the site does not allow is refused before anything else."""
    if policy.allowed_tasks and cfg.task not in policy.allowed_tasks:
        raise PolicyRefusal("task", "is not one of the tasks this site allows (its allowed-tasks)")


def check_site_policy(cfg: RunConfig, policy: SitePolicy, declared: int) -> None:
    """Refuse a run config outside the site's limits (:class:`PolicyRefusal`, key = the run config key).

    sigma, delta and the per-round epsilon are the *plan's* (common.privacy.plan.plan_round at the
    site's declared size n-hat), so a sigma derived from ``dp.target-epsilon`` is checked as well as
    an explicit one. Nothing here reads the site's data.
    """
    from common.privacy.accounting import epsilon
    from common.privacy.plan import plan_round

    floor = getattr(cfg.task_params, "min_group_size", None)
    if policy.min_group_size and isinstance(floor, int) and floor < policy.min_group_size:
        raise PolicyRefusal(f"{cfg.task}.min-group-size", "is below this site's floor (its min-group-size)")
    if not policy.needs_dp:
        return
    if not cfg.dp.enabled:
        raise PolicyRefusal(
            "dp.enabled",
            "is false, but this site's policy requires DP-SGD (min-noise-multiplier, max-epsilon-per-round, "
            "max-delta or privacy-unit)",
        )
    if policy.privacy_unit == "user" and cfg.dp.unit != "user":
        raise PolicyRefusal("dp.unit", "is not user, but this site trains only under user-level DP (its privacy-unit)")
    plan = plan_round(cfg, declared)
    # The key that sets sigma: the target epsilon when sigma is derived from it.
    sigma_key = "dp.target-epsilon" if cfg.dp.target_epsilon > 0 else "dp.noise-multiplier"
    if policy.max_delta and plan.delta > policy.max_delta:
        raise PolicyRefusal("dp.delta", "is above this site's limit (its max-delta)")
    if policy.min_noise_multiplier and plan.noise_multiplier < policy.min_noise_multiplier:
        raise PolicyRefusal(sigma_key, "gives a noise multiplier below this site's minimum (its min-noise-multiplier)")
    if policy.max_epsilon_per_round:
        per_round = epsilon([plan.mechanism], plan.delta, plan.accountant)
        if not per_round <= policy.max_epsilon_per_round:
            raise PolicyRefusal(
                sigma_key, "gives a per-round epsilon above this site's limit (its max-epsilon-per-round)"
            )


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
        raise PolicyRefusal(
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
    if cfg.dp.unit == "user" and not virtual_site:
        # Under user-level DP a person's held-out records are their own data: exact sums over
        # them would release those persons outside epsilon, so no site declaration covers it.
        raise PolicyRefusal(
            "metrics.dp",
            "is false in a user-level run (dp.unit = user): exact evaluation sums would release the protected "
            "persons' held-out records outside epsilon; a deployed site refuses whatever its allow-exact-metrics",
        )
    if not _site_consents(node_config, "allow-exact-metrics", virtual_site):
        raise PolicyRefusal(
            "metrics.dp",
            "is false in the run config, which would send this site's evaluation statistics without noise, outside "
            "its epsilon; this site refuses (its allow-exact-metrics is false)",
        )


def dataset_identity(cfg: RunConfig, node_config: Mapping[str, Any], site_index: int) -> str:
    """The name under which this site keeps its dataset's lifetime privacy history.

    Declared by the site (``dataset-id``), or derived from where its data comes from, and
    only from what the coordinator cannot change:

    * a site with its own file: the resolved ``data-path`` and ``users-path`` of its node
      config, nothing of the run config (not even the format to read them in);
    * otherwise (embedded demo data, or a simulation whose launcher names the file): the data
      source, the data path, the users path only for the recommender (the one task that reads
      it: a VAE site given a users path would otherwise take a new budget per new string), and
      the partition index unless the site's file is all its data.

    Never the content, so adding or editing a record does not start a new budget; never the
    seed, alpha, task or run id. A deployed site also refuses a run config that names a file
    (:func:`refuse_run_config_paths`). The derived name has the source in clear and a hash of
    the rest.
    """
    declared = node_config.get("dataset-id")
    if declared not in (None, ""):
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", str(declared))
        if set(safe) == {"."}:
            raise ConfigError("site dataset-id", "must not be '.' or '..'")
        return safe

    def resolved(value: object) -> str:
        return str(Path(str(value)).expanduser().resolve()) if value else ""

    d = cfg.data
    own = node_config.get("data-path")
    if own:
        # The same fields, and so the same name, as before the run config was left out: a
        # site that names its format keeps its lifetime history across this change.
        fmt = str(node_config.get("data-format") or "")
        where: dict[str, Any] = {
            "source": fmt,
            "path": resolved(own),
            "users-path": resolved(node_config.get("users-path")),
            "partition": "all",
        }
        label = fmt or "site"
    else:
        where = {
            "source": d.source,
            "path": resolved(d.path),
            "users-path": resolved(d.users_path) if cfg.task == "recsys" else "",
            "partition": "all" if d.partition == SITE_PARTITION else site_index,
        }
        label = d.source
    digest = hashlib.sha256(json.dumps(where, sort_keys=True).encode()).hexdigest()[:16]
    return f"{re.sub(r'[^A-Za-z0-9_-]', '_', label)}-{digest}"


def refuse_run_config_paths(run_config: Mapping[str, Any], *, virtual_site: bool = False) -> None:
    """A deployed site reads only the files its own site config names: refuse a run config
    (Flower's, i.e. the coordinator's) that names a file at the site.

    A path from the coordinator would choose which of the site's files are read (and the
    coded error of a missing or malformed one would tell the coordinator about the site's
    files), and it would change the derived dataset id: a fresh lifetime budget per new
    string. The simulation launcher names its virtual sites' files itself, in the ClientApp's
    own configuration, not in the run config.
    """
    if virtual_site:
        return
    for key in ("data.path", "data.users-path"):
        if run_config.get(key):
            raise PolicyRefusal(
                key,
                "names a file at this site; a deployed site reads only the files its own site config names "
                "(data-path, users-path)",
            )


SERVER_KEY, SIGNING_KEY = "server-key", "signing-key"


def check_server_key(value: object) -> str:
    """The coordinator's public key as the site config / node config holds it (64 hex digits)."""
    from common.deploy.signing import parse_public_key

    if not isinstance(value, str) or not value:
        raise ConfigError(
            SERVER_KEY, "missing: the coordinator's Ed25519 public key (64 hex digits), to check receipts"
        )
    try:
        parse_public_key(value)
    except PrivfedError:
        raise ConfigError(SERVER_KEY, "must be an Ed25519 public key as 64 hex digits") from None
    return value


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
    # The site's Ed25519 signing key (PEM path) and the coordinator's public key (64 hex):
    # both required, a deployed site without them is refused (client.app.signing_identity).
    signing_key: str = ""
    server_key: str = ""
    # The site's policy (SitePolicy; 0 / "": no limit).
    allowed_tasks: str = ""
    min_noise_multiplier: float = 0.0
    max_epsilon_per_round: float = 0.0
    max_delta: float = 0.0
    min_group_size: int = 0
    privacy_unit: str = ""
    # The apps this site runs (common.deploy.app_approval): comma-separated SHA-256 hashes of
    # FABs it approved with `privfed site approve`. Read by `privfed site join` (the site's
    # SuperExec checks every FAB against it), never sent: not a node-config key.
    approved_apps: str = ""

    def validate(self) -> None:
        problem = site_id_problem(self.site_id)
        if problem:
            raise ConfigError("site-id", problem)
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
            "signing_key",
            "allowed_tasks",
            "privacy_unit",
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
        if not self.signing_key:
            raise ConfigError(
                "signing-key", "missing: the site signs its replies with it (`privfed site init` makes one)"
            )
        check_server_key(self.server_key)
        from common.deploy.app_approval import AppApprovalError, parse_approved

        try:
            parse_approved(self.approved_apps)
        except AppApprovalError:
            raise ConfigError("approved-apps", "must be comma-separated SHA-256 hashes (64 hex digits each)") from None
        SitePolicy.from_node_config(self._policy_items())
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
        if self.signing_key:
            items.append(f"signing-key={json.dumps(str(Path(self.signing_key).expanduser()))}")
        if self.server_key:
            items.append(f"server-key={json.dumps(self.server_key)}")
        for key, value in self._policy_items().items():
            if value:  # floats by repr and ints as written are TOML numbers; the task list a basic string
                items.append(f"{key}={json.dumps(value) if isinstance(value, str) else repr(value)}")
        if self.allow_seeded_noise:
            items.append("allow-seeded-noise=true")
        if self.allow_exact_metrics:
            items.append("allow-exact-metrics=true")
        return " ".join(items)

    def _policy_items(self) -> dict[str, Any]:
        return {
            "allowed-tasks": self.allowed_tasks,
            "min-noise-multiplier": self.min_noise_multiplier,
            "max-epsilon-per-round": self.max_epsilon_per_round,
            "max-delta": self.max_delta,
            "min-group-size": self.min_group_size,
            "privacy-unit": self.privacy_unit,
        }

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
            import difflib

            close = difflib.get_close_matches(unknown[0].replace("_", "-"), list(known), n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(unknown[0], f"unknown key in site config {p}{hint}")
        values: dict[str, Any] = {}
        for key, value in raw.items():
            values[known[key].name] = coerce(key, value, known[key])  # the run config's type rules
        missing = [k for k, f in known.items() if f.default is dataclasses.MISSING and k not in raw]
        if missing:
            raise ConfigError(missing[0], f"missing from site config {p}")
        cfg = cls(**values)
        cfg.validate()
        return cfg
