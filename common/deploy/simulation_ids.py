"""The keys of a simulated federation: one Ed25519 key per virtual site and one for the coordinator.

A deployed federation gets its registry from the sites (``privfed site init`` prints each
site's entry, the coordinator collects them). A simulation plays every party on one
machine, so the keys are made on that machine, in one folder laid out as a deployment
would hold them:

* the folder itself is 0700;
* ``keys/server.key`` and ``keys/site-<i>.key`` (PEM, mode 0600, in a 0700 folder): the
  parties' private keys. In a deployment no party ever holds another's; here one machine
  plays them all, which is what a simulation is;
* ``registry.toml``: the public keys and each virtual site's declared size n-hat (its
  training-split size), as the coordinator's registry and the auditor's reference
  (``privfed audit RUN_DIR --verify``).

Two simulations use this layout:

* ``privfed simulate`` (simulations/launcher.py) makes it inside the run dir just before
  the run (:func:`simulation_identities`) and hands the keys to its apps in-process;
* a local ``flwr run .`` (Flower's simulation engine behind a local SuperLink) cannot be
  handed anything in-process: Flower gives each simulated node the node config
  ``partition-id``/``num-partitions`` only. The operator makes the folder beforehand with
  ``privfed keys simulation DIR [key=value ...]`` (:func:`make_for_app`) and names it in
  the environment variable :data:`ENV` of the machine; the ServerApp
  (:func:`load_for_server`) and each simulated ClientApp (:func:`load_for_site`) read it.

Why :data:`ENV` cannot weaken a deployed site or let the coordinator choose a site's key:

* it is an environment variable of the machine the apps run on, set by that machine's
  operator; nothing in the run config (the coordinator's) names or changes it, and Flower
  carries no environment from the coordinator to a site;
* the keys in the folder were made on that machine by ``privfed keys simulation``; a key
  the coordinator chose or knows could only get there by the operator's own hand;
* a ClientApp reads it only when it is a node of Flower's simulation engine: its node
  config is exactly Flower's simulated one (no ``signing-key``, no ``declared-size``, no
  site setting at all, which ``privfed site join`` always writes) *and* it runs inside a
  Ray actor, Flower 1.41's simulation backend (client.app.simulation_engine_site). A
  deployed SuperNode runs its ClientApp in its own process (``privfed-clientapp``), so with
  the variable set by mistake it still signs with its own ``signing-key`` or is refused
  without one;
* the ServerApp reads it only when Flower drives it through the simulation's in-memory
  grid (server.app.is_simulation, decided by Flower, not by a setting) and its run config
  names no registry; a deployment's ServerApp still refuses to run without a registry.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from common.errors import ConfigError, PrivfedError

if TYPE_CHECKING:  # imported where used: server.run_dir reads this module's names, and stays light
    from common.config import RunConfig
    from common.deploy.registry import Registry
    from common.deploy.signing import Ed25519PrivateKey

# The folder of a local `flwr run` simulation's identities (see the module docstring).
ENV = "PRIVFED_SIMULATION_IDS"
KEYS_DIR = "keys"
REGISTRY_FILE = "registry.toml"
SERVER_KEY_FILE = "server.key"
# The node config Flower 1.41's simulation engine gives every simulated node, and nothing else
# (flwr.server.superlink.fleet.vce.vce_api._register_node_info_stores).
SIMULATION_NODE_CONFIG = frozenset({"partition-id", "num-partitions"})
MAKE_COMMAND = "privfed keys simulation"


def site_name(index: int) -> str:
    """A virtual site's id (client.app.site_identity's default)."""
    return f"site-{index}"


@dataclass(frozen=True)
class SimulationIdentities:
    registry: Registry
    registry_path: Path
    server_key_path: Path
    site_keys: list[Ed25519PrivateKey]

    @property
    def server_public_key(self) -> str:
        return self.registry.server_key

    @property
    def sizes(self) -> list[int]:
        """Each virtual site's registered declared size n-hat, by partition id."""
        return [self.registry.sites[site_name(i)].declared_size for i in range(len(self.registry.sites))]


def simulation_identities(run_dir: Path, sizes: Sequence[int], *, resume: bool = False) -> SimulationIdentities:
    """The run's keys and registry: made for a new run (replacing any a failed start left),
    loaded and checked for a resumed one.

    ``sizes``: each virtual site's declared size n-hat, registered as its FedAvg weight cap.
    """
    from common.deploy.fileio import make_private_dir
    from common.deploy.registry import RegisteredSite, Registry
    from common.deploy.signing import public_hex, write_signing_key

    keys = run_dir / KEYS_DIR
    registry_path = run_dir / REGISTRY_FILE
    server_path = keys / SERVER_KEY_FILE
    if resume:
        if not registry_path.is_file():
            raise PrivfedError(f"{run_dir}: no {REGISTRY_FILE}; the run's keys are needed to resume it")
        registry = Registry.load(registry_path)
        site_keys = [_site_key(run_dir, registry, i) for i in range(len(sizes))]
        _server_key(run_dir, registry)
        return SimulationIdentities(registry, registry_path, server_path, site_keys)
    make_private_dir(run_dir)  # 0700: the ledger, keys and metrics in it are the coordinator's
    make_private_dir(keys)
    server = write_signing_key(server_path, force=True)
    site_keys = [write_signing_key(keys / f"{site_name(i)}.key", force=True) for i in range(len(sizes))]
    registry = Registry.build(
        public_hex(server),
        [RegisteredSite(site_name(i), public_hex(k), int(n)) for i, (k, n) in enumerate(zip(site_keys, sizes))],
    )
    registry.write(registry_path)
    return SimulationIdentities(registry, registry_path, server_path, site_keys)


def _site_key(folder: Path, registry: Registry, index: int) -> Ed25519PrivateKey:
    from common.deploy.signing import load_signing_key, public_hex

    key = load_signing_key(folder / KEYS_DIR / f"{site_name(index)}.key")
    entry = registry.site(site_name(index))
    if entry is None or entry.public_key != public_hex(key):
        raise PrivfedError(
            f"{folder / REGISTRY_FILE}: site {site_name(index)} is not registered with its key in {folder / KEYS_DIR}"
        )
    return key


def _server_key(folder: Path, registry: Registry) -> Ed25519PrivateKey:
    from common.deploy.signing import load_signing_key, public_hex

    key = load_signing_key(folder / KEYS_DIR / SERVER_KEY_FILE)
    if public_hex(key) != registry.server_key:
        raise PrivfedError(f"{folder / REGISTRY_FILE}: the server key in {folder / KEYS_DIR} is not the registered one")
    return key


# ------------------------------------------------------------ a local `flwr run` ($PRIVFED_SIMULATION_IDS)
def folder_from_env() -> Path | None:
    """The folder :data:`ENV` names, or None when it is unset or empty.

    Absolute only: the apps run in folders of Flower's choosing (the SuperLink's working
    directory, Ray's workers), so a relative path would name a different folder in each.
    """
    value = os.environ.get(ENV, "").strip()
    if not value:
        return None
    folder = Path(value).expanduser()
    if not folder.is_absolute():
        raise ConfigError(ENV, "must be an absolute path: Flower runs the apps in folders of its own")
    return folder


def _remake(num_sites: int) -> str:
    return (
        f"make it with `{MAKE_COMMAND} DIR num-sites={num_sites} ...`, "
        "passing the same key=value settings as flwr run's --run-config"
    )


def _registry_for(folder: Path, num_sites: int) -> Registry:
    """The folder's registry, refused in one line unless it registers exactly the run's sites."""
    from common.deploy.registry import Registry

    if not (folder / REGISTRY_FILE).is_file():
        raise ConfigError(ENV, f"{folder} holds no {REGISTRY_FILE}: {_remake(num_sites)}")
    registry = Registry.load(folder / REGISTRY_FILE)
    expected = {site_name(i) for i in range(num_sites)}
    if set(registry.sites) != expected:
        raise ConfigError(
            ENV,
            f"{folder} holds the keys of {len(registry.sites)} simulated site(s), but num-sites is {num_sites}: "
            + _remake(num_sites),
        )
    return registry


def load_for_server(folder: Path, num_sites: int) -> SimulationIdentities:
    """The registry and the coordinator's key for a local ``flwr run`` simulation (the
    ServerApp's side; it never loads a site's private key)."""
    registry = _registry_for(folder, num_sites)
    _server_key(folder, registry)
    return SimulationIdentities(registry, folder / REGISTRY_FILE, folder / KEYS_DIR / SERVER_KEY_FILE, [])


def check_sizes(folder: Path, registered: Sequence[int], run_sizes: Sequence[int]) -> None:
    """The registered n-hats must be the run's training-split sizes: the server weights each
    site by its registered size and refuses a reply declaring another one. The sizes are
    not repeated (error text can reach a coordinator)."""
    if list(registered) != list(run_sizes):
        raise ConfigError(
            ENV,
            f"{folder} declares site sizes of another data split than this run's (num-sites, seed, data.*): "
            + _remake(len(run_sizes)),
        )


@dataclass(frozen=True)
class SimulatedSite:
    """What a simulated node of a local ``flwr run`` gets from :data:`ENV`'s folder."""

    signing_key: Ed25519PrivateKey
    server_public_key: str
    declared_size: int


def load_for_site(folder: Path, num_sites: int, index: int) -> SimulatedSite:
    """Site ``index``'s own key, the coordinator's public key and the site's registered n-hat
    (the ClientApp's side; it never loads the server's or another site's private key)."""
    registry = _registry_for(folder, num_sites)
    key = _site_key(folder, registry, index)
    return SimulatedSite(key, registry.server_key, registry.sites[site_name(index)].declared_size)


def app_config(app_dir: Path, overrides: Iterable[str] = ()) -> RunConfig:
    """The config ``flwr run APP_DIR --run-config "<overrides>"`` runs: the app's
    ``[tool.flwr.app.config]`` with ``key=value`` overrides over it."""
    import tomllib

    from common.config import RunConfig, flatten, parse_override
    from common.runtime import drop_inactive_tasks

    pyproject = app_dir / "pyproject.toml"
    try:
        doc = tomllib.loads(pyproject.read_text(encoding="utf-8"))
        table = doc["tool"]["flwr"]["app"]["config"]
    except OSError:
        raise ConfigError("app", f"{pyproject} cannot be read: --app names the folder `flwr run` bundles") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise ConfigError("app", f"{pyproject} has no readable [tool.flwr.app.config] table") from None
    flat = flatten(table)
    for text in overrides:
        key, value = parse_override(text)
        flat[key] = value
    return RunConfig.from_flat(drop_inactive_tasks(flat))


def make_for_app(
    folder: Path, cfg: RunConfig, key: bytes | None = None, *, force: bool = False
) -> SimulationIdentities:
    """Make the identities of a local ``flwr run`` of ``cfg``: keys for ``num-sites`` sites,
    each registered with its training-split size as its n-hat (what ``privfed simulate``
    declares). ``key``: the federation key of a task that pseudonymises identifiers."""
    from common.tasks import get_task

    if not force and ((folder / REGISTRY_FILE).exists() or (folder / KEYS_DIR).exists()):
        raise PrivfedError(f"{folder} already holds simulation keys (pass --force to replace them)")
    # The folder becomes 0700 and holds private keys: only a new or empty one, never a checkout or
    # a home folder (`privfed keys simulation .` would lock it), unless it already holds keys (--force).
    if folder.exists() and (not folder.is_dir() or folder.is_symlink()):
        raise PrivfedError(f"{folder} is not a folder of its own (a file or a link): name a new folder")
    if folder.is_dir() and any(p.name not in (REGISTRY_FILE, KEYS_DIR) for p in folder.iterdir()):
        raise PrivfedError(f"{folder} holds other files: name a new or empty folder for the simulation keys")
    if (folder / KEYS_DIR).is_symlink():
        raise PrivfedError(f"{folder / KEYS_DIR} is a link: the keys are written only into a real folder")
    if get_task(cfg.task).needs_key and key is None:
        raise ConfigError(
            "key-file",
            f"task {cfg.task!r} pseudonymises identifiers, so its site sizes need the federation key: "
            "pass --key-file or set PRIVFED_KEY_FILE (the sites read the same)",
        )
    return simulation_identities(folder, get_task(cfg.task)(cfg, key).site_sizes())
