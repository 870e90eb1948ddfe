"""The status line (common.progress): a spinner on a terminal, one plain line per stage elsewhere;
the preflight's stages; the Opacus warning the run used to print first."""

from __future__ import annotations

import io
import threading
import warnings

import numpy as np
from rich.console import Console

from common.progress import SILENT, StatusLine
from tests.conftest import make_cfg


def _console(terminal: bool) -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=terminal, width=100, highlight=False), out


def test_without_a_terminal_each_stage_is_one_plain_line_and_details_are_silent():
    console, out = _console(terminal=False)
    with StatusLine(console) as status:
        status.stage("loading the data")
        status.detail("site 1 of 8")  # a tick within the stage: a log does not need it
        status.stage("round 2/3: training", line=False)  # a terminal-only status
        console.print("round   1/3 │ done")
        status.stage("final checks")
    assert out.getvalue().splitlines() == ["loading the data …", "round   1/3 │ done", "final checks …"]
    assert "\x1b" not in out.getvalue() and "\r" not in out.getvalue()


def test_on_a_terminal_the_status_is_one_spinner_line_cleared_at_the_end():
    console, out = _console(terminal=True)
    status = StatusLine(console)
    assert status.live
    status.stage("starting Ray")
    # The ServerApp's thread updates it while the main thread waits in Flower.
    worker = threading.Thread(target=lambda: (status.detail("round 1/3: evaluating"), console.print("round 1 line")))
    worker.start()
    worker.join()
    status.close()
    status.close()  # idempotent: the launcher closes it on every way out
    text = out.getvalue()
    assert "round 1 line" in text
    # Nothing of the spinner is left as a line of its own once it is cleared.
    assert "starting Ray …" not in text


def test_silent_stages_accept_everything():
    SILENT.stage("x")
    SILENT.stage("x", line=False)
    SILENT.detail("y")


class _Recorder:
    def __init__(self) -> None:
        self.stages: list[str] = []
        self.details: list[str] = []

    def stage(self, text: str, *, line: bool = True) -> None:
        self.stages.append(text)

    def detail(self, text: str) -> None:
        self.details.append(text)


def test_preflight_names_its_slow_stages():
    from common.preflight import preflight

    seen = _Recorder()
    cfg = make_cfg(task="vae", **{"num-sites": 2, "rounds": 2, "dp.target-epsilon": 8.0})
    preflight(cfg, None, seen)
    assert seen.stages[0].startswith("loading the data (2 sites)")
    assert seen.stages[1].startswith("choosing each site's noise σ for target ε=8 over 2 rounds")
    assert [d.split(" (")[0] for d in seen.details] == [f"noise search: site {i} of 2" for i in (1, 2)]

    fixed = _Recorder()  # a fixed noise multiplier: no search to announce
    preflight(make_cfg(task="vae", **{"num-sites": 3, "dp.target-epsilon": 0.0}), None, fixed)
    assert len(fixed.stages) == 1 and not fixed.details


def test_the_opacus_optimal_order_warning_is_silenced_and_no_other():
    """The RDP order grid's edge: harmless (a valid, possibly loose bound), printed first in every run."""
    from opacus.accountants.analysis import rdp

    from common.privacy.accounting import silence_known_warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        silence_known_warnings()  # what importing common.privacy.accounting does
        _, order = rdp.get_privacy_spent(orders=[2.0, 3.0], rdp=np.array([10.0, 0.001]), delta=1e-5)
        _, low = rdp.get_privacy_spent(orders=[2.0, 3.0], rdp=np.array([0.001, 10.0]), delta=1e-5)
        warnings.warn("another warning", UserWarning, stacklevel=1)  # anything else still shows
    assert (order, low) == (3.0, 2.0)  # both edges of the grid: Opacus warned twice
    assert [str(w.message) for w in caught] == ["another warning"]
