"""Shared plumbing of the benchmark suite: machine facts, round stamps, process-tree memory.

Every number the suite reports is a ratio of two things measured side by side in one
run, because this machine is shared and its absolute timings drift. What lives here is
what more than one section needs.
"""

from __future__ import annotations

import io
import os
import platform
import re
import statistics
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

ROUND_LINE = re.compile(r"round\s+(\d+)/\d+")


def machine_info() -> dict[str, object]:
    """What the numbers were measured on (for the JSON and the README)."""
    import flwr
    import opacus
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "flwr": flwr.__version__ if hasattr(flwr, "__version__") else _dist_version("flwr"),
        "opacus": opacus.__version__,
        "cuda": torch.cuda.is_available(),
        "source": os.environ.get("PRIVFED_BENCH_SOURCE") or _git_source(),
    }


def _git_source() -> str:
    """The commit measured, and whether the working tree had changes on top of it."""
    import subprocess

    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head}{' + uncommitted changes' if dirty else ''}" if head else "unknown"


def _dist_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


class RoundStamps(io.StringIO):
    """A file for a rich ``Console`` that notes when each "round r/R" line is written.

    privfed's recorder prints one line per round after the round's ledger rows, metrics
    line and checkpoint are written, so consecutive stamps bracket one whole round as
    the server sees it; no server code needs a hook.
    """

    def __init__(self, echo: object | None = None) -> None:
        self.stamps: dict[int, float] = {}
        self.lines: list[str] = []
        self.times: list[float] = []  # when each line in ``lines`` was written
        self._echo = echo

    def write(self, text: str) -> int:
        now = time.perf_counter()
        for line in text.splitlines():
            m = ROUND_LINE.search(line)
            if m and int(m.group(1)) not in self.stamps:
                self.stamps[int(m.group(1))] = now
            if line.strip():
                self.lines.append(line)
                self.times.append(now)
        if self._echo is not None:
            self._echo.write(text)  # type: ignore[attr-defined]
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


def round_seconds(stamps: dict[int, float], warmup: int = 1) -> list[float]:
    """Seconds of each round after the first ``warmup`` ones, from end-of-round stamps.

    Round r takes ``stamps[r] - stamps[r-1]``; round 1 has no predecessor stamp and is
    warm-up (Ray actors start, PyTorch and the evaluation classifier initialise).
    """
    rounds = sorted(stamps)
    return [stamps[r] - stamps[r - 1] for r in rounds if r > warmup and r - 1 in stamps]


def median(values: Iterable[float]) -> float:
    vals = list(values)
    return statistics.median(vals) if vals else float("nan")


# ---------------------------------------------------------------- process-tree memory


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:
            continue
        # The command name (field 2) may contain spaces; ppid is the 2nd field after ')'.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants (Ray's raylet, GCS and workers are children of the driver)."""
    kids = _children_map()
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return out


def _kb(path: str, key: str) -> int:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def tree_memory(root: int, pids: list[int] | None = None) -> tuple[int, int, int]:
    """(RSS sum, PSS sum, process count) of the tree, in bytes.

    The RSS sum counts shared pages (libtorch, Ray's object store) once per process: an
    upper bound. PSS divides each shared page among the processes that map it: what the
    tree really holds.
    """
    rss = pss = n = 0
    for pid in pids if pids is not None else process_tree(root):
        r = _kb(f"/proc/{pid}/status", "VmRSS:")
        if r:
            n += 1
            rss += r
            pss += _kb(f"/proc/{pid}/smaps_rollup", "Pss:")
    return rss * 1024, pss * 1024, n


@dataclass
class TreeMemoryPeak:
    """Polls a process tree's memory in a thread; keeps the peaks."""

    root: int = field(default_factory=os.getpid)
    interval: float = 0.25
    peak_rss: int = 0
    peak_pss: int = 0
    peak_processes: int = 0
    samples: int = 0
    # pid -> command line of every process seen in the tree (to find and stop leftovers).
    seen: dict[int, bytes] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(self.interval):
                return

    def sample(self) -> None:
        pids = process_tree(self.root)
        for pid in pids:
            if pid not in self.seen:
                self.seen[pid] = _cmdline(pid)
        rss, pss, n = tree_memory(self.root, pids)
        self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
        self.peak_processes = max(self.peak_processes, n)
        self.samples += 1

    def __enter__(self) -> TreeMemoryPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def leftovers(self) -> list[int]:
        """Processes of the tree (other than this one) still alive: Ray must not outlive its run."""
        return [
            p
            for p, cmd in sorted(self.seen.items())
            if p != os.getpid() and not _zombie(p) and cmd and _cmdline(p) == cmd
        ]

    def stop_leftovers(self) -> list[int]:
        """SIGKILL this tree's leftovers (only processes this run started: same pid and command line)."""
        import signal

        left = self.leftovers()
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        return left


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True  # gone


def gb(n_bytes: float) -> float:
    return n_bytes / 2**30
