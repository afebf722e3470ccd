"""How a CLI job shows progress: a bar (tqdm) on a terminal, periodic log lines elsewhere.

:class:`ProgressDisplay` is the one :class:`vna.jobs.Progress` the verbs give
their jobs. On a terminal it draws a tqdm bar on stderr (rate, and an ETA
when the phase's total is known) and routes log lines above the bar; when
stderr is not a terminal it logs one INFO line per ``interval`` seconds
(items done, rate, ETA when the total is known). Jobs never see which.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from contextlib import ExitStack
from types import TracebackType
from typing import Any, Callable, TextIO

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

__all__ = ["ProgressDisplay", "add_progress_flag", "progress_for"]

log = logging.getLogger(__name__)

#: seconds between progress log lines when stderr is not a terminal
DEFAULT_INTERVAL = 10.0


def _duration(seconds: float) -> str:
    s = int(seconds + 0.5)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class ProgressDisplay:
    """A :class:`vna.jobs.Progress` for one CLI run; use it as a context manager (it closes the bar)."""

    def __init__(self, job: str, *, stream: TextIO | None = None, terminal: bool | None = None,
                 interval: float = DEFAULT_INTERVAL, clock: Callable[[], float] = time.monotonic) -> None:
        self.job = job
        self.stream = sys.stderr if stream is None else stream
        self.terminal = self.stream.isatty() if terminal is None else terminal
        self.interval = interval
        self._clock = clock
        self._bar: tqdm[Any] | None = None
        self._stack = ExitStack()
        self._what = ""
        self._unit = "items"
        self._total: int | None = None
        self._done = 0
        self._started = 0.0
        self._logged = 0.0

    def __enter__(self) -> ProgressDisplay:
        if self.terminal:
            self._stack.enter_context(logging_redirect_tqdm())
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._close_bar()
        self._stack.close()

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def begin(self, what: str, total: int | None, unit: str = "items") -> None:
        """Start a phase (a new bar, or a start line in the log)."""
        self._close_bar()
        self._what, self._total, self._unit, self._done = what, total, unit, 0
        self._started = self._logged = self._clock()
        if self.terminal:
            self._bar = tqdm(total=total, desc=f"{self.job}: {what}", unit=f" {unit}", file=self.stream,
                             leave=True, dynamic_ncols=True, mininterval=0.2)
        else:
            log.debug("%s: %s, %s", self.job, what,
                     f"{total} {unit} at most" if total is not None else f"{unit} not counted ahead")

    def advance(self, n: int = 1) -> None:
        """Count ``n`` items; a log line when ``interval`` has passed since the last one."""
        self._done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        if self.terminal:
            return
        now = self._clock()
        if now - self._logged < self.interval:
            return
        self._logged = now
        elapsed = now - self._started
        rate = self._done / elapsed if elapsed > 0 else 0.0
        if self._total:
            eta = f", ETA {_duration((self._total - self._done) / rate)}" if rate > 0 else ""
            log.info("%s: %s: %d of %d %s (%.1f/s%s)", self.job, self._what, self._done, self._total,
                     self._unit, rate, eta)
        else:
            log.info("%s: %s: %d %s (%.1f/s)", self.job, self._what, self._done, self._unit, rate)


def add_progress_flag(p: argparse.ArgumentParser) -> None:
    """``--progress-every SECONDS``: the interval of progress log lines when stderr is not a terminal."""
    p.add_argument("--progress-every", type=float, default=DEFAULT_INTERVAL, metavar="SECONDS",
                   help=f"seconds between progress log lines when stderr is not a terminal "
                        f"(default {DEFAULT_INTERVAL:g}; a terminal shows a bar)")


def progress_for(job: str, args: argparse.Namespace) -> ProgressDisplay:
    """The display for a verb's job, from its parsed arguments."""
    return ProgressDisplay(job, interval=getattr(args, "progress_every", DEFAULT_INTERVAL))
