"""Where a run's files go, and the checks made before anything is written there.

One home for the launcher (which checks before Ray starts) and the recorder (which
checks again when the ServerApp creates the directory, e.g. under ``flwr run``).
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from common.config import RunConfig
from common.deploy.simulation_ids import KEYS_DIR, REGISTRY_FILE
from common.errors import ConfigError

STAMP_FORMAT = "%Y%m%d-%H%M%S"


def default_run_dir(cfg: RunConfig, now: str | None = None) -> Path:
    """``runs/<timestamp>-<scenario>``; ``now`` is the timestamp (default: the local time)."""
    return Path("runs") / f"{now or datetime.now().strftime(STAMP_FORMAT)}-{cfg.scenario}"


# What the simulation launcher writes into a new run dir just before the run starts: the
# parties' keys and the registry (common/deploy/simulation_ids.py). Deployed: paths of their own.
PREPARED = (KEYS_DIR, REGISTRY_FILE)


def check_new_run_dir(run_dir: Path) -> None:
    """A new run needs an absent or empty directory (but for the launcher's keys and
    registry, :data:`PREPARED`): never mix two runs' ledgers."""
    check_not_a_file(run_dir)
    if run_dir.exists() and any(p.name not in PREPARED for p in run_dir.iterdir()):
        raise ConfigError("run-dir", f"{run_dir} already exists and is not empty")


def check_not_a_file(run_dir: Path) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError("run-dir", f"{run_dir} exists and is not a directory")


def check_resumable_run_dir(run_dir: Path) -> None:
    """A stopped run to continue: its directory with its ledger."""
    check_not_a_file(run_dir)
    if not (run_dir / "ledger.sqlite").is_file():
        raise ConfigError("run-dir", f"{run_dir} has no ledger.sqlite: nothing to resume")
