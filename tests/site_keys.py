"""Signing keys for sites built in tests (issue 19): every site signs its replies, and a
deployed site is refused without its key, so tests that build sites pass these."""

from __future__ import annotations

from typing import Any

from common.deploy.signing import new_signing_key, public_hex

# One key per partition id (simulation: index = partition id), and the coordinator's.
SITE_KEYS = [new_signing_key() for _ in range(16)]
SERVER_KEY = new_signing_key()
SERVER_PUBLIC = public_hex(SERVER_KEY)


def site_keys() -> dict[str, Any]:
    """make_site / build_client_app keyword arguments for the launcher's keys."""
    return {"signing_keys": SITE_KEYS, "server_public_key": SERVER_PUBLIC}
