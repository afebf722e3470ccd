"""Plan and run migrations: enumerate a source into the ledger, then pull, verify and record study by study.

A study is ``done`` only after verification: every SOP Instance UID the source
lists is in vna's index with its content digest and a verified copy, and the
source lists at least as many instances as its STUDY keys counted. Anything
else is ``failed`` with the missing UIDs, the DIMSE status and comment, and
retried with doubling back-off until ``migrate.max_attempts``. A run killed
at any point leaves leased studies that the next run takes over (the dead
worker's lease is recognised by its pid, or expires; a live worker renews the
leases of the studies it holds every third of ``migrate.lease_seconds``):
ingest is idempotent for identical bytes, so a re-pull duplicates nothing.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vna.domain import PlacementState, Tier
from vna.errors import LeaseHeld, VnaError
from vna.jobs import JobReport
from vna.migrate.ledger import MigrationLedger, Outcome, StudyPlan, new_owner
from vna.migrate.source import DimseSource, PullResult, SourceError

if TYPE_CHECKING:
    from vna.archive import Archive
    from vna.config import Config, MigrateSource

__all__ = ["plan_source", "MigrationJob", "in_window", "Throttle", "verify_study"]

log = logging.getLogger(__name__)


def plan_source(ledger: MigrationLedger, source: DimseSource, start: dt.date, end: dt.date,
                batch: int = 500) -> tuple[int, int]:
    """Enumerate ``source`` for StudyDate in [start, end] into the ledger: (studies found, new ones).

    When the STUDY keys give no instance count, it is counted with SERIES/IMAGE-level queries.
    """
    try:
        return _plan(ledger, source, start, end, batch)
    finally:
        source.close()


def _plan(ledger: MigrationLedger, source: DimseSource, start: dt.date, end: dt.date,
          batch: int) -> tuple[int, int]:
    found = new = 0
    pending: list[StudyPlan] = []
    for s in source.studies(start, end):
        if s.instances < 0:
            listed = source.study_instances(s.study_uid)
            s.instances = len(listed)
            s.series = len({series for series, _ in listed.values()})
        pending.append(StudyPlan(source.src.ae_title, s.study_uid, s.study_date, s.series, s.instances))
        found += 1
        if len(pending) >= batch:
            new += ledger.add_planned(pending)
            pending = []
    if pending:
        new += ledger.add_planned(pending)
    log.info("migrate plan %s: %d studies found, %d new, %d C-FIND queries", source.src.ae_title, found, new,
             source.find_queries)
    return found, new


def in_window(windows: tuple[str, ...], now: dt.datetime) -> bool:
    """True if local time ``now`` is inside one of the "HH:MM-HH:MM" windows (any time when none)."""
    if not windows:
        return True
    minute = now.hour * 60 + now.minute
    for w in windows:
        a, b = w.split("-")
        start = int(a[:2]) * 60 + int(a[3:])
        end = int(b[:2]) * 60 + int(b[3:])
        if (start <= minute < end) if start <= end else (minute >= start or minute < end):
            return True
    return False


class Throttle:
    """Keeps the average pull rate under instances/s and MB/s (0: unlimited), across worker threads."""

    def __init__(self, instances_per_second: float, mb_per_second: float) -> None:
        self.ips = instances_per_second
        self.bps = mb_per_second * 1_000_000
        self.t0 = time.monotonic()
        self.instances = 0
        self.bytes = 0
        self._lock = threading.Lock()

    def add(self, instances: int, nbytes: int) -> None:
        """Count what was pulled."""
        with self._lock:
            self.instances += instances
            self.bytes += nbytes

    def delay(self) -> float:
        """Seconds to wait before the next pull."""
        with self._lock:
            due = 0.0
            if self.ips:
                due = max(due, self.instances / self.ips)
            if self.bps:
                due = max(due, self.bytes / self.bps)
        return max(0.0, self.t0 + due - time.monotonic())


@dataclass
class _Held:
    ok: bool
    size: int


def _held(archive: Archive, sop_uid: str) -> _Held:
    """Is the instance in vna's index with its digest and a verified copy (hot quorum, or cold)?"""
    rec = archive.index.get_instance(sop_uid)
    if rec is None or not rec.content_sha256:
        return _Held(False, 0)
    if archive.is_committed(sop_uid):
        return _Held(True, rec.content_size)
    cold = any(p.state is PlacementState.OK and p.tier is Tier.COLD for p in archive.index.placements(sop_uid))
    return _Held(cold, rec.content_size)


def verify_study(archive: Archive, study_uid: str, listed: dict[str, tuple[str, str]],
                 expected: int) -> Outcome:
    """Compare what the source lists with what vna holds (not yet a decision on state: see ``verified``)."""
    missing: list[str] = []
    size = archived = 0
    for uid in sorted(listed):
        h = _held(archive, uid)
        if h.ok:
            archived += 1
            size += h.size
        else:
            missing.append(uid)
    extra = sorted(i.sop_uid for i in archive.index.study_instances(study_uid) if i.sop_uid not in listed)
    comment = ""
    short = expected >= 0 and len(listed) < expected
    if short:
        comment = f"the source lists {len(listed)} instances, its STUDY keys count {expected}"
    return Outcome(verified=not missing and not short and bool(listed), expected_instances=max(expected,
                   len(listed)), archived_instances=archived, bytes=size, missing=missing, extra=extra,
                   comment=comment if short else ("" if listed else "the source lists no instance"))


class MigrationJob:
    """The ``run`` job: pulls due studies of the configured sources (a :class:`vna.jobs.Job`)."""

    name = "migrate"

    def __init__(self, archive: Archive, cfg: Config, ledger: MigrationLedger,
                 sources: tuple[MigrateSource, ...] | None = None) -> None:
        self.archive = archive
        self.cfg = cfg
        self.mc = cfg.migrate
        self.ledger = ledger
        self.sources = sources if sources is not None else self.mc.source
        self.owner = new_owner()

    def run_once(self, limit: int | None = None, dry_run: bool = False) -> JobReport:
        """Pull at most ``limit`` studies (over all sources); failures are findings, never ``done``."""
        report = JobReport(job="migrate", dry_run=dry_run)
        left = [limit if limit is not None else 1 << 62]
        for src in self.sources:
            if left[0] <= 0:
                break
            if not in_window(src.windows, dt.datetime.now()):
                log.info("migrate %s: outside its time windows, nothing pulled", src.ae_title)
                continue
            self._run_source(src, left, report, dry_run)
        return report

    def _run_source(self, src: MigrateSource, left: list[int], report: JobReport, dry_run: bool) -> None:
        source = DimseSource(src, self.cfg.dicom.ae_title)
        throttle = Throttle(src.instances_per_second, src.mb_per_second)
        lock = threading.Lock()
        leased: set[str] = set()     # studies this run's workers hold, their leases renewed until finished

        def take() -> StudyPlan | None:
            with lock:
                if left[0] <= 0 or not in_window(src.windows, dt.datetime.now()):
                    return None
                got = self.ledger.claim(src.ae_title, self.owner, self.mc.lease_seconds, time.time(), 1,
                                        self.mc.max_attempts)
                if got:
                    left[0] -= 1
                    leased.add(got[0].study_uid)
                return got[0] if got else None

        def worker() -> None:
            while True:
                plan = take()
                if plan is None:
                    self.archive.index.release_thread()
                    source.close()
                    return
                wait = throttle.delay()
                if wait:
                    time.sleep(wait)
                try:
                    detail = self._study(source, plan, throttle, dry_run)
                finally:
                    with lock:
                        leased.discard(plan.study_uid)
                with lock:
                    report.examined += 1
                    report.details.append(detail)
                    if detail["state"] == "done":
                        report.done += 1
                        report.bytes += int(detail["bytes"])
                    else:
                        report.findings += 1

        stop = threading.Event()
        renewer = threading.Thread(target=self._renew, args=(src.ae_title, leased, lock, stop),
                                   name="vna-migrate-lease", daemon=True)
        renewer.start()
        try:
            with ThreadPoolExecutor(max_workers=src.max_associations, thread_name_prefix="vna-migrate") as pool:
                for f in [pool.submit(worker) for _ in range(src.max_associations)]:
                    f.result()
        finally:
            stop.set()
            renewer.join()

    def _renew(self, source: str, leased: set[str], lock: threading.Lock, stop: threading.Event) -> None:
        """Until ``stop``: every third of ``lease_seconds``, extend the lease of each study in ``leased``, so a
        study that takes longer than one lease is not taken over while this process still works on it. A
        lease found lost is logged (its worker's ``finish`` is then refused: ``lost-lease``)."""
        ttl = self.mc.lease_seconds
        while not stop.wait(ttl / 3):
            with lock:
                uids = sorted(leased)
            for uid in uids:
                try:
                    if not self.ledger.renew(source, uid, self.owner, ttl, time.time()):
                        log.warning("migrate %s: the lease on study %s was lost (taken over)", source, uid)
                except VnaError as exc:   # the ledger did not answer: try again at the next tick
                    log.warning("migrate %s: lease of study %s not renewed: %s", source, uid, exc)

    def _study(self, source: DimseSource, plan: StudyPlan, throttle: Throttle, dry_run: bool) -> dict[str, Any]:
        """Pull (what is missing of) one leased study, verify, and record the outcome."""
        src = source.src
        uid = plan.study_uid
        pull = PullResult(status=0x0000)
        try:
            listed = source.study_instances(uid)
            missing = [u for u in listed if not _held(self.archive, u).ok]
            if missing and not dry_run:
                pull = self._pull(source, uid, listed, missing)
            outcome = verify_study(self.archive, uid, listed, plan.expected_instances)
        except SourceError as exc:
            outcome = Outcome(False, plan.expected_instances, 0, 0, status=exc.status,
                              comment=exc.comment or str(exc))
        except VnaError as exc:
            outcome = Outcome(False, plan.expected_instances, 0, 0, comment=f"{type(exc).__name__}: {exc}")
        if outcome.missing and pull.status not in (0x0000, -2):
            outcome.status = pull.status
            outcome.comment = "; ".join(x for x in (outcome.comment, pull.comment, (
                f"{len(pull.failed)} sub-operations failed" if pull.failed else "")) if x)
        elif outcome.missing and pull.status == 0x0000 and not outcome.comment:
            outcome.comment = "the source reported success but did not send every listed instance"
        throttle.add(outcome.archived_instances, outcome.bytes)
        if dry_run:
            return {"study_uid": uid, "state": "dry-run", "missing": len(outcome.missing), "bytes": 0}
        delay = self.mc.retry_seconds * (2 ** plan.attempts)
        try:
            state = self.ledger.finish(src.ae_title, uid, self.owner, outcome, time.time(), time.time() + delay)
        except LeaseHeld as exc:
            log.warning("migrate %s: %s", src.ae_title, exc)
            state = "lost-lease"
        log.info("migrate %s: study %s %s (%d/%d instances, status %s)", src.ae_title, uid, state,
                 outcome.archived_instances, outcome.expected_instances,
                 f"0x{outcome.status:04X}" if outcome.status >= 0 else "-")
        return {"study_uid": uid, "state": state, "archived": outcome.archived_instances,
                "expected": outcome.expected_instances, "missing": outcome.missing, "bytes": outcome.bytes,
                "status": outcome.status, "comment": outcome.comment}

    def _pull(self, source: DimseSource, study_uid: str, listed: dict[str, tuple[str, str]],
              missing: list[str]) -> PullResult:
        """C-MOVE (to vna's own AE) or C-GET the missing instances: the whole study when all are missing."""
        src = source.src
        groups: list[tuple[str, list[str] | None]]
        if len(missing) == len(listed):
            groups = [("", None)]
        else:
            by_series: dict[str, list[str]] = {}
            for u in missing:
                by_series.setdefault(listed[u][0], []).append(u)
            groups = list(by_series.items())
        last = PullResult(status=0x0000)
        for series_uid, sops in groups:
            if src.method == "get":
                spool = self.cfg.resolve("spool/migrate")
                spool.mkdir(parents=True, exist_ok=True)
                result = source.get(study_uid, {c for _, c in listed.values()}, self._store(src.ae_title),
                                    spool, series_uid, sops)
            else:
                result = source.move(self.cfg.dicom.ae_title, study_uid, series_uid, sops)
            if result.status != 0x0000:
                last = result
        return last

    def _store(self, source_ae: str) -> Any:
        def store(path: Path, sop_uid: str) -> int:
            try:
                self.archive.ingest.ingest_file(path, source_ae=source_ae, expected_sop_uid=sop_uid)
            except VnaError as exc:
                log.warning("migrate %s: C-GET instance refused by ingest: %s", source_ae, exc)
                return 0xA700
            return 0x0000
        return store
