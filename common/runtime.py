"""Small helpers both apps need: device choice, per-process task cache, seeds."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

import torch
from threadpoolctl import threadpool_limits

from common.config import RunConfig
from common.errors import ConfigError
from common.seeds import site_round_seed
from common.tasks import Task, get_task


def resolve_device(name: str) -> torch.device:
    """auto -> cuda if available, else cpu; an explicit cuda device must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError("device", f"is {name!r} but no CUDA device is available (use auto or cpu)")
        index = int(name.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ConfigError("device", f"is {name!r} but only {torch.cuda.device_count()} CUDA device(s) exist")
    return torch.device(name)


@contextmanager
def single_threaded_blas() -> Iterator[None]:
    """OpenBLAS on one thread while the block runs (NumPy's and SciPy's copies), as before after it.

    Why: Ray starts its processes with ``subprocess.Popen(preexec_fn=...)``, a plain ``fork()``
    that runs OpenBLAS's ``pthread_atfork`` handler, ``blas_thread_shutdown_``. If another
    thread of the process is inside a multi-threaded OpenBLAS call at that moment (the
    ServerApp's evaluation fitting its classifier while Flower starts Ray), the fork and that
    call deadlock: a ``make demo`` hung for good this way, and tests/unit/test_runtime_blas.py
    reproduces it. With one thread, OpenBLAS has no worker to shut down mid-call. The
    server-side BLAS work (classifiers on a few thousand rows) loses little, and on 2 cores it
    gains: two BLAS threads beside the sites' torch threads oversubscribed them. torch's own
    thread pool is a different library and is not touched.

    SciPy's OpenBLAS is loaded first, so that the limit reaches it too; the environment is not
    changed (the ServerApp runs in a thread, and ``setenv`` beside other threads is unsafe).
    """
    import scipy.linalg  # noqa: F401  (loads SciPy's own OpenBLAS; the classifiers use it later)

    with threadpool_limits(limits=1, user_api="blas"):
        yield


def config_from(defaults: Mapping[str, Any], run_config: Mapping[str, Any]) -> RunConfig:
    """Flower's run_config over the launcher's values (run_simulation passes none)."""
    return _cached_config(tuple(sorted(drop_inactive_tasks({**defaults, **run_config}).items())))


def drop_inactive_tasks(flat: Mapping[str, Any]) -> dict[str, Any]:
    """The run config without the tables of tasks the run does not use.

    Flower accepts a ``flwr run --run-config`` override only for a key the app's pyproject
    lists, so the deployed app lists every task's table (``vae.*``, ``gan.*``, ``recsys.*``)
    for any task to be deployable. Only the table of the task ``task`` names configures the
    run; the others are inert (a model the run does not build) and are dropped here. Each
    key still had to be one the app lists, so a mistyped key is still refused (by Flower,
    and for the active table by RunConfig.from_flat).
    """
    from common.config.loading import registered_tasks
    from common.config.schema import FederationConfig

    active = str(flat.get("task", FederationConfig.task))
    inactive = tuple(f"{name}." for name in registered_tasks() if name != active)
    return {k: v for k, v in flat.items() if not k.startswith(inactive)}


@lru_cache(maxsize=8)
def _cached_config(items: tuple) -> RunConfig:
    return RunConfig.from_flat(dict(items))


@lru_cache(maxsize=8)
def cached_task(cfg: RunConfig, key: bytes | None = None) -> Task:
    """One task (and so one loaded data split) per process, config and federation key."""
    return get_task(cfg.task)(cfg, key)


def round_seed(cfg: RunConfig, site_index: int, server_round: int) -> int | None:
    """Reproducible seed for one site's round, or None for OS randomness (dp.secure-rng).

    SeedSequence mixes (seed, site, round) so that no two rounds or sites share a stream.
    """
    if cfg.dp.secure_rng:
        return None
    return site_round_seed(cfg.federation.seed, site_index, server_round)
