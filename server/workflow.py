"""The round loop: Flower's DefaultWorkflow, plus an end-of-round hook and a clean stop.

Flower's ``DefaultWorkflow`` runs a fixed number of rounds and has no hook after a
round. We reuse its building blocks unchanged (parameter init, the fit workflow,
centralised and federated evaluation) and add four things: ``after_fit`` (the strategy
applies the round's sum, plus central-DP noise, even in rounds where Flower never calls
``aggregate_fit``), an end of round (the run's callbacks, :mod:`server.callbacks`, judge
the round: extra metrics, a failure, a reason to stop; then ``record_round`` writes it)
a clean stop, and an interrupt (:class:`StopRequest`: Ctrl-C in ``privfed simulate``).
The fit step is pluggable: Flower's default or SecAgg+ (:mod:`server.secagg`).
"""

from __future__ import annotations

import threading
import time
import timeit
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import flwr.compat.common.recorddict_compat as compat
import numpy as np
from flwr.app import ConfigRecord, Context, Message
from flwr.common import ndarrays_to_parameters
from flwr.compat.server.typing import Workflow
from flwr.server import Grid, LegacyContext
from flwr.server.compat.app_utils import start_update_client_manager_thread
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.server.workflow.default_workflows import (
    default_centralized_evaluation_workflow,
    default_evaluate_workflow,
    default_fit_workflow,
    default_init_params_workflow,
)

from common.errors import PrivfedError
from server.callbacks import RoundOutcome, RunCallback

# How often the run asks the grid whether every site is there yet, before round 1.
SITE_POLL_SECONDS = 0.2


class RunInterrupted(BaseException):
    """The operator stopped the run (Ctrl-C): not a failure, and the run can be resumed.

    A BaseException, as KeyboardInterrupt is, so that no ``except Exception`` on its way
    (Flower's workflows, the strategy, a callback) takes it for a site's or a round's error."""


@dataclass
class StopRequest:
    """Ctrl-C, from the launcher's signal handler (main thread) to the ServerApp's thread.

    ``requested``: set by the handler. The round loop then stops at its next wait (for
    replies, for the sites, or between rounds): the round in progress is abandoned. What the
    ledger holds stays (each round's rows are one committed transaction); a site that
    trained in the abandoned round has the spend in its own history and reports it in its
    next reply, which ledgers it (server.resume). ``server_done``: set by
    ``server.app.run_federation`` once the ledger is closed, however the run ended;
    ``interrupted``: whether it ended on this request (False: it had already finished).
    """

    requested: threading.Event = field(default_factory=threading.Event)
    server_done: threading.Event = field(default_factory=threading.Event)
    interrupted: bool = False

    def check(self) -> None:
        if self.requested.is_set():
            raise RunInterrupted()


class RoundLoop:
    def __init__(
        self,
        *,
        round_outcome: Callable[[int], RoundOutcome],
        record_round: Callable[[RoundOutcome, float, dict[str, Any], bool], None],
        callbacks: Sequence[RunCallback] = (),
        on_stop: Callable[[int, str], None] = lambda rnd, why: None,
        num_sites: int,
        site_wait_seconds: float,
        on_start: Callable[[], None] = lambda: None,
        fit_workflow: Workflow | None = None,
        after_fit: Callable[[int], list[np.ndarray] | None] = lambda rnd: None,
        on_round_start: Callable[[int], None] = lambda rnd: None,
        first_round: int = 1,
        round_timeout: float = 0.0,
        stop: StopRequest | None = None,
    ) -> None:
        """``on_start()`` runs once every site has connected; ``after_fit(round)`` returns the
        new global arrays (or None: unchanged); ``round_outcome(round)`` gives the ended
        round to the callbacks; ``record_round(outcome, seconds, extra metrics, ok)`` writes it;
        ``on_stop(round, why)`` tells of a clean stop."""
        self.fit_workflow = fit_workflow or default_fit_workflow
        self.after_fit = after_fit
        self.on_round_start = on_round_start  # e.g. mark the round begun in the ledger (resume)
        self.round_outcome = round_outcome
        self.record_round = record_round
        self.callbacks = list(callbacks)
        self.on_stop = on_stop
        self.on_start = on_start
        self.num_sites = num_sites
        self.site_wait_seconds = site_wait_seconds
        self.first_round = first_round
        self.round_timeout = round_timeout  # seconds; 0 = wait for every reply
        self.stop = stop

    def __call__(self, grid: Grid, context: Context) -> None:
        if not isinstance(context, LegacyContext):
            raise TypeError(f"expected a LegacyContext, got {type(context).__name__}")
        if self.stop is not None:
            grid = cast(Grid, StoppableGrid(grid, self.stop))
        if self.round_timeout > 0:
            # TimedGrid is a proxy, not a Grid subclass (Grid's abstract methods are forwarded by __getattr__).
            grid = cast(Grid, TimedGrid(grid, self.round_timeout))
        thread, stop_flag, registered = start_update_client_manager_thread(grid, context.client_manager)
        try:
            registered.wait()
            # Flower's own sampling would wait a whole day for missing sites; fail clearly instead.
            if not self._wait_for_sites(context):
                raise PrivfedError(
                    f"only {context.client_manager.num_available()} of num-sites={self.num_sites} sites connected "
                    f"within {self.site_wait_seconds:g} s (site-wait-seconds); check num-sites and the SuperNodes"
                )
            self.on_start()
            default_init_params_workflow(grid, context)
            cfg = ConfigRecord()
            cfg[Key.START_TIME] = timeit.default_timer()
            context.state.config_records[MAIN_CONFIGS_RECORD] = cfg
            for rnd in range(self.first_round, context.config.num_rounds + 1):
                if self.stop is not None:
                    self.stop.check()
                t0 = timeit.default_timer()
                cfg[Key.CURRENT_ROUND] = rnd
                self.on_round_start(rnd)
                self.fit_workflow(grid, context)
                arrays = self.after_fit(rnd)
                if arrays is not None:
                    context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
                        ndarrays_to_parameters(arrays), keep_input=True
                    )
                default_centralized_evaluation_workflow(grid, context)
                default_evaluate_workflow(grid, context)
                if not self.end_round(rnd, timeit.default_timer() - t0):
                    break
        finally:
            stop_flag.set()
            thread.join()

    def _wait_for_sites(self, context: LegacyContext) -> bool:
        """Whether every site connected within site-wait-seconds (asking the grid every
        ``SITE_POLL_SECONDS``, and hearing a stop between asks).

        Flower's client-manager thread first asks the grid which nodes exist 5 s after it
        starts (then every 5 s), and ``wait_for`` only wakes when that thread registers a
        node: waiting on it alone cost every run 5 s with every site long connected.
        ``num_available`` is wrapped by that thread to refresh the nodes from the grid
        first, so calling it is how the loop sees a site as soon as it is there.
        """
        deadline = time.monotonic() + self.site_wait_seconds
        while True:
            if self.stop is not None:
                self.stop.check()
            if context.client_manager.num_available() >= self.num_sites:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(SITE_POLL_SECONDS, left))

    def end_round(self, rnd: int, seconds: float) -> bool:
        """Judge round ``rnd`` with the callbacks, record it; False: the run stops here.

        A failure is raised after the round's line is written (its privacy spend is in the
        ledger already) and before a checkpoint, so the last good checkpoint stays."""
        out = self.round_outcome(rnd)
        extra: dict[str, Any] = {}
        for cb in self.callbacks:
            extra.update(cb.round_metrics(out))
        failure = next((f for cb in self.callbacks if (f := cb.round_failure(out)) is not None), None)
        self.record_round(out, seconds, extra, failure is None)
        if failure is not None:
            raise failure
        why = next((w for cb in self.callbacks if (w := cb.stop_reason(out))), None)
        if why:
            self.on_stop(rnd, why)
            return False
        return True


class StoppableGrid:
    """A Grid whose ``send_and_receive`` stops waiting when a :class:`StopRequest` comes.

    Flower's own loop (push, then pull until every reply is in) cannot be told to stop; this
    is the same loop on the Grid's public ``push_messages``/``pull_messages``, with the
    request checked after every pull. Replies pulled once the request came are never
    returned: the launcher then cancels the sites' running tasks, and what those return
    (errors) must not be taken for the round's results.
    """

    def __init__(self, grid: Grid, stop: StopRequest) -> None:
        self._grid, self._stop = grid, stop
        self.pull_interval = float(getattr(grid, "pull_interval", 0.1))

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        self._stop.check()
        pending = set(self._grid.push_messages(messages))
        end = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            got = list(self._grid.pull_messages(pending))
            self._stop.check()
            replies += got
            pending -= {m.metadata.reply_to_message_id for m in got}
            if not pending or (end is not None and time.monotonic() >= end):
                break
            self._stop.requested.wait(self.pull_interval)
        return replies

    def __getattr__(self, name: str) -> Any:  # everything else is the real grid's
        return getattr(self._grid, name)


class TimedGrid:
    """A Grid whose ``send_and_receive`` stops waiting after ``timeout`` seconds.

    Flower's workflow API ignores ``ServerConfig.round_timeout`` (its default workflows
    call ``send_and_receive`` without a timeout), so a silent site would stall the round
    forever. Replies that arrive later are for messages nobody pulls again: dropped.
    """

    def __init__(self, grid: Grid, timeout: float) -> None:
        self._grid, self._timeout = grid, timeout

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self._grid.send_and_receive(messages, timeout=self._timeout if timeout is None else timeout)

    def __getattr__(self, name: str) -> Any:  # everything else is the real grid's
        return getattr(self._grid, name)
