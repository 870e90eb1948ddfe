"""Ed25519 signing keys and signed claims: what lets an auditor check the ledger against keys.

Every party that writes into the privacy record signs what it says with its own key
(``cryptography``'s Ed25519; nothing home-made):

* a **site** signs each reply's *claim*: the run id, the round, the message kind, a
  digest of the update it sends, and every metric of the reply (its accountant inputs,
  status, history, metrics releases). The ledger keeps the claim and its signature, so
  anyone holding the site's public key can check that a row says what the site said;
* the **server** signs each round's ledger head, and the *receipts* it sends the sites.

A claim is a JSON object; what is signed is its canonical encoding (:func:`canonical`:
sorted keys, no spaces, ``Infinity``/``NaN`` as JSON's extension writes them), so two
parties that hold the same values sign and check the same bytes.

Key files: the private key is a PKCS#8 PEM written with mode 0600 (never overwritten
without ``force``); the public key travels as 64 hex digits (the raw 32 bytes), which is
what the federation registry (:mod:`common.deploy.registry`) and the site config hold.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from common.deploy.fileio import write_new_file
from common.errors import PrivfedError

__all__ = [
    "CLAIM_VERSION",
    "SIGNATURE",
    "Ed25519PrivateKey",
    "SigningKeyError",
    "canonical",
    "load_signing_key",
    "new_signing_key",
    "parse_public_key",
    "parse_refusal",
    "refusal_claim",
    "refusal_token",
    "public_hex",
    "reply_claim",
    "sign",
    "update_digest",
    "verify",
    "write_signing_key",
]

CLAIM_VERSION = 1
SIGNATURE = "signature"  # the reply metric that holds the site's signature (hex)
MASKED = "masked"  # the update digest of a SecAgg+ reply: the server never sees the site's own vector


class SigningKeyError(PrivfedError):
    """A missing, unreadable, malformed or over-exposed signing key file."""

    def __init__(self, path: object, message: str) -> None:
        super().__init__(f"signing key '{path}': {message}")


def new_signing_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def private_bytes(key: Ed25519PrivateKey) -> bytes:
    pem, pkcs8 = serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8
    return key.private_bytes(pem, pkcs8, serialization.NoEncryption())


def write_signing_key(path: str | Path, key: Ed25519PrivateKey | None = None, force: bool = False) -> Ed25519PrivateKey:
    """Write a (new) Ed25519 private key as PEM with mode 0600; refuse to overwrite unless ``force``."""
    p = Path(path)
    if not p.parent.is_dir():
        raise SigningKeyError(p, f"directory {p.parent} does not exist")
    key = key or new_signing_key()
    try:
        write_new_file(p, private_bytes(key), 0o600, force)
    except FileExistsError:
        raise SigningKeyError(p, "already exists (pass --force to replace it; re-register its public key)") from None
    return key


def pem_signing_key(pem: bytes) -> Ed25519PrivateKey:
    """An Ed25519 key from PEM bytes held in memory (the launcher's virtual sites)."""
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise PrivfedError("signing key: not an Ed25519 key")
    return key


def load_signing_key(path: str | Path) -> Ed25519PrivateKey:
    """An Ed25519 private key from a PEM file that only its owner can read."""
    p = Path(path).expanduser()
    try:
        mode = os.stat(p).st_mode
        data = p.read_bytes()
    except OSError as exc:
        raise SigningKeyError(p, f"cannot be read ({exc.strerror})") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SigningKeyError(p, "is readable by group or others (chmod 600 it)")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise SigningKeyError(p, "is not an unencrypted PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(p, "is not an Ed25519 key (make one with `privfed keys signing PATH`)")
    return key


def public_hex(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """The public key as 64 hex digits (raw encoding), as registries and receipts carry it."""
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def parse_public_key(text: str, what: str = "public key") -> Ed25519PublicKey:
    """64 hex digits -> an Ed25519 public key; a one-line error naming ``what`` otherwise."""
    try:
        raw = bytes.fromhex(text.strip())
        if len(raw) != 32:
            raise ValueError
        return Ed25519PublicKey.from_public_bytes(raw)
    except (ValueError, AttributeError):
        raise PrivfedError(f"{what}: must be an Ed25519 public key as 64 hex digits") from None


def canonical(obj: Any) -> bytes:
    """The bytes that are signed: sorted keys, no whitespace, UTF-8. Floats are written by
    ``repr`` (round-trip exact), so the same values always give the same bytes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=True, ensure_ascii=True).encode()


def sign(key: Ed25519PrivateKey, obj: Any) -> str:
    """The Ed25519 signature of ``canonical(obj)``, as hex."""
    return key.sign(canonical(obj)).hex()


def verify(public_key: str | Ed25519PublicKey, obj: Any, signature: object) -> bool:
    """Whether ``signature`` (hex) is the key's signature of ``canonical(obj)``. Never raises
    on hostile input: a malformed key or signature is simply not valid."""
    if not isinstance(signature, str) or len(signature) != 128:
        return False
    try:
        pub = parse_public_key(public_key) if isinstance(public_key, str) else public_key
        pub.verify(bytes.fromhex(signature), canonical(obj))
    except (InvalidSignature, ValueError, PrivfedError):
        return False
    return True


def update_digest(arrays: Sequence[np.ndarray]) -> str:
    """SHA-256 over each array's dtype, shape and bytes: what a site's signature binds its update to."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def reply_claim(run_id: str, rnd: int, kind: str, update: str, metrics: Mapping[str, Any]) -> dict[str, Any]:
    """What a site signs for one reply: every metric it sends (but the signature itself),
    bound to the run, the round, the message kind (``fit``/``evaluate``) and the update's
    digest (:data:`MASKED` under SecAgg+, where the server never sees the site's vector)."""
    return {
        "v": CLAIM_VERSION,
        "run_id": run_id,
        "round": int(rnd),
        "kind": kind,
        "update": update,
        "metrics": {k: v for k, v in metrics.items() if k != SIGNATURE},
    }


# ------------------------------------------------------------------ refusals
# A site that refuses a run config by its own policy fails the message (client.mods), and
# the failure text is the only thing that reaches the server. It carries a signed claim
# ("site S refused config key K in round R of run U"), so the server can ledger the
# refusal under the right site and an auditor can check it: base64url, no quotes or spaces,
# so it survives whatever quoting Flower applies to error text.
REFUSAL_TAG = "signed-refusal"
_REFUSAL_RE = re.compile(REFUSAL_TAG + r":([A-Za-z0-9_-]{1,2048}={0,2}):([0-9a-f]{128})")


def refusal_claim(run_id: str, rnd: int, site_id: str, key: str) -> dict[str, Any]:
    return {"v": CLAIM_VERSION, "run_id": run_id, "round": int(rnd), "kind": "refusal", "site_id": site_id, "key": key}


def refusal_token(signer: Ed25519PrivateKey, claim: Mapping[str, Any]) -> str:
    """``signed-refusal:<base64url(canonical claim)>:<hex signature>``, for the failure text."""
    body = base64.urlsafe_b64encode(canonical(claim)).decode()
    return f"{REFUSAL_TAG}:{body}:{sign(signer, claim)}"


def parse_refusal(text: str) -> tuple[dict[str, Any], str] | None:
    """(claim, signature) of the first refusal token in ``text``, or None. The signature is
    *not* checked here: the caller checks it against the claimed site's registered key."""
    m = _REFUSAL_RE.search(text)
    if m is None:
        return None
    try:
        claim = json.loads(base64.urlsafe_b64decode(m.group(1)))
    except ValueError:
        return None
    if not isinstance(claim, dict) or claim.get("kind") != "refusal":
        return None
    return claim, m.group(2)
