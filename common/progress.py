"""What a run is doing right now: a status line for every stage, from the first second.

On a terminal the current stage is one spinner line with its elapsed seconds (rich),
replaced as stages change and cleared at the end; whatever is printed meanwhile (the
round lines) appears above it. Anywhere else (a pipe, a CI log, a test's StringIO) there is
no spinner and no control sequence: each :meth:`StatusLine.stage` prints one plain line
as it starts, and :meth:`StatusLine.detail` (progress within a stage: which site, which
round) prints nothing, so a log gets one line per stage rather than one per tick.

The planners in ``common`` take the :class:`Stages` protocol, not this class, so they
stay free of any terminal: :data:`SILENT` is the default everywhere.
"""

from __future__ import annotations

import threading
from types import TracebackType
from typing import Protocol

from rich.console import Console
from rich.progress import Progress, ProgressColumn, SpinnerColumn, Task, TaskID, TextColumn
from rich.text import Text


class Stages(Protocol):
    def stage(self, text: str, *, line: bool = True) -> None:
        """A new stage begins (its elapsed time restarts). ``line``: print it where there is
        no spinner (False: a terminal-only status, e.g. every round but the first)."""

    def detail(self, text: str) -> None:
        """Progress within the current stage: the spinner's text only, never a line."""


class _Silent:
    def stage(self, text: str, *, line: bool = True) -> None:
        pass

    def detail(self, text: str) -> None:
        pass


SILENT: Stages = _Silent()


class _Seconds(ProgressColumn):
    def render(self, task: Task) -> Text:
        return Text(f"{int(task.elapsed or 0)} s", style="dim")


class StatusLine:
    """:class:`Stages` on a rich console; safe to call from any thread (the ServerApp's too).

    Texts are console markup built by the program: escape any interpolated value that a
    user or a site chose (``common.textsafe.console_text``). Use as a context manager, or
    call :meth:`close`, so that the spinner is gone before the process says anything last.
    """

    def __init__(self, console: Console) -> None:
        self.console = console
        self.live = console.is_terminal and not console.is_dumb_terminal
        self._lock = threading.Lock()
        self._bar: Progress | None = None
        self._task: TaskID | None = None

    def stage(self, text: str, *, line: bool = True) -> None:
        if not self.live:
            if line:
                self.console.print(f"[dim]{text} …[/]")
            return
        self._show(text, restart=True)

    def detail(self, text: str) -> None:
        if self.live:
            self._show(text, restart=False)

    def _show(self, text: str, *, restart: bool) -> None:
        with self._lock:
            if self._bar is None:
                self._bar = Progress(
                    SpinnerColumn(),
                    TextColumn("{task.description}"),
                    _Seconds(),
                    console=self.console,
                    transient=True,
                    refresh_per_second=8,
                )
                self._bar.start()
                self._task = self._bar.add_task(text, total=None)
            else:
                assert self._task is not None
                if restart:
                    self._bar.reset(self._task, description=text)
                else:
                    self._bar.update(self._task, description=text)

    def close(self) -> None:
        """Clear the spinner (a later stage starts a new one)."""
        with self._lock:
            if self._bar is not None:
                self._bar.stop()
                self._bar, self._task = None, None

    def __enter__(self) -> StatusLine:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
