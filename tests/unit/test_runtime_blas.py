"""Ray forks its processes (``Popen(preexec_fn=...)``, a plain fork that runs OpenBLAS's
``pthread_atfork`` handler) while the ServerApp thread evaluates with NumPy. A fork amid a
multi-threaded OpenBLAS call deadlocks: a ``make demo`` hung for good at "starting Ray".
Without :func:`common.runtime.single_threaded_blas` the loop below hung in 3 of 4 tries of
3 s on this 2-core machine; with it, it ran thousands of forks every time."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

LOOP = textwrap.dedent(
    """
    import subprocess, threading, time
    import numpy as np
    from threadpoolctl import threadpool_info
    from common.runtime import single_threaded_blas

    single_threaded_blas()
    assert all(p["num_threads"] == 1 for p in threadpool_info() if p["user_api"] == "blas"), threadpool_info()
    stop = False

    def evaluate():  # the ServerApp thread: large enough products that OpenBLAS would use its threads
        a = np.random.default_rng(0).random((300, 300))
        while not stop:
            a @ a

    worker = threading.Thread(target=evaluate, daemon=True)
    worker.start()
    forks, t0 = 0, time.monotonic()
    while time.monotonic() - t0 < 5:  # Ray starting its processes
        subprocess.Popen(["true"], preexec_fn=lambda: None).wait()
        forks += 1
    stop = True
    worker.join()
    print("forks", forks)
    """
)


def test_forks_beside_blas_work_do_not_deadlock_after_single_threaded_blas():
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
    assert int(out.stdout.split()[-1]) > 10, out.stdout  # the loop really forked while the thread ran


def test_single_threaded_blas_reaches_child_processes(monkeypatch):
    """The environment variable is set too: an OpenBLAS loaded later (SciPy's own), and Ray's
    worker processes, start with one thread."""
    code = "import os; from common.runtime import single_threaded_blas; single_threaded_blas(); " + (
        "import subprocess, sys; print(subprocess.run([sys.executable, '-c', "
        "'import os; print(os.environ[\"OPENBLAS_NUM_THREADS\"])'], capture_output=True, text=True).stdout)"
    )
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "4")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "1", out.stdout + out.stderr[-2000:]
