"""The federation key and keyed pseudonymisation of identifiers.

Every partner site holds the same secret *federation key*. Straight after a data file is
parsed, each user and item identifier is replaced by ``HMAC-SHA256(key, domain || id)``
(``cryptography``'s HMAC). Without the key, a pseudonym cannot be linked back to a raw
identifier by hashing candidate ids (a plain hash could be), and the server never holds
the key. The domain prefix keeps user ``"5"`` and item ``"5"`` apart.

Items must land in the same row of the shared embedding table at every site, so the item
pseudonym is reduced to a bucket ``int(digest[:8]) mod num_buckets``. Two items that share
a bucket share an embedding (a collision); the expected fraction of ``n`` items that
collide is ``1 - (1 - 1/B)^(n - 1)`` (about n/B), reported by the recommender task.

The key file holds one line, ``privfed-federation-key-v1:<64 hex digits>`` (256 random bits
from :mod:`secrets`), is written with mode 0600, and is refused when group or others can
read it. It is passed by path (``--key-file``, a SuperNode's ``key-file`` node config) or
by the ``PRIVFED_KEY_FILE`` environment variable; it never enters the run config, the
metrics, the logs or the ledger.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from cryptography.hazmat.primitives import hashes, hmac

from common.deploy.fileio import write_new_file
from common.errors import PrivfedError

KEY_ENV = "PRIVFED_KEY_FILE"
_HEADER = "privfed-federation-key-v1:"
KEY_BYTES = 32


class KeyFileError(PrivfedError):
    """A missing, unreadable, malformed or over-exposed key file."""

    def __init__(self, path: object, message: str) -> None:
        super().__init__(f"key file '{path}': {message}")


def write_key(path: str | Path, force: bool = False) -> Path:
    """Create a new federation key file with mode 0600; refuse to overwrite unless ``force``."""
    p = Path(path)
    if not p.parent.is_dir():
        raise KeyFileError(p, f"directory {p.parent} does not exist")
    text = _HEADER + secrets.token_bytes(KEY_BYTES).hex() + "\n"
    try:
        write_new_file(p, text.encode(), 0o600, force)
    except FileExistsError:
        raise KeyFileError(
            p, "already exists (pass --force to replace it; every site then needs the new key)"
        ) from None
    return p


def load_key(path: str | Path) -> bytes:
    """Read a federation key, refusing files that group or others may read."""
    p = Path(path)
    if not p.is_file():
        raise KeyFileError(p, "not found (create one with `privfed keys new PATH`)")
    mode = stat.S_IMODE(p.stat().st_mode)
    if mode & 0o077:
        raise KeyFileError(p, f"is readable by group/others (mode {mode:04o}); run: chmod 600 {p}")
    try:
        text = p.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(p, f"cannot be read ({type(exc).__name__})") from None
    body = text[len(_HEADER) :] if text.startswith(_HEADER) else None
    try:
        key = bytes.fromhex(body) if body is not None else b""
    except ValueError:
        key = b""
    if len(key) != KEY_BYTES:
        # Never echo the file's content: it may be a real key in the wrong format.
        raise KeyFileError(p, f"is not a privfed federation key (expected '{_HEADER}' and {KEY_BYTES * 2} hex digits)")
    return key


def key_from_env() -> bytes | None:
    """The key named by ``$PRIVFED_KEY_FILE``, or None when the variable is unset."""
    path = os.environ.get(KEY_ENV)
    return load_key(path) if path else None


class Pseudonymizer:
    """Keyed pseudonyms for identifiers (HMAC-SHA256 under the federation key)."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("federation key must be at least 128 bits")
        self._key = key

    def _mac(self, domain: bytes, raw: str) -> bytes:
        h = hmac.HMAC(self._key, hashes.SHA256())
        h.update(domain + b"\x00" + raw.encode("utf-8"))
        return h.finalize()

    def user(self, raw: str) -> bytes:
        """A user's pseudonym (32 bytes). It stays at the site."""
        return self._mac(b"privfed/user", raw)

    def item_bucket(self, raw: str, num_buckets: int) -> int:
        """The shared embedding row of an item: the same at every site holding the key."""
        return int.from_bytes(self._mac(b"privfed/item", raw)[:8], "big") % num_buckets

    def split_draw(self, user: str, item: str) -> float:
        """A rating's keyed draw in [0, 1): HMAC-SHA256 of ``(user, item)``, its top 53 bits / 2^53.

        The rating is held out when the draw is below the held-out fraction, so its side
        depends on nothing but itself and the key: adding or removing another rating moves
        no rating (issue 18). The user id is length-prefixed, so ``("ab", "c")`` and
        ``("a", "bc")`` differ; the domain keeps the draw independent of the pseudonyms.
        Without the key the split cannot be predicted (HMAC is a PRF).
        """
        u = user.encode("utf-8")
        h = hmac.HMAC(self._key, hashes.SHA256())
        h.update(b"privfed/split\x00" + len(u).to_bytes(8, "big") + u + item.encode("utf-8"))
        return (int.from_bytes(h.finalize()[:8], "big") >> 11) / 2**53

    def __repr__(self) -> str:  # never show the key in logs or tracebacks
        return "Pseudonymizer(<federation key>)"


def expected_collision_rate(num_items: int, num_buckets: int) -> float:
    """Expected fraction of ``num_items`` items that share a bucket with another item."""
    if num_items <= 1:
        return 0.0
    return 1.0 - (1.0 - 1.0 / num_buckets) ** (num_items - 1)
