"""What one hostile reply costs the server: ``aggregate_fit`` with a 100,000-entry history vs an honest round.

Issue 19's number for the README: a hostile reply carrying a flooded catch-up history must
cost at most 50 ms more than an honest round. Both rounds use real signed replies, a real
ledger and the strategy as the server builds it (three honest sites; the hostile one is a
fourth, registered site). Run: ``python -m simulations.bench_hostile``.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

from common.config import RunConfig
from common.deploy.registry import RegisteredSite, Registry
from common.deploy.signing import new_signing_key, public_hex, reply_claim, sign, update_digest
from common.pipeline import build_pipeline
from common.privacy.accounting import RoundPlan
from common.protocol import Status as SiteStatus
from common.protocol import fit_metrics
from server.ledger import Ledger
from server.strategy import DeltaFedAvg

SITES = ("a", "b", "c", "m")  # m: the hostile one
N = 100
FLOOD = 100_000


def _strategy(folder: Path) -> tuple[DeltaFedAvg, dict[str, Any]]:
    cfg = RunConfig.from_flat(
        {"metrics.dp": False, "num-sites": len(SITES), "rounds": 50, "dp.enabled": True, "dp.accountant": "rdp"}
    )
    keys = {s: new_signing_key() for s in SITES}
    server = new_signing_key()
    registry = Registry.build(public_hex(server), [RegisteredSite(s, public_hex(k), N) for s, k in keys.items()])
    ledger = Ledger(folder / "ledger.sqlite", run_id="bench")
    strategy = DeltaFedAvg(
        cfg,
        None,
        ledger,
        build_pipeline(cfg),
        initial_arrays=[np.zeros(1000, np.float32)],
        registry=registry,
        server_key=server,
    )
    return strategy, keys


def _reply(strategy: DeltaFedAvg, keys: dict[str, Any], site: str, rnd: int, history: str) -> tuple[Any, FitRes]:
    arrays = [np.full(1000, 0.01, np.float32)]
    plan = RoundPlan(N, 0.5, 4, 1.2, 1.0, 1e-5, "rdp")
    m = fit_metrics(site, "example", plan, 4, 1e6, SiteStatus.TRAINED, eps_spent=1.0, rng="os", history=history)
    m["signature"] = sign(keys[site], reply_claim(strategy.run_id, rnd, "fit", update_digest(arrays), m))
    return SimpleNamespace(node_id=SITES.index(site) + 1), FitRes(
        Status(Code.OK, ""), ndarrays_to_parameters(arrays), N, m
    )


def measure(repeats: int = 5) -> tuple[float, float]:
    """(honest round ms, round with one hostile flooded reply ms): medians over ``repeats`` rounds each."""
    flood = json.dumps([[r, 1.2, 0.5, 4] for r in range(1, FLOOD + 1)])
    honest: list[float] = []
    hostile: list[float] = []
    with tempfile.TemporaryDirectory(prefix="privfed-bench-hostile-") as tmp:
        strategy, keys = _strategy(Path(tmp))
        for rnd in range(1, 2 * repeats + 1):
            strategy.ledger.start_round(rnd)
            replies = [_reply(strategy, keys, s, rnd, "[]") for s in SITES[:3]]
            bad = rnd % 2 == 0
            if bad:
                replies.append(_reply(strategy, keys, "m", rnd, flood))
            t0 = time.perf_counter()
            strategy.aggregate_fit(rnd, replies, [])
            ms = (time.perf_counter() - t0) * 1e3
            strategy.end_fit(rnd)
            (hostile if bad else honest).append(ms)
        strategy.ledger.close()
    return statistics.median(honest), statistics.median(hostile)


def main() -> None:
    honest, hostile = measure()
    print(
        f"aggregate_fit, 3 honest sites: {honest:.2f} ms; plus one hostile {FLOOD:,}-entry history: "
        f"{hostile:.2f} ms (+{hostile - honest:.2f} ms, {hostile / honest:.2f}x)"
    )


if __name__ == "__main__":
    main()
