"""Receipts: the server's signed statement to one site of what the ledger holds for it.

After each round the server signs the ledger head (its seq and hash) with its own key. The
next instruction it sends a site carries a *receipt*: that signed head plus every ledger
row of that site up to it (each row's hashed fields and its ``row_hash``). The site checks
the signature against the coordinator's public key it holds (node config ``server-key``),
checks that the new receipt *extends* the one it kept (its earlier rows unchanged), and
keeps the newest on its own disk.

What that proves later (``privfed site verify``): a ledger whose chain does not contain a
head the server once signed for a site, at its seq, has been rewritten since, whatever its
own hashes and signatures say; and a row a site holds a receipt for cannot have changed.
What it does not prove: rows the server never showed the site (e.g. written after the last
receipt), and anything about other sites' rows.

The receipt format (JSON; the signature covers the canonical encoding of every other key):

    {"v": 1, "run_id": ..., "site_id": ..., "round": r, "seq": s, "head": "<hex>",
     "rows": [{<ledger row fields>, "row_hash": ...}, ...],
     "heads": [[round, seq, head], ...],   # every head signed so far, this one last
     "signature": "<hex>"}

A new receipt must repeat every head of the one the site kept: a coordinator that forks
the ledger (rebuilds it without another site's row, say) and re-signs can leave this
site's own rows intact, but not the heads it already signed for them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from common.deploy.signing import CLAIM_VERSION, Ed25519PrivateKey, sign, verify
from common.errors import PrivfedError

RECEIPT = "receipt"  # the instruction config key that carries it
MAX_RECEIPT_BYTES = 4_000_000  # a receipt of a few thousand rows; more is refused, not parsed


class ReceiptError(PrivfedError):
    """A receipt that does not verify or contradicts an earlier one; names what, never a value."""


@dataclass(frozen=True)
class Receipt:
    run_id: str
    site_id: str
    round: int
    seq: int
    head: str
    rows: tuple[dict[str, Any], ...]
    signature: str
    text: str  # as received: what the site stores
    # Every head the server signed up to this one: (round, seq, head). A new receipt must
    # repeat the ones a site kept, so a fork cannot replace the evidence a site holds.
    heads: tuple[tuple[int, int, str], ...] = ()

    def row_hashes(self) -> list[str]:
        return [str(r.get("row_hash", "")) for r in self.rows]


def make_receipt(
    signer: Ed25519PrivateKey,
    run_id: str,
    site_id: str,
    rnd: int,
    seq: int,
    head: str,
    rows: Sequence[Mapping[str, Any]],
    heads: Sequence[tuple[int, int, str]] = (),
) -> str:
    """The server's receipt for one site (JSON text). ``heads``: every (round, seq, head)
    the server signed up to this one (this one included, added if missing)."""
    chain = [[int(r), int(s), str(h)] for r, s, h in heads]
    if not chain or chain[-1] != [int(rnd), int(seq), head]:
        chain.append([int(rnd), int(seq), head])
    body: dict[str, Any] = {
        "v": CLAIM_VERSION,
        "run_id": run_id,
        "site_id": site_id,
        "round": int(rnd),
        "seq": int(seq),
        "head": head,
        "rows": [dict(r) for r in rows],
        "heads": chain,
    }
    return json.dumps({**body, "signature": sign(signer, body)}, sort_keys=True, separators=(",", ":"))


def check_receipt(text: object, server_key: str, site_id: str, run_id: str) -> Receipt:
    """Parse and verify a receipt meant for ``site_id`` in ``run_id``; :class:`ReceiptError` otherwise."""
    if not isinstance(text, str) or len(text) > MAX_RECEIPT_BYTES:
        raise ReceiptError("receipt: not a string of bounded size")
    try:
        raw = json.loads(text)
    except ValueError:
        raise ReceiptError("receipt: not valid JSON") from None
    if not isinstance(raw, dict) or raw.get("v") != CLAIM_VERSION:
        raise ReceiptError("receipt: not a privfed receipt of this version")
    body = {k: v for k, v in raw.items() if k != "signature"}
    if not verify(server_key, body, raw.get("signature")):
        raise ReceiptError("receipt: the signature does not verify against the coordinator's key (server-key)")
    if raw.get("site_id") != site_id or raw.get("run_id") != run_id:
        raise ReceiptError("receipt: issued for another site or run")
    rows = raw.get("rows")
    ok = (
        isinstance(rows, list)
        and all(isinstance(r, dict) and r.get("site_id") == site_id for r in rows)
        and isinstance(raw.get("seq"), int)
        and isinstance(raw.get("round"), int)
        and isinstance(raw.get("head"), str)
    )
    if not ok or not isinstance(rows, list):
        raise ReceiptError("receipt: malformed (rows, seq, round or head)")
    chain = raw.get("heads")
    heads_ok = isinstance(chain, list) and all(
        isinstance(h, list)
        and len(h) == 3
        and all(isinstance(v, int) and not isinstance(v, bool) for v in h[:2])
        and isinstance(h[2], str)
        for h in chain
    )
    if not heads_ok or not isinstance(chain, list) or not chain or chain[-1] != [raw["round"], raw["seq"], raw["head"]]:
        raise ReceiptError("receipt: malformed (heads: every signed head up to this one, this one last)")
    heads = tuple((int(r), int(q), str(h)) for r, q, h in chain)
    return Receipt(run_id, site_id, raw["round"], raw["seq"], raw["head"], tuple(rows), raw["signature"], text, heads)


def extends(old: Receipt, new: Receipt) -> str:
    """Why ``new`` does not extend ``old`` (a rewritten history), or ''."""
    if new.seq < old.seq:
        return f"the new receipt's head (seq {new.seq}) is older than the kept one's (seq {old.seq})"
    if new.seq == old.seq and new.head != old.head:
        return f"two different heads were signed at seq {new.seq}"
    now = {r: (q, h) for r, q, h in new.heads}
    for r, q, h in old.heads:
        if now.get(r) != (q, h):
            return f"the head the coordinator signed for round {r} is missing or changed in its new receipt (a fork)"
    old_hashes, new_hashes = old.row_hashes(), new.row_hashes()
    if new_hashes[: len(old_hashes)] != old_hashes:
        return "a row of this site the coordinator signed for earlier has changed or vanished"
    return ""
