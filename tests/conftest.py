from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterable

import numpy as np
import pytest
import torch

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

from hypothesis import settings  # noqa: E402

from common.config import RunConfig  # noqa: E402

# CI (``.ci/run`` sets CI) gates what lands on main, so there the property tests draw the same
# examples every run: a bug they find must not block an unrelated change at random. Local runs
# keep Hypothesis's random search (and its example database), which is where new bugs turn up.
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")


class IntegrationOnOneWorker:
    """Under pytest-xdist with ``--dist loadgroup`` (opt-in: ``make test PYTEST_ARGS="-n 2
    --dist loadgroup"``; measured no faster than one process on 2 cores), every test in
    tests/integration is one unit of work, so they run one after another on one worker:
    several assert that no Flower or Ray process of this checkout is left
    (simulation_processes), which another integration test's run would break, and two
    deployment fixtures would fight over the machine. Each unit test is a unit of its own,
    shared out to both workers.

    A scheduler rather than ``xdist_group`` marks: xdist 3.8 names a test's group by
    rewriting ``item._nodeid``, which pytest 9.2 no longer reads (the marks had no effect)."""

    @staticmethod
    def pytest_xdist_make_scheduler(config, log):
        if config.getvalue("dist") != "loadgroup":
            return None
        from xdist.scheduler import LoadScopeScheduling

        class Scheduling(LoadScopeScheduling):
            def _split_scope(self, nodeid: str) -> str:
                return "tests/integration" if nodeid.startswith("tests/integration/") else nodeid

        return Scheduling(config, log)


def pytest_configure(config):
    if config.pluginmanager.hasplugin("xdist"):  # its hook exists only with the plugin loaded
        config.pluginmanager.register(IntegrationOnOneWorker(), "privfed-integration-on-one-worker")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def make_cfg(**flat) -> RunConfig:
    """A RunConfig from flat keys (tests spell keys as in TOML: 'dp.noise-multiplier').

    metrics.dp is off unless a test sets it, as in the simulation launcher (its default is on)."""
    return RunConfig.from_flat({"metrics.dp": False, **flat})


def declared(cfg: RunConfig, index: int, key: bytes | None = None) -> int:
    """Site ``index``'s declared size n-hat as the simulation launcher declares it: its training-split size."""
    from common.runtime import cached_task

    return cached_task(cfg, key).site_sizes()[index]


def simulation_processes() -> list[str]:
    """Ray/Flower processes of this user (a test must leave none behind)."""
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    pattern = (
        "raylet",
        "gcs_server",
        "flower-superlink",
        "flower-supernode",
        "flower-superexec",
        "flwr-simulation",
        "flwr-serverapp",
        "flwr-clientapp",
        "privfed-clientapp",
        "client.supervisor",
    )
    # Only this checkout's (its venv is in the command line): another checkout's run on the
    # same machine is not this suite's leftover.
    return [line for line in out.splitlines() if any(p in line for p in pattern) and sys.prefix in line]


def assert_no_new_simulation_processes(before: Iterable[str] = (), seconds: float = 20.0) -> None:
    """No Ray/Flower process of this checkout beyond ``before`` is left, waiting up to ``seconds``:
    ``ray.shutdown()`` does not wait for the processes it signals (its dashboard agent exits
    a little after its raylet), so a check straight after a run races them."""
    old = set(before)
    deadline = time.monotonic() + seconds
    while set(simulation_processes()) - old and time.monotonic() < deadline:
        time.sleep(0.25)
    assert not set(simulation_processes()) - old, sorted(set(simulation_processes()) - old)


def tamper(ledger_path, *statements: str) -> None:
    """Edit a ledger the way a determined editor would: drop the append-only guards first."""
    import sqlite3

    conn = sqlite3.connect(ledger_path)
    conn.execute("DROP TRIGGER IF EXISTS ledger_no_update")
    conn.execute("DROP TRIGGER IF EXISTS ledger_no_delete")
    for sql in statements:
        conn.execute(sql)
    conn.commit()
    conn.close()


# Strategy arguments the tests name in Python style, and the config keys they set.
_STRATEGY_KEYS = {
    "num_sites": "num-sites",
    "min_fit_sites": "min-fit-sites",
    "aggregation": "aggregation",
    "trim_fraction": "trim-fraction",
    "byzantine_sites": "byzantine-sites",
    "qffl_q": "qffl-q",
    "qffl_lipschitz": "qffl-lipschitz",
    "max_update_norm": "max-update-norm",
    "norm_outlier_factor": "norm-outlier-factor",
    "fraction_fit": "fraction-fit",
    "fraction_evaluate": "fraction-evaluate",
    "last_round": "rounds",
    "ema_decay": "ema-decay",
}


def make_strategy(
    tmp_path=None,
    init=None,
    *,
    accountant: str = "none",
    secure: bool = False,
    uniform: bool = False,
    central=None,
    poisson_rng=None,
    primary_metric: str = "loss",
    ledger=None,
    task=None,
    registry=None,
    run_id: str = "",
    **kw,
):
    """A DeltaFedAvg as server.app builds it (config -> pipeline -> strategy), for strategy tests.

    Keyword arguments are config settings in Python spelling (``norm_outlier_factor=10.0``);
    the norm-outlier check is off unless asked for. ``central``: a CentralRelease to use
    instead of the config's (its plan and generator); ``poisson_rng`` likewise.
    ``registry``: the federation registry (default: an empty one, which :func:`signed`
    fills as replies name sites); the server key is :data:`SERVER_KEY`'s.
    """
    from common.pipeline import build_pipeline
    from server.ledger import Ledger
    from server.strategy import DeltaFedAvg

    flat = {_STRATEGY_KEYS[k]: v for k, v in kw.items()}
    flat.setdefault("norm-outlier-factor", 0.0)
    flat.setdefault("num-sites", 3)
    flat["dp.enabled"] = accountant != "none"
    if accountant != "none":
        flat["dp.accountant"] = accountant
    flat["secagg.enabled"] = secure
    flat["central-dp.enabled"] = central is not None
    flat["weighting"] = "uniform" if uniform else "auto"
    cfg = make_cfg(**flat)
    if ledger is None and tmp_path is not None:
        ledger = Ledger(tmp_path / "ledger.sqlite", run_id="t")
    init = init if init is not None else [np.zeros(2, np.float32)]
    registry = registry if registry is not None else make_registry({})
    s = DeltaFedAvg(
        cfg,
        task,
        ledger,
        build_pipeline(cfg, task),
        initial_arrays=init,
        run_id=run_id,
        registry=registry,
        server_key=server_key(),
    )
    s.primary_metric = primary_metric
    if central is not None:
        s.central = central
    if poisson_rng is not None:
        s.poisson_rng = poisson_rng
    return s


# ------------------------------------------------------------------ identity (issue 19)
def _test_key(label: str):
    """A deterministic Ed25519 key per label: the same site gets the same key in every test."""
    import hashlib

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.from_private_bytes(hashlib.sha256(f"privfed-test:{label}".encode()).digest())


def site_key(site_id: str):
    """Site ``site_id``'s signing key in tests (deterministic)."""
    return _test_key(f"site:{site_id}")


def server_key():
    """The server's signing key in tests (deterministic)."""
    return _test_key("server")


def make_registry(sizes: dict[str, int]):
    """A registry of the sites ``{site_id: declared size}``, each with :func:`site_key`'s key."""
    from common.deploy.registry import RegisteredSite, Registry
    from common.deploy.signing import public_hex

    sites = [RegisteredSite(site, public_hex(site_key(site)), size) for site, size in sizes.items()]
    return Registry.build(public_hex(server_key()), sites)


def register(strategy, site_id: str, declared_size: int) -> None:
    """Add a site to a strategy's registry (what the coordinator does before the run)."""
    sizes = {s.site_id: s.declared_size for s in strategy.registry.sites.values()}
    strategy.registry = make_registry({**sizes, site_id: declared_size})


def sign_reply(metrics, key, run_id: str, rnd: int, kind: str, arrays=None, secure: bool = False):
    """Sign a reply's metrics exactly as a site does (contract point 1), in place; returns them.

    ``arrays``: the update the reply carries (plain fit); ``secure``: a SecAgg+ fit (the
    digest is ``MASKED``); evaluate replies sign an empty digest. The signature goes last.
    """
    from common.deploy.signing import MASKED, SIGNATURE, reply_claim, sign, update_digest

    if kind == "evaluate":
        digest = ""
    elif secure:
        digest = MASKED
    else:
        digest = update_digest(arrays if arrays is not None else [])
    metrics.pop(SIGNATURE, None)
    metrics[SIGNATURE] = sign(key, reply_claim(run_id, rnd, kind, digest, metrics))
    return metrics


def signed(strategy, rnd: int, results, kind: str = "fit"):
    """Sign each (proxy, FitRes/EvaluateRes) for ``strategy``'s run and round ``rnd`` with the
    key of the site it names, registering a site the registry lacks at the reply's
    ``dataset_size`` (for tests that are not about identity). Returns ``results``."""
    from flwr.common import parameters_to_ndarrays

    from common.identifiers import site_id_problem

    for _, res in results:
        site = res.metrics.get("site_id")
        if site_id_problem(site):
            continue
        if strategy.registry.site(site) is None:
            n = res.metrics.get("dataset_size")
            register(strategy, site, n if isinstance(n, int) and not isinstance(n, bool) and n >= 1 else 1)
        arrays = None
        if kind == "fit" and not strategy.secure:
            try:
                arrays = parameters_to_ndarrays(res.parameters)
            except Exception:
                arrays = []  # undecodable: the server refuses it before it checks any signature
        sign_reply(res.metrics, site_key(site), strategy.run_id, rnd, kind, arrays, secure=strategy.secure)
    return results
