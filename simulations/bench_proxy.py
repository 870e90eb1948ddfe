"""What the sites' proxy (server/proxy.py, Debian's nginx) adds to a round, and what the site's
ClientApp fork server (client/supervisor.py) takes off it, each measured side by side.

Three measurements in one run, against one SuperLink on loopback:

1. **Per request.** The same TLS request (``GET /health``, which the SuperLink answers
   itself) sent alternately straight to the SuperLink and through the proxy, over one
   kept-alive connection each (as a SuperNode's HTTP client keeps one). The median
   difference is the proxy's hop: its TLS termination, the re-encrypted loopback leg and
   nginx's own work.
2. **Per round.** One SuperNode dials the proxy and trains one round of the small VAE. The
   proxy's access log gives every request of that round with its total time at the proxy
   (``rt``) and the part spent waiting for the SuperLink (``urt``): their difference, summed
   over the round, is what the proxy added to it, next to the round's own wall time.
3. **Fork server.** More one-round runs of the same site, alternately with it off
   (``PRIVFED_WARM_CLIENTAPP=0``: each message's ClientApp process starts cold and imports
   torch and Opacus first, as Flower starts it) and on (the default), the site restarted
   between them; the median round time of each, and their ratio.

Usage: ``make bench-proxy`` (needs nginx: ``apt-get install nginx-light``). About 3 min.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
_LOG = re.compile(
    r'"(?P<method>\S+) (?P<path>\S+) [^"]*" (?P<status>\d+) .* rt=(?P<rt>[\d.]+) urt=(?P<urt>[\d.,\s:-]+)$'
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _request_ms(conn: http.client.HTTPSConnection) -> float:
    t = time.perf_counter()
    conn.request("GET", "/health")
    resp = conn.getresponse()
    resp.read()
    if resp.status != 200:
        raise RuntimeError(f"/health answered {resp.status}")
    return 1000 * (time.perf_counter() - t)


def per_request(admin: int, proxied: int, ca: Path, n: int = 300) -> dict[str, float]:
    ctx = ssl.create_default_context(cafile=str(ca))
    direct = http.client.HTTPSConnection("localhost", admin, context=ctx, timeout=10)
    via = http.client.HTTPSConnection("localhost", proxied, context=ctx, timeout=10)
    for conn in (direct, via):  # handshakes and warm-up outside the timing
        for _ in range(20):
            _request_ms(conn)
            time.sleep(0.03)
    d, p = [], []
    for _ in range(n):  # alternate, so drift on this shared machine hits both alike
        d.append(_request_ms(direct))
        p.append(_request_ms(via))
        time.sleep(0.03)  # under the proxy's per-address rate limit (server/proxy.py RATE), as a site is
    direct.close()
    via.close()
    return {
        "requests": n,
        "direct_ms": round(statistics.median(d), 3),
        "proxied_ms": round(statistics.median(p), 3),
        "added_ms": round(statistics.median(p) - statistics.median(d), 3),
        "ratio": round(statistics.median(p) / statistics.median(d), 2),
    }


def _round_requests(log: Path) -> list[dict[str, Any]]:
    rows = []
    for line in log.read_text().splitlines():
        m = _LOG.search(line)
        if m and m["path"].startswith("/v1/fleet/"):
            urt = sum(float(x) for x in re.findall(r"[\d.]+", m["urt"]))
            rows.append({"path": m["path"], "rt": float(m["rt"]), "urt": urt})
    return rows


class _Procs:
    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root, self.env = root, env
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, name: str, cmd: list[str], **env: str) -> subprocess.Popen[bytes]:
        log = open(self.root / f"{name}.log", "wb")  # noqa: SIM115 (kept open for the child)
        p = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env={**self.env, **env}, cwd=self.root, start_new_session=True
        )
        self.procs.append(p)
        return p

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(args, env=self.env, cwd=self.root, capture_output=True, text=True, check=True)

    def stop(self, only: subprocess.Popen[bytes] | None = None) -> None:
        for p in [only] if only is not None else self.procs:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    p.wait(timeout=10)
                    break
                except subprocess.TimeoutExpired:
                    continue
        # the SuperLink's flower-superexec has a session of its own: it follows its parent's exit
        time.sleep(1)


def _wait_healthy(port: int, ca: Path) -> None:
    ctx = ssl.create_default_context(cafile=str(ca))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPSConnection("localhost", port, context=ctx, timeout=2)
            if _request_ms(conn) >= 0:
                conn.close()
                return
        except (OSError, RuntimeError, http.client.HTTPException):
            time.sleep(0.3)
    raise TimeoutError(f"nothing healthy on port {port}")


def measure(rounds: int = 1, fork_repeats: int = 2) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="privfed-bench-proxy-"))
    env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}", "FLWR_HOME": str(root / "flwr-home")}
    env.update({"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"})
    (root / "flwr-home").mkdir()
    procs = _Procs(root, env)
    privfed = str(BIN / "privfed")
    admin, proxied = _free_port(), _free_port()
    try:
        (root / "pki").mkdir()
        procs.run(privfed, "certs", "ca", "--out", "pki")
        procs.run(privfed, "certs", "server", "--out", "pki", "--host", "localhost", "--host", "127.0.0.1")
        procs.run(privfed, "certs", "node", "--out", "pki", "--name", "site-a")
        server_pub = procs.run(privfed, "keys", "signing", "coordinator.key").stdout.split()[-1]
        procs.spawn(
            "superlink",
            [privfed, "coordinator", "superlink", "--pki", "pki", "--database", ":flwr-in-memory:"]
            + ["--admin", f"127.0.0.1:{admin}"],
        )
        procs.spawn(
            "proxy",
            [privfed, "coordinator", "proxy", "--pki", "pki", "--dir", "proxy"]
            + ["--listen", f"127.0.0.1:{proxied}", "--superlink", f"127.0.0.1:{admin}"],
        )
        ca = root / "pki" / "ca.pem"
        _wait_healthy(admin, ca)
        _wait_healthy(proxied, ca)
        request = per_request(admin, proxied, ca)

        # One site through the proxy, one deployed round of the small VAE.
        cfg = procs.run(privfed, "coordinator", "flwr-config", "--pki", "pki", "--admin", f"127.0.0.1:{admin}")
        (root / "flwr-home" / "config.toml").write_text(cfg.stdout)
        procs.run(str(BIN / "flwr"), "supernode", "register", "pki/site-a.pub", "privfed", "--format", "json")
        signed = procs.run(privfed, "app", "sign", "--server-key", "coordinator.key", "--app", str(REPO)).stdout
        signature = signed.split("signature", 1)[1].split()[0]
        init = procs.run(
            privfed, "site", "init", "--out", "site-a.toml", "--site-id", "site-a", "--partition-id", "0",
            "--superlink", f"127.0.0.1:{proxied}", "--ca-cert", "pki/ca.pem", "--auth-key", "pki/site-a.key",
            "--declared-size", "300", "--server-key", server_pub, "--device", "cpu",
        )  # fmt: skip
        entry = init.stdout[init.stdout.index("[[site]]") :]
        (root / "registry.toml").write_text(f'[server]\npublic-key = "{server_pub}"\n\n{entry}')
        procs.run(privfed, "site", "approve", "site-a.toml", "--signature", signature, "--app", str(REPO))
        join = [privfed, "site", "join", "site-a.toml", "--", "--host", "127.0.0.1"]
        site = procs.spawn("site-a", join)
        time.sleep(8)
        log = root / "proxy" / "access.log"
        log.write_text("")  # the idle polls before the run are not the round's (nginx appends: O_APPEND)

        def one_run(name: str) -> tuple[float, float]:
            """The mean round seconds of one run, and the run's wall seconds."""
            run_dir = root / name
            t = time.monotonic()
            procs.run(
                str(BIN / "flwr"), "run", str(REPO), "privfed", "--stream", "--run-config",
                f'num-sites=1 rounds={rounds} run-dir="{run_dir}" vae.hidden-dim=16 vae.latent-dim=2 '
                "dp.target-epsilon=0.0 dp.noise-multiplier=1.0 audit.mia=false central-eval=false "
                f'registry="{root / "registry.toml"}" server-key="{root / "coordinator.key"}"',
            )  # fmt: skip
            wall = time.monotonic() - t
            lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
            return sum(m["seconds"] for m in lines) / max(1, len(lines)), wall

        round_s, wall = one_run("run")
        rows = _round_requests(log)
        added = sum(max(0.0, r["rt"] - r["urt"]) for r in rows) / max(1, rounds)
        per_round = {
            "rounds": rounds,
            "round_seconds": round(round_s, 2),
            "run_wall_seconds": round(wall, 1),
            "fleet_requests_per_round": round(len(rows) / max(1, rounds), 1),
            "proxy_added_seconds_per_round": round(added, 3),
            "proxy_share_of_round": round(added / round_s, 4) if round_s else None,
            "by_hop_estimate_seconds": round(request["added_ms"] * len(rows) / max(1, rounds) / 1000, 3),
        }
        # The fork server, side by side: cold starts and forks alternately, the site restarted
        # each time (a restart is how an operator changes the setting). The run above forked too.
        times: dict[str, list[float]] = {"cold": [], "forked": [round_s]}
        for k in range(fork_repeats):
            for mode in ("cold", "forked"):
                procs.stop(site)
                site = procs.spawn(f"site-a-{mode}-{k}", join, PRIVFED_WARM_CLIENTAPP="0" if mode == "cold" else "1")
                time.sleep(8)
                times[mode].append(one_run(f"run-{mode}-{k}")[0])
        cold, forked = statistics.median(times["cold"]), statistics.median(times["forked"])
        server = {
            "cold_round_seconds": [round(x, 2) for x in times["cold"]],
            "forked_round_seconds": [round(x, 2) for x in times["forked"]],
            "cold_median": round(cold, 2),
            "forked_median": round(forked, 2),
            "ratio": round(forked / cold, 3),
        }
        return {"per_request": request, "per_round": per_round, "fork_server": server}
    finally:
        procs.stop()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from simulations.bench_util import machine_info

    result = measure()
    r, p, w = result["per_request"], result["per_round"], result["fork_server"]
    print("the sites' proxy (nginx) against the SuperLink without it, side by side:")
    print(
        f"  per request (GET /health, kept-alive TLS, median of {r['requests']}): direct {r['direct_ms']} ms, "
        f"through the proxy {r['proxied_ms']} ms: +{r['added_ms']} ms ({r['ratio']}x)"
    )
    print(
        f"  per round (1 site, small VAE): {p['fleet_requests_per_round']} Fleet requests, proxy time "
        f"{p['proxy_added_seconds_per_round']} s (nginx log rt-urt; by the per-request hop: "
        f"{p['by_hop_estimate_seconds']} s) of a {p['round_seconds']} s round "
        f"= {100 * (p['proxy_share_of_round'] or 0):.2f}%"
    )
    print(
        f"  the site's ClientApp fork server (1 site, small VAE, 1-round runs, medians): cold starts "
        f"{w['cold_median']} s a round {w['cold_round_seconds']}, forked {w['forked_median']} s "
        f"{w['forked_round_seconds']}: {w['ratio']}x"
    )
    out = Path("bench-results")
    out.mkdir(exist_ok=True)
    (out / "bench_proxy.json").write_text(json.dumps({"machine": machine_info(), **result}, indent=1))
    return result


if __name__ == "__main__":
    main()
