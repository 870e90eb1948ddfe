"""A site's own durable state: its accounting history, its site-local model part and (with
``train.keep-optimizer-state``) its optimiser's state.

Flower keeps a node's ``context.state`` only as long as the SuperNode's run. A site that
must survive a restart of the server (``privfed resume``) or of itself keeps a copy on its
own disk, under ``state-dir`` (node config; in simulation the launcher picks a folder in
the run directory). The file is keyed by the server's run id, so a new run starts a new
history, and is replaced atomically after every round the site trains, before its
reply leaves: the site never forgets a round it spent privacy on.

The run id is the coordinator's choice, so that history cannot carry a budget: a new
run id would reset it. Beside it the site keeps its dataset's **lifetime** history,
``<state-dir>/datasets/<dataset-id>.json`` (:class:`Lifetime`), keyed by the dataset
(``common.deploy.site_config.dataset_identity``), never by the run: every round it trained
under any run, with the (sigma, q, steps, delta) it used. The budget check composes it.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import astuple, dataclass, field
from pathlib import Path
from typing import IO

import torch

from common.deploy.fileio import make_private_dir, write_atomically
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
    # The DP-trained optimiser's per-parameter state (train.keep-optimizer-state): Adam's
    # moments of the noised gradients, post-processing, never sent. Files without it load as {}.
    optimizer: dict[str, torch.Tensor] = field(default_factory=dict)


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
        optimizer = {str(k): v for k, v in raw.get("optimizer", {}).items()}
        if not all(isinstance(v, torch.Tensor) for v in (*local.values(), *optimizer.values())):
            raise TypeError("a model or optimiser entry is not a tensor")
    except Exception as exc:  # truncated or foreign file: refuse rather than forget spent privacy
        raise PrivfedError(
            f"site state {path} cannot be read ({type(exc).__name__}); move it aside only if you know this site's spend"
        ) from None
    return SiteState(history, local, metrics, optimizer)


def save_state(path: Path, state: SiteState) -> None:
    """Atomic and durable (the folder is fsync'ed too): the site never forgets a round it
    spent privacy on, even across a power loss. The folders are 0700 and the file 0600:
    a site's history and local model are its own."""
    make_private_dir(path.parent)
    payload = {
        "history": [list(h) for h in state.history],
        "local": state.local,
        "metrics": [list(m) for m in state.metrics],
        "optimizer": state.optimizer,
    }
    write_atomically(path, lambda fh: torch.save(payload, fh))


@dataclass(frozen=True)
class LifetimeEntry:
    """One round a site trained on its dataset, in any run."""

    run_id: str
    round: int
    sigma: float
    q: float
    steps: int
    delta: float
    accountant: str
    # dp.unit of the run that spent it: an epsilon per record does not bound a person's loss,
    # nor the reverse, so a dataset's history keeps one unit (client.app refuses a switch).
    unit: str = "record"

    @property
    def key(self) -> tuple[str, int] | None:
        """(run id, round): one spend per round of a run, however often it is recorded
        (a resumed run re-reads its history); None without a run id (never merged)."""
        return (self.run_id, self.round) if self.run_id else None


class Lifetime:
    """A dataset's privacy history across every run: ``<state-dir>/datasets/<dataset-id>.json``.

    Written atomically and durably (common.deploy.fileio.write_atomically) before a trained
    round's reply leaves the site. A damaged file is an error, never a fresh budget.
    """

    def __init__(self, state_dir: str | Path, dataset_id: str) -> None:
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", dataset_id) or "_"
        if set(safe) == {"."}:
            raise PrivfedError("dataset-id must not be '.' or '..' (it names a file under the site's state-dir)")
        self.path = Path(state_dir) / "datasets" / f"{safe}.json"

    def load(self) -> list[LifetimeEntry]:
        if not self.path.is_file():
            return []
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
            entries = [
                LifetimeEntry(
                    str(e[0]),
                    int(e[1]),
                    float(e[2]),
                    float(e[3]),
                    int(e[4]),
                    float(e[5]),
                    str(e[6]),
                    str(e[7]) if len(e) > 7 else "record",  # files from before units were kept
                )
                for e in raw["rounds"]
            ]
            if not all(math.isfinite(e.sigma) and 0 < e.q <= 1 and e.steps >= 0 for e in entries):
                raise ValueError("entry out of range")
            if any(e.unit not in ("record", "user") for e in entries):
                raise ValueError("unknown unit")
        except Exception as exc:  # truncated or foreign: refuse rather than forget spent privacy
            raise PrivfedError(
                f"lifetime history {self.path} cannot be read ({type(exc).__name__}); "
                "move it aside only if you know this dataset's spend"
            ) from None
        return entries

    def record(self, entry: LifetimeEntry) -> None:
        """Add one trained round. The same entry recorded again (a resumed run re-reads its
        history) counts once; an entry under the same (run id, round) with other values is a
        second spend and is kept beside the first: the history may over-count, never under-count."""
        entries = [e for e in self.load() if e != entry] + [entry]
        make_private_dir(self.path.parent)
        data = json.dumps({"rounds": [list(astuple(e)) for e in entries]}, indent=0).encode()

        def write(fh: IO[bytes]) -> None:
            fh.write(data)

        write_atomically(self.path, write)

    @staticmethod
    def merged(saved: list[LifetimeEntry], this_run: list[LifetimeEntry]) -> list[tuple[float, float, int]]:
        """The (sigma, q, steps) of every round on file plus this run's rounds not yet on it
        (a run state written before the lifetime file existed). A round without a run id is
        on file already: every trained round is recorded there before its reply leaves."""
        known = {e.key for e in saved if e.key is not None}
        extra = [e for e in this_run if e.key is not None and e.key not in known]
        return [(e.sigma, e.q, e.steps) for e in saved + extra if e.steps > 0]
