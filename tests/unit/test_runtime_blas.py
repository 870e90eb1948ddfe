"""Ray forks its processes (``Popen(preexec_fn=...)``, a plain fork that runs OpenBLAS's
``pthread_atfork`` handler) while the ServerApp thread evaluates with NumPy. A fork amid a
multi-threaded OpenBLAS call deadlocks: a ``make demo`` hung for good at "starting Ray".
Without :func:`common.runtime.single_threaded_blas` the loop below hung in 3 of 4 tries of
3 s on this 2-core machine; with it, it ran thousands of forks every time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

LOOP = textwrap.dedent(
    """
    import json, subprocess, threading, time
    import numpy as np
    from threadpoolctl import threadpool_info
    from common.runtime import single_threaded_blas

    def blas_threads():  # library file name -> its threads
        pools = [p for p in threadpool_info() if p["user_api"] == "blas"]
        return {p["filepath"].rsplit("/", 1)[-1]: p["num_threads"] for p in pools}

    before = blas_threads()
    stop = False

    def evaluate():  # the ServerApp thread: large enough products that OpenBLAS would use its threads
        a = np.random.default_rng(0).random((300, 300))
        while not stop:
            a @ a

    with single_threaded_blas():
        inside = blas_threads()
        worker = threading.Thread(target=evaluate, daemon=True)
        worker.start()
        forks, t0 = 0, time.monotonic()
        while time.monotonic() - t0 < 5:  # Ray starting its processes
            subprocess.Popen(["true"], preexec_fn=lambda: None).wait()
            forks += 1
        stop = True
        worker.join()
    print(json.dumps([before, inside, blas_threads(), forks]))
    """
)


def test_forks_beside_blas_work_do_not_deadlock_under_single_threaded_blas():
    # OpenBLAS on 2 threads as it loads (it would take 1 from OMP_NUM_THREADS=1 alone, and the
    # test would not see the hazard): the function must bring it down to 1 itself.
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "GOTO_NUM_THREADS")}
    env["OPENBLAS_NUM_THREADS"] = "2"
    try:
        out = subprocess.run(
            [sys.executable, "-c", LOOP], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
        )
    except subprocess.TimeoutExpired:
        raise AssertionError("a fork beside OpenBLAS work deadlocked (still running after 60 s)") from None
    assert out.returncode == 0, out.stderr[-2000:]
    before, inside, after, forks = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(before.values()) == {2}, before  # NumPy's OpenBLAS, at 2 threads
    # Inside: every OpenBLAS, SciPy's own included (loaded by the function), at 1 thread.
    assert any("scipy_openblas-" in f for f in inside) and set(inside.values()) == {1}, inside
    assert set(after.values()) == {2}, after  # undone after the block: the process goes on as it was
    assert forks > 10, forks  # the loop really forked while the thread ran
