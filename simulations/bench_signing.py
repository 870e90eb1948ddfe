"""What the signed ledger costs (issue 19): signing at the sites, verifying at the server.

    .venv/bin/python -m simulations.bench_signing

A federation of 10 sites runs 20 rounds of ledger bookkeeping only (no training): each
round every site builds its fit reply's claim (``reply_claim`` over realistic metrics,
its history growing by one entry a round) and signs it; the server verifies each claim,
ledgers the rows with their claims, signs the round's head and makes every site's
receipt; at the end an auditor verifies the whole ledger against the registry's keys.
Printed in ms: per site per round (digest of the update, sign), at the server per round
(verify all replies, record, sign_head, receipts), and the full audit.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from common.deploy.registry import RegisteredSite, Registry
from common.deploy.signing import canonical, new_signing_key, public_hex, reply_claim, sign, update_digest, verify
from common.privacy.accounting import RoundPlan
from common.protocol import Status, fit_metrics
from server.ledger import Ledger, SiteSpend
from server.ledger_audit import verify_against_keys

PARAMS = 100_000  # a small model's update (float32): what the update digest hashes


def measure(sites: int = 10, rounds: int = 20, params: int = PARAMS) -> dict[str, Any]:
    server = new_signing_key()
    keys = {f"site-{i:02d}": new_signing_key() for i in range(sites)}
    registry = Registry.build(public_hex(server), [RegisteredSite(s, public_hex(k), 400) for s, k in keys.items()])
    update = [np.random.default_rng(0).standard_normal(params).astype(np.float32)]
    plan = RoundPlan(400, 0.05, 20, 1.1, 1.0, 1e-5, "rdp")
    t: dict[str, list[float]] = {k: [] for k in ("digest", "sign", "verify", "record", "sign_head", "receipts")}
    run_id = "bench-signing"
    with tempfile.TemporaryDirectory(prefix="privfed-bench-signing-") as tmp:
        led = Ledger(Path(tmp) / "ledger.sqlite", run_id=run_id)
        for rnd in range(1, rounds + 1):
            history = json.dumps([[r, 1.1, 0.05, 20] for r in range(1, rnd)])
            replies = []
            for site, key in keys.items():  # at each site
                m = fit_metrics(site, "image", plan, 20, 10.0, Status.TRAINED, eps_spent=1.0, rng="os", history=history)
                m["train_loss"] = 0.5
                t0 = time.perf_counter()
                digest = update_digest(update)
                t1 = time.perf_counter()
                m["signature"] = sign(key, reply_claim(run_id, rnd, "fit", digest, m))
                t2 = time.perf_counter()
                t["digest"].append(t1 - t0)
                t["sign"].append(t2 - t1)
                replies.append((site, m, digest))
            t0 = time.perf_counter()  # at the server: recompute each claim, verify it
            spends = []
            for site, m, digest in replies:
                claim = reply_claim(run_id, rnd, "fit", digest, m)
                site_key = registry.site(site)
                assert site_key is not None and verify(site_key.public_key, claim, m["signature"])
                spends.append(
                    SiteSpend(site, "image", plan, 20, 10.0, True, "trained", "os", "dp-sgd",
                              canonical(claim).decode(), m["signature"])
                )  # fmt: skip
            t1 = time.perf_counter()
            for s in spends:  # one call per reply, as the server ledgers them
                led.record_round(rnd, [s])
            t2 = time.perf_counter()
            led.sign_head(rnd, server)
            t3 = time.perf_counter()
            for site in keys:
                led.receipt(site, server)
            t4 = time.perf_counter()
            for name, dt in (("verify", t1 - t0), ("record", t2 - t1), ("sign_head", t3 - t2), ("receipts", t4 - t3)):
                t[name].append(dt)
        t0 = time.perf_counter()
        own = led.verify()
        t1 = time.perf_counter()
        keyed = verify_against_keys(led, registry)
        t2 = time.perf_counter()
        assert own.ok and keyed.ok, keyed.reason
        led.close()

    def ms(xs: list[float]) -> float:
        return round(1000 * statistics.median(xs), 3)

    return {
        "sites": sites,
        "rounds": rounds,
        "update_params": params,
        "site_ms": {"update_digest": ms(t["digest"]), "sign_claim": ms(t["sign"])},
        "server_ms_per_round": {
            "verify_replies": ms(t["verify"]),
            "verify_per_site": round(ms(t["verify"]) / sites, 3),
            "ledger_record": ms(t["record"]),
            "sign_head": ms(t["sign_head"]),
            "receipts_all_sites": ms(t["receipts"]),
        },
        "audit_ms": {
            "self_consistency": round(1000 * (t1 - t0), 1),
            "against_keys": round(1000 * (t2 - t1), 1),
            "against_keys_per_round": round(1000 * (t2 - t1) / rounds, 2),
        },
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    result = measure()
    s, v, a = result["site_ms"], result["server_ms_per_round"], result["audit_ms"]
    print(f"signed ledger, {result['sites']} sites x {result['rounds']} rounds (median ms):")
    print(f"  per site per round: sign the claim {s['sign_claim']}, digest the update {s['update_digest']}")
    print(
        f"  server per round: verify {result['sites']} replies {v['verify_replies']} ({v['verify_per_site']}/site), "
        f"ledger them {v['ledger_record']}, sign_head {v['sign_head']}, receipts {v['receipts_all_sites']}"
    )
    print(
        f"  audit of the whole ledger: self-consistency {a['self_consistency']}, against keys {a['against_keys']} "
        f"({a['against_keys_per_round']} per round)"
    )
    return result


if __name__ == "__main__":
    main()
