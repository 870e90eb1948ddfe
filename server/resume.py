"""Where a stopped run picks up: its checkpoint, its ledger and its metrics, reconciled.

The server writes, in this order, per round ``r``:

1. ``ledger.start_round(r)`` (ledger meta), before any site is asked to train;
2. the round's ledger rows, when the replies are in (one transaction);
3. ``checkpoint.pt`` (model, round, ledger position), atomically;
4. the round's ``metrics.jsonl`` line, with the ledger head.

A kill can land between any two steps. Resuming continues after the *highest round any
of them reached*: a round that was begun is never run again under the same number,
because sites may have trained in it and their spend may still be reported (and
ledgered) later; re-running it would collide with those rows. Rows already in the
ledger stay: privacy spent in an interrupted round was spent. The model continues from
the checkpoint; the updates of rounds after it are lost, and say so in metrics.jsonl.

Before continuing, the ledger is checked against what was written alongside it: its chain
must be intact, the head stored in ``checkpoint.pt`` must be the chain's hash at the
checkpoint's row count (a ledger cut or rewritten since the checkpoint is refused), and,
given the server's key, every signed head must verify and sit in the chain at its seq.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.config import RunConfig, flatten
from common.deploy import signing
from common.errors import ConfigError, PrivfedError
from server.ledger import Ledger, genesis_hash, head_claim
from server.run_files import read_metrics


@dataclass
class ResumePoint:
    checkpoint_round: int  # 0: no round completed; the model restarts from the seeded init
    next_round: int
    state: dict[str, torch.Tensor] | None  # the checkpointed model state
    # federation.ema-decay: the checkpointed average of the global models (None: none kept).
    served: dict[str, torch.Tensor] | None = None
    # Rounds after the last metrics line that need one: round -> True if its update was lost.
    missing_lines: dict[int, bool] = field(default_factory=dict)


def stored_config(run_dir: Path) -> RunConfig:
    """The resolved config the run started with (``config.toml``)."""
    path = run_dir / "config.toml"
    if not path.is_file():
        raise PrivfedError(f"{run_dir}: no config.toml, so not a privfed run directory (or it never started)")
    try:
        return RunConfig.from_flat(flatten(tomllib.loads(path.read_text(encoding="utf-8"))))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise PrivfedError(f"{path}: not valid TOML ({exc})") from None


def check_same_config(cfg: RunConfig, run_dir: Path) -> None:
    """A resumed run must be the run it continues: same data, privacy and schedule."""
    stored = stored_config(run_dir).to_flat()
    now = cfg.to_flat()
    for key in sorted(set(stored) | set(now)):
        if key in ("resume", "run-dir"):
            continue
        if stored.get(key) != now.get(key):
            raise ConfigError(
                key,
                f"is {now.get(key)!r} but the run in {run_dir} used {stored.get(key)!r}; "
                "a resumed run keeps its config",
            )


def resume_point(
    run_dir: Path,
    ledger: Ledger,
    task_name: str,
    server_key: str | signing.Ed25519PrivateKey | None = None,
) -> ResumePoint:
    """Where the run continues. ``server_key`` (the coordinator's key, or its public key as
    hex): also check every signed ledger head against it (:func:`check_ledger`)."""
    ckpt_round, state = 0, None
    served: dict[str, torch.Tensor] | None = None
    path = run_dir / "checkpoint.pt"
    stored_head: tuple[int, str] | None = None
    if path.is_file():
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            ckpt_round, state = int(payload["round"]), dict(payload["state"])
            served = dict(payload["served"]) if "served" in payload else None
            task = payload["task"]
            if "ledger_head" in payload:
                stored_head = (int(payload["ledger_rows"]), str(payload["ledger_head"]))
        except Exception as exc:  # written atomically, so this is damage from outside
            raise PrivfedError(f"{path} cannot be read ({type(exc).__name__}: {exc})"[:300]) from None
        if task != task_name:
            raise PrivfedError(f"{path} holds a {task!r} model, but the run's task is {task_name!r}")
    check_ledger(ledger, stored_head, server_key)
    repair_metrics(run_dir / "metrics.jsonl")
    metrics = read_metrics(run_dir / "metrics.jsonl")
    last_line = max((int(m.get("round", 0)) for m in metrics), default=0)
    reached = max(ckpt_round, last_line, ledger.last_round(), ledger.round_started())
    missing = {r: r > ckpt_round for r in range(last_line + 1, reached + 1)}
    return ResumePoint(ckpt_round, reached + 1, state, missing_lines=missing, served=served)


def check_ledger(
    ledger: Ledger,
    checkpoint_head: tuple[int, str] | None,
    server_key: str | signing.Ed25519PrivateKey | None = None,
) -> None:
    """Refuse to continue a ledger that was cut or rewritten since it was last written.

    ``checkpoint_head``: (rows, head hash) as ``checkpoint.pt`` stored them. The chain must
    be intact, and its hash after that many rows must be that head; with ``server_key``,
    every signed head must verify under it and be the chain's hash at its seq."""
    result = ledger.verify(recompute=False)  # ε is the audit's to recompute; this is the chain
    if not result.ok:
        where = f"row seq {result.first_bad_seq}" if result.first_bad_seq is not None else "its end"
        raise PrivfedError(f"{ledger.path}: the hash chain is broken at {where} ({result.reason}); not resuming")
    hashes = {r.seq: r.row_hash for r in ledger.rows()}
    hashes[0] = genesis_hash(ledger.run_id)
    if checkpoint_head is not None:
        rows, head = checkpoint_head
        if hashes.get(rows) != head:
            raise PrivfedError(
                f"{ledger.path}: the ledger head stored in checkpoint.pt (after {rows} rows) is not in the "
                "ledger's chain: the ledger was cut or rewritten since the checkpoint; not resuming"
            )
    if server_key is None:
        return
    public = server_key if isinstance(server_key, str) else signing.public_hex(server_key)
    for h in ledger.heads():
        body = head_claim(ledger.run_id, h["round"], h["seq"], h["head"])
        if not signing.verify(public, body, h["signature"]) or hashes.get(h["seq"]) != h["head"]:
            raise PrivfedError(
                f"{ledger.path}: the signed ledger head of round {h['round']} does not verify under the "
                "server's key or is not in the chain at its seq; not resuming"
            )


def repair_metrics(path: Path) -> None:
    """Cut a line the server was killed in the middle of writing (no final newline)."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        # Truncated in place and fsync'ed: rewriting the file (write_bytes empties it first)
        # could lose every line, each round's ledger head with them, to a crash meanwhile.
        with path.open("r+b") as fh:
            fh.truncate(data.rfind(b"\n") + 1)
            fh.flush()
            os.fsync(fh.fileno())
