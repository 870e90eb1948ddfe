"""A site's own durable state: its accounting history and its site-local model part.

Flower keeps a node's ``context.state`` only as long as the SuperNode's run. A site that
must survive a restart of the server (``privfed resume``) or of itself keeps a copy on its
own disk, under ``state-dir`` (node config; in simulation the launcher picks a folder in
the run directory). The file is keyed by the server's run id, so a new run starts a new
history, and is replaced atomically after every round the site trains, before its
reply leaves: the site never forgets a round it spent privacy on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.deploy.fileio import write_atomically
from common.errors import PrivfedError

# (round, noise multiplier, sample rate, steps) for each round the site trained.
HistoryEntry = tuple[int, float, float, int]


@dataclass
class SiteState:
    history: list[HistoryEntry] = field(default_factory=list)
    local: dict[str, torch.Tensor] = field(default_factory=dict)  # site-local model tensors
    # (round, noise multiplier) of each noisy metrics release (metrics.dp), charged to the
    # site's own budget like its training rounds.
    metrics: list[tuple[int, float]] = field(default_factory=list)


def state_path(state_dir: str | Path, run_id: str, site_id: str) -> Path:
    """``<state-dir>/<run-id>/<site-id>.pt``, with both names made safe for a file system.

    The run id comes from the coordinator, so it must never name a folder outside
    ``state-dir``: characters other than letters, digits, ``.``, ``_`` and ``-`` become
    ``_``, and a name of dots only (``.``, ``..``) is refused rather than mapped.
    """
    safe = [re.sub(r"[^A-Za-z0-9._-]", "_", part) or "_" for part in (run_id, site_id)]
    for key, part in zip(("run-id", "site-id"), safe):
        if set(part) == {"."}:
            raise PrivfedError(f"{key} must not be '.' or '..' (it names a folder under the site's state-dir)")
    return Path(state_dir) / safe[0] / f"{safe[1]}.pt"


def load_state(path: Path) -> SiteState | None:
    """The saved state, or None if there is none yet; a damaged file is an error, not a reset."""
    if not path.is_file():
        return None
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
        history = [(int(r), float(s), float(q), int(k)) for r, s, q, k in raw["history"]]
        local = {str(k): v for k, v in raw["local"].items()}
        metrics = [(int(r), float(z)) for r, z in raw.get("metrics", [])]
    except Exception as exc:  # truncated or foreign file: refuse rather than forget spent privacy
        raise PrivfedError(
            f"site state {path} cannot be read ({type(exc).__name__}); move it aside only if you know this site's spend"
        ) from None
    return SiteState(history, local, metrics)


def save_state(path: Path, state: SiteState) -> None:
    """Atomic and durable (the folder is fsync'ed too): the site never forgets a round it
    spent privacy on, even across a power loss."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "history": [list(h) for h in state.history],
        "local": state.local,
        "metrics": [list(m) for m in state.metrics],
    }
    write_atomically(path, lambda fh: torch.save(payload, fh))
