"""The keys of a simulated federation: one Ed25519 key per virtual site and one for the coordinator.

A deployed federation gets its registry from the sites (``privfed site init`` prints each
site's entry, the coordinator collects them). A simulation plays every party on one
machine, so the launcher makes the keys itself and writes what a deployment would hold:

* ``RUN_DIR`` itself is 0700;
* ``RUN_DIR/keys/server.key`` and ``RUN_DIR/keys/site-<i>.key`` (PEM, mode 0600, in a 0700
  folder): the parties' private keys. In a deployment no party ever holds another's; here
  one machine plays them all, which is what a simulation is;
* ``RUN_DIR/registry.toml``: the public keys and declared sizes, as the coordinator's
  registry and the auditor's reference (``privfed audit RUN_DIR --verify``).

A resumed run loads the same keys, so its sites' signatures still verify.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from common.deploy.fileio import make_private_dir
from common.deploy.registry import RegisteredSite, Registry
from common.deploy.signing import Ed25519PrivateKey, load_signing_key, public_hex, write_signing_key
from common.errors import PrivfedError
from server.run_dir import KEYS_DIR, REGISTRY_FILE, SERVER_KEY_FILE


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


def simulation_identities(run_dir: Path, sizes: Sequence[int], *, resume: bool = False) -> SimulationIdentities:
    """The run's keys and registry: made for a new run (replacing any a failed start left),
    loaded and checked for a resumed one.

    ``sizes``: each virtual site's declared size n-hat, registered as its FedAvg weight cap.
    """
    keys = run_dir / KEYS_DIR
    registry_path = run_dir / REGISTRY_FILE
    server_path = keys / SERVER_KEY_FILE
    if resume:
        if not registry_path.is_file():
            raise PrivfedError(f"{run_dir}: no {REGISTRY_FILE}; the run's keys are needed to resume it")
        registry = Registry.load(registry_path)
        site_keys = [load_signing_key(keys / f"{site_name(i)}.key") for i in range(len(sizes))]
        for i, key in enumerate(site_keys):
            entry = registry.site(site_name(i))
            if entry is None or entry.public_key != public_hex(key):
                raise PrivfedError(f"{registry_path}: site {site_name(i)} is not registered with its key in {keys}")
        if public_hex(load_signing_key(server_path)) != registry.server_key:
            raise PrivfedError(f"{registry_path}: the server key in {keys} is not the registered one")
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
