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
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from vna.telemetry import Telemetry

__all__ = ["JobReport", "Job", "Daemon"]

log = logging.getLogger(__name__)


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

    def summary(self) -> str:
        """One line for logs and the CLI."""
        mode = " (dry run)" if self.dry_run else ""
        return (f"{self.job}{mode}: examined {self.examined}, done {self.done}, findings {self.findings}, "
                f"failures {self.failures}, bytes {self.bytes}")

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (``--json``)."""
        return {"job": self.job, "examined": self.examined, "done": self.done, "findings": self.findings,
                "failures": self.failures, "bytes": self.bytes, "dry_run": self.dry_run, "details": self.details}


class Job(Protocol):
    """A bounded, idempotent, kill-safe job."""

    name: str

    def run_once(self, limit: int | None = None, dry_run: bool = False) -> JobReport:
        """Do at most ``limit`` items of work and report."""
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
