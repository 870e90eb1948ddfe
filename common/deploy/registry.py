"""The federation registry: who the sites are, by key, and what each declared before the run.

The coordinator keeps one TOML file, written from what each site sends it out of band
(``privfed site init`` prints the site's entry):

    [server]
    public-key = "<64 hex>"          # the coordinator's Ed25519 key: signs ledger heads and receipts

    [[site]]
    site-id = "hospital-a"           # the pseudonym the ledger shows (common.identifiers)
    public-key = "<64 hex>"          # the site's Ed25519 key: signs its replies
    declared-size = 1200             # its public training-set size n-hat: its FedAvg weight cap
    supernode-key = "..."            # optional: the SuperNode auth public key, for the operator's records

The server trusts a reply's ``site_id`` only when the reply is signed by that site's
registered key, and weights it by the registered ``declared-size``, never by what the
reply says. An auditor checks every ledger row against these keys
(``privfed audit --verify --registry``). The simulation launcher writes a registry for
its virtual sites.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.deploy.fileio import write_text_atomically
from common.deploy.signing import parse_public_key
from common.errors import ConfigError, PrivfedError
from common.identifiers import site_id_problem


@dataclass(frozen=True)
class RegisteredSite:
    site_id: str
    public_key: str  # Ed25519, 64 hex digits
    declared_size: int
    supernode_key: str = ""


@dataclass(frozen=True)
class Registry:
    server_key: str  # Ed25519, 64 hex digits
    sites: dict[str, RegisteredSite] = field(default_factory=dict)

    def site(self, site_id: str) -> RegisteredSite | None:
        return self.sites.get(site_id)

    def to_toml(self) -> str:
        import tomli_w

        body: dict[str, Any] = {
            "server": {"public-key": self.server_key},
            "site": [
                {
                    "site-id": s.site_id,
                    "public-key": s.public_key,
                    "declared-size": s.declared_size,
                    **({"supernode-key": s.supernode_key} if s.supernode_key else {}),
                }
                for s in self.sites.values()
            ],
        }
        return "# privfed federation registry: the sites' and the server's public keys\n" + tomli_w.dumps(body)

    def write(self, path: str | Path) -> Path:
        """Atomically and durably (common.deploy.fileio): the run directory's copy is the
        auditor's reference, so a crash must not leave it torn. Public keys only: 0644."""
        p = Path(path)
        write_text_atomically(p, self.to_toml(), mode=0o644)
        return p

    @classmethod
    def build(cls, server_key: str, sites: Iterable[RegisteredSite]) -> Registry:
        out: dict[str, RegisteredSite] = {}
        for s in sites:
            why = site_id_problem(s.site_id)
            if why:
                raise ConfigError("registry site-id", why)
            if s.site_id in out:
                raise ConfigError("registry site-id", "appears twice; each site is registered once")
            parse_public_key(s.public_key, f"registry public-key of site {s.site_id}")
            if isinstance(s.declared_size, bool) or not isinstance(s.declared_size, int) or s.declared_size < 1:
                raise ConfigError("registry declared-size", f"of site {s.site_id} must be a positive integer")
            out[s.site_id] = s
        keys = [s.public_key.lower() for s in out.values()]
        if len(set(keys)) != len(keys):
            raise ConfigError("registry public-key", "two sites share one key; each site needs its own")
        parse_public_key(server_key, "registry [server] public-key")
        return cls(server_key.lower(), out)

    @classmethod
    def load(cls, path: str | Path) -> Registry:
        p = Path(path)
        if not p.is_file():
            raise PrivfedError(f"registry '{p}': not found")
        try:
            raw = tomllib.loads(p.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise PrivfedError(f"registry '{p}': not valid TOML ({str(exc).splitlines()[0]})") from None
        unknown = sorted(set(raw) - {"server", "site"})
        if unknown:
            raise ConfigError(unknown[0], f"unknown table in registry {p}")
        server = raw.get("server")
        if not isinstance(server, dict) or not isinstance(server.get("public-key"), str):
            raise ConfigError("server.public-key", f"missing from registry {p}")
        entries = raw.get("site", [])
        if not isinstance(entries, list):
            raise ConfigError("site", f"must be an array of tables ([[site]]) in registry {p}")
        sites = []
        allowed = {"site-id", "public-key", "declared-size", "supernode-key"}
        for i, e in enumerate(entries, start=1):
            if not isinstance(e, dict):
                raise ConfigError("site", f"entry {i} of registry {p} is not a table")
            extra = sorted(set(e) - allowed)
            if extra:
                raise ConfigError(extra[0], f"unknown key in site entry {i} of registry {p}")
            for key in ("site-id", "public-key", "declared-size"):
                if key not in e:
                    raise ConfigError(key, f"missing from site entry {i} of registry {p}")
            if not isinstance(e["site-id"], str) or not isinstance(e["public-key"], str):
                raise ConfigError("site-id", f"site entry {i} of registry {p}: site-id and public-key are strings")
            node_key = str(e.get("supernode-key", ""))
            sites.append(RegisteredSite(e["site-id"], e["public-key"].lower(), e["declared-size"], node_key))
        return cls.build(server["public-key"], sites)
