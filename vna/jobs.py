"""The Job port: bounded, idempotent units of background work, and a Daemon that loops them.

A job's ``run_once(limit, dry_run)`` does at most ``limit`` items, may be killed
at any point and re-run, and returns a :class:`JobReport`. Destructive jobs do
nothing but plan when ``dry_run`` is true.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from itertools import islice
from typing import TYPE_CHECKING, Any, Iterator, Protocol

if TYPE_CHECKING:
    from vna.telemetry import Telemetry

__all__ = ["JobReport", "Job", "Progress", "NO_PROGRESS", "count_left", "format_bytes", "Daemon"]

log = logging.getLogger(__name__)


def format_bytes(n: int) -> str:
    """Bytes the one way every job summary and plan prints them: ``12345678 bytes (12.3 MB)``."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n} bytes ({n / size:.1f} {unit})"
    return f"{n} bytes"


@dataclass
class JobReport:
    """What one run did. ``findings`` > 0 or ``failures`` > 0 make the CLI exit 1."""

    job: str
    examined: int = 0
    done: int = 0
    findings: int = 0
    failures: int = 0
    bytes: int = 0
    dry_run: bool = False
    details: list[dict[str, Any]] = field(default_factory=list)
    #: items a run that stopped at its limit did not examine (None: it did not stop at a limit)
    not_examined: int | None = None
    #: ``not_examined`` is a lower bound (the count stopped at a cap)
    not_examined_capped: bool = False
    #: the setting that bounds a run of this job (named when a run stopped at it)
    limit_setting: str = ""
    #: what the run left unreported and why (e.g. blobs within a grace period)
    notes: list[str] = field(default_factory=list)

    def stopped_at_limit(self, left: int, capped: bool = False) -> None:
        """Record that the run stopped at its limit with ``left`` items (at least, if ``capped``) not examined."""
        self.not_examined = left
        self.not_examined_capped = capped

    def counts(self) -> str:
        """The counts part of :meth:`summary` (subclasses add their own figures here)."""
        mode = " (dry run)" if self.dry_run else ""
        return (f"{self.job}{mode}: examined {self.examined}, done {self.done}, findings {self.findings}, "
                f"failures {self.failures}, {format_bytes(self.bytes)}")

    def summary(self) -> str:
        """One line for logs and the CLI: the counts, then what the run left unexamined or unreported."""
        line = self.counts()
        extra = list(self.notes)
        if self.not_examined:
            left = f"at least {self.not_examined}" if self.not_examined_capped else str(self.not_examined)
            setting = f" or raise {self.limit_setting} (--limit)" if self.limit_setting else " or raise --limit"
            extra.append(f"{left} not examined, run again{setting}")
        return "; ".join([line, *extra])

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (``--json``)."""
        return {"job": self.job, "examined": self.examined, "done": self.done, "findings": self.findings,
                "failures": self.failures, "bytes": self.bytes, "dry_run": self.dry_run, "details": self.details,
                "not_examined": self.not_examined, "not_examined_is_lower_bound": self.not_examined_capped,
                "notes": self.notes}


#: items counted at most past a run's limit to say how many are left (a bound, not a catalogue scan)
LEFT_COUNT_CAP = 10_000


def count_left(rest: Iterator[Any], cap: int = LEFT_COUNT_CAP) -> tuple[int, bool]:
    """How many items ``rest`` still yields, reading at most ``cap`` of them: (count, count is a lower bound)."""
    n = sum(1 for _ in islice(rest, cap))
    if n < cap:
        return n, False
    return n, next(rest, None) is not None


class Progress(Protocol):
    """Where a job reports how far it is (a terminal bar, periodic log lines, or nothing).

    Jobs call ``begin`` once per phase with the number of items the phase will
    examine when it is known cheaply (a limit, a list already in memory), else
    None, then ``advance`` per item. Nothing here may raise into the job.
    """

    def begin(self, what: str, total: int | None, unit: str = "items") -> None:
        """A phase starts: ``what`` it does, ``total`` items if known, ``unit`` their plural name."""
        ...

    def advance(self, n: int = 1) -> None:
        """``n`` more items of the current phase are done."""
        ...


class _NoProgress:
    """A :class:`Progress` that shows nothing (daemons, tests, the gRPC front-end)."""

    def begin(self, what: str, total: int | None, unit: str = "items") -> None:
        return None

    def advance(self, n: int = 1) -> None:
        return None


NO_PROGRESS: Progress = _NoProgress()


class Job(Protocol):
    """A bounded, idempotent, kill-safe job."""

    name: str

    def run_once(self, limit: int | None = None, dry_run: bool = False) -> JobReport:
        """Do at most ``limit`` items of work and report (jobs also take ``progress=`` a :class:`Progress`)."""
        ...


class Daemon:
    """Runs a job every ``interval`` seconds in a background thread until stopped.

    A failing run is logged and retried at the next interval; it never kills
    the process serving DICOM. With ``telemetry`` each run is a ``job.<name>``
    span and counted (give none for a job that instruments its own runs).
    """

    def __init__(self, job: Job, interval: float, limit: int | None = None, *,
                 telemetry: Telemetry | None = None) -> None:
        self.job = job
        self.telemetry = telemetry
        self.interval = interval
        self.limit = limit
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"vna-daemon-{job.name}", daemon=True)

    def start(self) -> None:
        """Start looping."""
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Ask the loop to end after the current run and wait for it."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                if self.telemetry is None:
                    report = self.job.run_once(limit=self.limit)
                else:
                    with self.telemetry.job(self.job.name) as run:
                        report = run.report = self.job.run_once(limit=self.limit)
                log.info("%s", report.summary())
            except Exception:  # a daemon must survive any single failed run
                log.exception("job %s failed; retrying in %.0f s", self.job.name, self.interval)
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - started)))
