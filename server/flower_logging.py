"""Flower's log output when Flower itself runs the ServerApp (``flwr run .``, a SuperLink).

``privfed simulate`` quiets Flower in its launcher (``simulations.launcher._quiet_flower``)
before Flower starts. Under ``flwr run`` nothing of privfed runs before Flower's runtime, so
the ServerApp (:func:`server.app.build_server_app`, the module-level ``app``) does the same
when its ``main`` begins, with :func:`flower_logging`:

* **Every line twice.** Opacus calls ``logging.basicConfig()`` when it is imported, which
  gives the root logger a handler; Flower's logger (``flwr``) has its own console handler
  and propagates to the root, so each Flower record came out once as ``INFO : ...`` and
  again as ``12/06/2026 14:03:43:INFO:...`` (DEBUG records too, through the root's handler
  only). Flower's logger stops propagating: its own handler is the one that prints, and the
  line streamed to ``flwr run --stream``.
* **A metric dict per round.** Flower's round building blocks log at INFO ``[ROUND n]``, the
  sampled and received counts, and ``fit progress: (round, loss, {metrics}, seconds)``,
  whose dict is every metric the strategy returns (about 1 kB a round). privfed's own
  round line (:mod:`server.recorder`) says what a person needs, so Flower's records below
  WARNING are dropped while the ServerApp runs, unless verbose: ``FLWR_LOG_LEVEL`` set to
  ``INFO`` or ``DEBUG`` (Flower's own switch) shows them all, as before.

Warnings and errors always pass: a failing site or a refused reply is never hidden.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

LOGGER_NAME = "flwr"  # flwr.common.logger.LOGGER_NAME, without importing Flower here
# Flower's environment variable for its console log level (flwr.common.logger).
VERBOSE_ENV = "FLWR_LOG_LEVEL"


def verbose_from_env() -> bool:
    """Whether the person asked Flower for its INFO (or DEBUG) lines: ``FLWR_LOG_LEVEL``."""
    return os.environ.get(VERBOSE_ENV, "").strip().upper() in ("INFO", "DEBUG")


class WarningsOnly(logging.Filter):
    """Drop Flower's records below WARNING (its per-round INFO lines, the metric dict's among them)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING


@contextmanager
def flower_logging(verbose: bool | None = None) -> Iterator[logging.Logger]:
    """Within: Flower's records print once, and below WARNING not at all unless ``verbose``
    (default: :func:`verbose_from_env`). On exit the filter goes; propagation stays off,
    since a second copy of each line is never wanted (whoever needs the root to see
    Flower's records, e.g. a test's log capture, sets ``propagate`` back)."""
    if verbose is None:
        verbose = verbose_from_env()
    logger = logging.getLogger(LOGGER_NAME)
    logger.propagate = False
    quiet = None if verbose else WarningsOnly()
    if quiet is not None:
        logger.addFilter(quiet)
    try:
        yield logger
    finally:
        if quiet is not None:
            logger.removeFilter(quiet)
