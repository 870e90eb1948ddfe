"""Issue 23, item 8: under `flwr run .` each Flower line printed twice (Opacus's basicConfig
gives the root logger a handler, Flower's logger propagates to it) and each round logged a
~1.5 kB metric dict. The module-level ServerApp (what Flower loads) logs each record once and
drops Flower's records below WARNING unless FLWR_LOG_LEVEL asks for them."""

from __future__ import annotations

import logging
from logging import INFO, WARNING
from types import SimpleNamespace

import pytest
from flwr.common.logger import log

import server.app as server_app
from server.flower_logging import LOGGER_NAME, flower_logging, verbose_from_env

METRIC_DICT = {f"class.{i}.recon_nll": 44.0 + i for i in range(10)}


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def handlers():
    """Flower's console handler on its logger, and a root handler as Opacus's basicConfig adds."""
    flwr_logger, root = logging.getLogger(LOGGER_NAME), logging.getLogger()
    own, rooted = _Lines(), _Lines()
    # As Flower leaves its logger: a simulation earlier in this process (the launcher's
    # _quiet_flower) leaves a warnings-only filter and propagate off on it, which would hide
    # exactly the lines these tests count.
    propagate, filters, level = flwr_logger.propagate, list(flwr_logger.filters), flwr_logger.level
    flwr_logger.propagate, flwr_logger.filters = True, []
    flwr_logger.setLevel(logging.DEBUG)
    flwr_logger.addHandler(own)
    root.addHandler(rooted)
    yield SimpleNamespace(lines=lambda: own.lines + rooted.lines)
    flwr_logger.removeHandler(own)
    root.removeHandler(rooted)
    flwr_logger.propagate, flwr_logger.filters = propagate, filters
    flwr_logger.setLevel(level)


def _round_logs() -> None:
    log(INFO, "fit progress: (%s, %s, %s, %s)", 1, 34.3, METRIC_DICT, 17.4)
    log(WARNING, "round %s: a site failed", 1)


def test_without_it_every_flower_line_comes_out_twice(handlers):
    _round_logs()
    assert handlers.lines().count("round 1: a site failed") == 2  # the bug, as Flower + Opacus leave it


def test_each_record_once_and_no_metric_dict(handlers):
    with flower_logging(verbose=False):
        _round_logs()
    lines = handlers.lines()
    assert lines == ["round 1: a site failed"]  # once; the warning kept, the dict line dropped


def test_verbose_shows_flowers_lines_once(handlers, monkeypatch):
    monkeypatch.setenv("FLWR_LOG_LEVEL", "INFO")
    assert verbose_from_env()
    with flower_logging():
        _round_logs()
    lines = handlers.lines()
    assert len(lines) == 2 and lines[0].startswith("fit progress: (1,") and lines[1] == "round 1: a site failed"


def test_the_filter_goes_when_the_app_returns(handlers):
    with flower_logging(verbose=False):
        pass
    log(INFO, "Run finished")
    assert handlers.lines() == ["Run finished"]


def test_the_module_level_app_quiets_flower_while_it_runs_and_the_launchers_does_not(handlers, monkeypatch):
    """`app` (what `flwr run .` loads) sets it up; build_server_app() as the launcher and
    tests call it leaves Flower's logging to them."""
    from flwr.app import Context, RecordDict

    class _Summary:
        def headline(self) -> list[str]:
            return []

    def fake_run(grid, context, cfg, console, **_):
        _round_logs()
        return _Summary()

    monkeypatch.delenv("FLWR_LOG_LEVEL", raising=False)
    monkeypatch.setattr(server_app, "run_federation", fake_run)
    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    server_app.app(SimpleNamespace(), ctx)  # type: ignore[arg-type]
    assert handlers.lines() == ["round 1: a site failed"]
    logging.getLogger(LOGGER_NAME).propagate = True
    server_app.build_server_app()(SimpleNamespace(), ctx)  # type: ignore[arg-type]
    assert len(handlers.lines()) == 1 + 4  # untouched: both records, each twice
