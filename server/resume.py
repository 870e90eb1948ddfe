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
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.config import RunConfig, flatten
from common.errors import ConfigError, PrivfedError
from server.ledger import Ledger
from server.report import read_metrics


@dataclass
class ResumePoint:
    checkpoint_round: int  # 0: no round completed; the model restarts from the seeded init
    next_round: int
    state: dict[str, torch.Tensor] | None  # the checkpointed model state
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


def resume_point(run_dir: Path, ledger: Ledger, task_name: str) -> ResumePoint:
    ckpt_round, state = 0, None
    path = run_dir / "checkpoint.pt"
    if path.is_file():
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            ckpt_round, state = int(payload["round"]), dict(payload["state"])
            task = payload["task"]
        except Exception as exc:  # written atomically, so this is damage from outside
            raise PrivfedError(f"{path} cannot be read ({type(exc).__name__}: {exc})"[:300]) from None
        if task != task_name:
            raise PrivfedError(f"{path} holds a {task!r} model, but the run's task is {task_name!r}")
    repair_metrics(run_dir / "metrics.jsonl")
    metrics = read_metrics(run_dir / "metrics.jsonl")
    last_line = max((int(m.get("round", 0)) for m in metrics), default=0)
    reached = max(ckpt_round, last_line, ledger.last_round(), ledger.round_started())
    missing = {r: r > ckpt_round for r in range(last_line + 1, reached + 1)}
    return ResumePoint(ckpt_round, reached + 1, state, missing)


def repair_metrics(path: Path) -> None:
    """Cut a line the server was killed in the middle of writing (no final newline)."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])
