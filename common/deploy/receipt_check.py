"""Compare a receipt a site kept with a ledger (or the part of it the coordinator shares).

A receipt (:mod:`common.deploy.receipts`) is the coordinator's signed statement to one
site: "at seq S the ledger's head was H, and these are your rows up to it". Its signature
is checked when the site receives it (``check_receipt``); this module checks, later, that
a ledger someone shows still says the same:

* every row of the site that the receipt lists is in the ledger at its seq, unchanged;
* the ledger holds no row of the site up to that seq that the receipt does not list;
* the ledger's row at the receipt's seq has the signed head as its hash (else the ledger
  was cut or rewritten before that point: every row hash after a change moves), or, when
  only part of the ledger is shared, the ledger's signed head for that round is the same.
  A shared part that holds neither cannot show that nothing was cut: that fails too.

Used by ``privfed site verify`` (a site's own check) and by the auditor
(:func:`server.ledger_audit.check_receipts_against_ledger`). Reasons name seqs, rounds and
fields, never a value.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from common.deploy.receipts import Receipt

__all__ = ["compare"]


def compare(ledger_rows: Sequence[Mapping[str, Any]], heads: Sequence[Mapping[str, Any]], receipt: Receipt) -> str:
    """Why ``ledger_rows``/``heads`` contradict ``receipt``, or '' when they agree.

    ``ledger_rows``: the ledger's rows (all of them, or those shared), each a dict of the
    row's fields including ``seq``, ``site_id`` and ``row_hash``. ``heads``: the ledger's
    signed heads, each with ``round``, ``seq`` and ``head`` (may be empty). The receipt's
    own signature is not checked here (``check_receipt`` does, with the server's key).
    """
    by_seq: dict[int, Mapping[str, Any]] = {}
    for r in ledger_rows:
        seq = r.get("seq")
        if isinstance(seq, int) and not isinstance(seq, bool):
            by_seq[seq] = r
    # 1. Every row the receipt lists is there, unchanged.
    listed: set[int] = set()
    for kept in receipt.rows:
        seq = kept.get("seq")
        if not isinstance(seq, int) or isinstance(seq, bool):
            return "the receipt lists a row without a seq"
        listed.add(seq)
        now = by_seq.get(seq)
        if now is None:
            return f"row seq {seq} of this site, in its receipt of round {receipt.round}, is not in the ledger"
        changed = sorted(k for k, v in kept.items() if k in now and not _same(now[k], v))
        missing = sorted(k for k in kept if k not in now)
        if changed or missing:
            what = ", ".join(changed + missing)
            return f"row seq {seq} of this site differs from its receipt of round {receipt.round} ({what})"
    # 2. No row of this site up to the signed seq that the site was never shown.
    for seq, r in sorted(by_seq.items()):
        if seq <= receipt.seq and r.get("site_id") == receipt.site_id and seq not in listed:
            return f"row seq {seq} is this site's but not in its receipt of round {receipt.round} (inserted later)"
    # 3a. Every head the coordinator signed up to this receipt is still the chain's hash at its seq.
    for rnd, seq, head in receipt.heads:
        if seq > 0 and seq in by_seq and by_seq[seq].get("row_hash") != head:
            return (
                f"the ledger's row at seq {seq} is not the head the coordinator signed for round {rnd} "
                f"(listed in this site's receipt of round {receipt.round}): the ledger was forked or rewritten"
            )
    # 3. The signed head is still the ledger's head at that seq.
    checked_head = False
    if receipt.seq > 0 and receipt.seq in by_seq:
        if by_seq[receipt.seq].get("row_hash") != receipt.head:
            return (
                f"the ledger's row at seq {receipt.seq} is not the head the coordinator signed there "
                f"(round {receipt.round}): the ledger was rewritten or rows were cut or inserted before it"
            )
        checked_head = True
    if heads:
        same_round = [h for h in heads if h.get("round") == receipt.round]
        if not same_round:
            return f"the ledger has no signed head for round {receipt.round}, which this site holds a receipt for"
        h = same_round[0]
        if h.get("seq") != receipt.seq or h.get("head") != receipt.head:
            return (
                f"the ledger's signed head for round {receipt.round} differs from the one in this site's receipt "
                "(a forked or re-signed ledger)"
            )
        checked_head = True
    if receipt.seq > 0 and not checked_head:
        if by_seq and max(by_seq) >= receipt.seq:
            return f"the ledger shown has no row at seq {receipt.seq}, where the coordinator signed this site a head"
        return (
            f"the ledger shown ends before seq {receipt.seq}, where the coordinator signed a head for this site "
            "(rows cut), or shares neither that row nor its signed head"
        )
    return ""


def _same(a: object, b: object) -> bool:
    """Equal values (a bool column read back as 0/1, or an int as a float, is the same)."""
    return a == b
