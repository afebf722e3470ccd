"""Cross-site disaster-recovery copies, and keeping a local copy of an instance fetched from another site.

:class:`CopyJob` runs at the *destination* site: for each ``[[federation.copy]]``
rule it selects the studies of the rule's ``from_site`` (modalities, age,
explicit study list), fetches every instance that site holds and this site does
not over gRPC (verified against the index's digest and size), writes it to
this site's hot tier (create-new, quorum), and records the new placements with
``add_placements``. DR copies are kept under the blob key prefix
``dr/<from_site>/`` so they can be counted (``vna sites status``). The job is
bounded (``limit`` instances), idempotent (an instance with any placement at
this site is skipped) and kill-safe (blob first, row second; an unrecorded blob
is an orphan the orphan finder reports, never a half-recorded copy).

Selection without scanning every study: per rule, the job reads the copy log of
``from_site`` (the Index port's ``copy_log``: studies by the time one of their
instances got an OK copy there) from the rule's cursor, and first its own
*route* queue, where it parked the studies it could not finish: too recent for
``min_age_days`` (due at their newest reception) or not all copied (a failure;
retried every run). The cursor passes a study once it is copied, parked or not
wanted, and never an entry of the last ``LOG_SETTLE`` seconds: a writer puts its
entry in the log before its change is visible, and its change lands within that
time (clock skew included), so those entries are read again next run. A changed
rule has another route and cursor: it reads the log from the start (every study
held there). So a run selects what a scan of every study would select.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

from vna.config import CopyRule, FederationConfig
from vna.domain import InstanceRecord, Placement, PlacementState, site_of
from vna.errors import IntegrityError, NotFound, SiteUnavailable, StateConflict, StorageError
from vna.federation.sites import Sites
from vna.index.base import Index, QueueEntry, StudySummary, copy_log
from vna.jobs import NO_PROGRESS, JobReport, Progress, count_left
from vna.storage.accessor import TierAccessor, site_of_tiers

__all__ = ["CopyJob", "add_local_copy", "DR_PREFIX", "CACHE_PREFIX"]

log = logging.getLogger(__name__)

#: instances counted at most past a run's limit (each costs index reads) when telling how many are left
_LEFT_INSTANCES = 1000

#: seconds within which a change lands after its copy-log entry (clock skew included): the cursor stays behind
LOG_SETTLE = 600.0
#: queue entries read per index query
_PAGE = 200

#: Blob key prefix of disaster-recovery copies (``dr/<from_site>/<study>/<series>/...``).
DR_PREFIX = "dr"
#: Blob key prefix of copies kept after a cross-site retrieve (``cache_remote``).
CACHE_PREFIX = "remote"


def add_local_copy(index: Index, hot: TierAccessor, inst: InstanceRecord, path: Path, *,
                   prefix: str = CACHE_PREFIX) -> list[Placement]:
    """Write a verified file of ``inst`` to every hot replica and record the placements.

    ``path`` must hold bytes already verified against ``inst``'s digest; keys
    go under ``prefix/`` (none when empty). Blob
    first, rows second: if the index refuses (StateConflict: a copy on one of
    these stores is already recorded) or fails, the new blobs are removed and
    the error raised. Raises QuorumNotMet, StateConflict, IndexUnavailable.
    """
    key = f"{inst.study_uid}/{inst.series_uid}/{inst.sop_uid}.v{inst.version}.{uuid.uuid4().hex[:12]}.dcm"
    key = f"{prefix}/{key}" if prefix else key
    writes = hot.write_file(key, path, inst.content_sha256, inst.content_size)
    placements = hot.placements(writes, sop_uid=inst.sop_uid, version=inst.version,
                                content_sha256=inst.content_sha256, content_size=inst.content_size)
    try:
        index.add_placements(placements)
    except BaseException:
        hot.delete_all(key, [w.store_id for w in writes if w.ok])
        raise
    return placements


def _nothing(ok: bool) -> None:
    """Nothing to record once an explicitly listed study is done."""


class _Unit(NamedTuple):
    """One study a run looks at: its instances to copy, and what to record once they are done
    (``finish(True)``: all copied; ``finish(False)``: some failed)."""

    rule: CopyRule
    client: Any
    study_uid: str
    instances: list[InstanceRecord]
    finish: Callable[[bool], None]


class CopyJob:
    """Pulls the studies the copy rules select from their owning sites (see the module docstring)."""

    name = "federation.copy"

    def __init__(self, index: Index, hot: TierAccessor, sites: Sites, fed: FederationConfig, spool_dir: Path, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.index = index
        self.hot = hot
        self.site = site_of_tiers({hot.tier: hot})
        self.sites = sites
        self.rules = fed.copy
        self.spool_dir = spool_dir
        self._clock = clock

    def route(self, rule: CopyRule) -> str:
        """The queue (and cursor name) of ``rule`` at this site; another rule, another route."""
        digest = hashlib.sha256(repr((rule.from_site, sorted(rule.modalities), float(rule.min_age_days))).encode())
        return f"copy:{rule.from_site}>{self.site}:{digest.hexdigest()[:16]}"

    def _todo(self, rule: CopyRule, study_uid: str) -> Iterator[InstanceRecord]:
        """Instances of the study held (OK) at the rule's site and not at all at this one."""
        for inst in self.index.study_instances(study_uid):
            if rule.modalities and inst.attrs.get("Modality", "") not in rule.modalities:
                continue
            rows = self.index.placements(inst.sop_uid, inst.version)
            if any(site_of(p.store_id) == self.site for p in rows):
                continue
            if any(site_of(p.store_id) == rule.from_site and p.state is PlacementState.OK for p in rows):
                yield inst

    def _units(self, rule: CopyRule, client: Any) -> Iterator[_Unit]:
        """The rule's studies to look at: parked ones due, then the log since the cursor (module docstring)."""
        if rule.study_uids:
            for uid in rule.study_uids:
                yield _Unit(rule, client, uid, list(self._todo(rule, uid)), _nothing)
            return
        now = self._clock()
        before = now - rule.min_age_days * 86400.0 if rule.min_age_days else None
        route = self.route(rule)
        handled: set[str] = set()

        def look(entry: QueueEntry, seen_at: float, finish: Callable[[bool, StudySummary | None], None]) -> _Unit:
            uid = entry.study_uid
            if uid in handled:
                return _Unit(rule, client, uid, [], lambda ok: finish(True, None))
            handled.add(uid)
            study = self.index.study_summary(uid)
            if study is None or (rule.modalities and not set(rule.modalities) & set(study.modalities)):
                return _Unit(rule, client, uid, [], lambda ok: finish(True, None))
            if before is not None and not study.last_received < before:
                return _Unit(rule, client, uid, [], lambda ok: finish(False, study))
            return _Unit(rule, client, uid, list(self._todo(rule, uid)), lambda ok: finish(ok, study))

        after: QueueEntry | None = None
        while True:  # parked: drop when done (or unwanted), move a too recent one to its newest reception
            seen_at = time.time()
            page = self.index.queued(route, upto=before, after=after, limit=_PAGE)
            for entry in page:
                after = entry

                def parked(ok: bool, study: StudySummary | None, entry: QueueEntry = entry,
                           seen_at: float = seen_at) -> None:
                    if ok:
                        self.index.requeue(entry, None, seen_at=seen_at)
                    elif study is not None and study.last_received > entry.due:
                        self.index.requeue(entry, study.last_received, seen_at=seen_at)
                yield look(entry, seen_at, parked)
            if len(page) < _PAGE:
                break
        after = self.index.job_cursor(route)
        while True:  # the log since the cursor: the cursor passes a study once it is done or parked
            seen_at = time.time()
            page = self.index.queued(copy_log(rule.from_site), after=after, limit=_PAGE)
            for entry in page:
                after = entry

                def logged(ok: bool, study: StudySummary | None, entry: QueueEntry = entry) -> None:
                    if not ok and study is not None:
                        self.index.enqueue(QueueEntry(study.last_received, study.study_uid, route))
                    if entry.due <= now - LOG_SETTLE:  # a later entry is read again (its change may still land)
                        self.index.set_job_cursor(route, entry)
                yield look(entry, seen_at, logged)
            if len(page) < _PAGE:
                break

    def _work(self) -> Iterator[_Unit]:
        """Every study the rules may want copied here, with its instances to copy."""
        for rule in self.rules:
            client = self.sites.get(rule.from_site)
            if client is not None:
                yield from self._units(rule, client)

    def run_once(self, limit: int | None = None, dry_run: bool = False,
                 progress: Progress = NO_PROGRESS) -> JobReport:
        """Copy at most ``limit`` instances. ``failures``: instances not copied (site down, bad bytes).

        A run that stops at ``limit`` counts the instances it left, up to a bound. A dry run changes
        neither the route queues nor the cursors.
        """
        report = JobReport(job=self.name, dry_run=dry_run, limit_setting="federation.copy_batch_limit")
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        work = self._work()
        progress.begin("copying instances", limit, "instances")
        left: list[InstanceRecord] = []
        for unit in work:
            failures = report.failures
            for n, inst in enumerate(unit.instances):
                if limit is not None and report.examined >= limit:
                    left = unit.instances[n:]
                    break
                progress.advance()
                report.examined += 1
                self._one(unit, inst, report, dry_run)
            if left:
                break
            if not dry_run:
                unit.finish(report.failures == failures)
        if left:
            rest = (inst for unit in work for inst in unit.instances)
            more, capped = count_left(rest, max(limit or 0, _LEFT_INSTANCES))
            report.stopped_at_limit(len(left) + more, capped)
        return report

    def _one(self, unit: _Unit, inst: InstanceRecord, report: JobReport, dry_run: bool) -> None:
        rule, client = unit.rule, unit.client
        detail: dict[str, Any] = {"study": unit.study_uid, "sop_uid": inst.sop_uid, "version": inst.version,
                                  "from_site": rule.from_site, "bytes": inst.content_size}
        report.details.append(detail)
        if dry_run:
            detail["outcome"] = "would copy"
            report.bytes += inst.content_size
            return
        if not client.healthy():
            detail["outcome"] = "failed"
            detail["error"] = f"site {rule.from_site} is unreachable"
            report.failures += 1
            return
        self._copy(client, rule, inst, report, detail)

    def _copy(self, client: Any, rule: CopyRule, inst: InstanceRecord, report: JobReport,
              detail: dict[str, Any]) -> None:
        fd, name = tempfile.mkstemp(dir=self.spool_dir, suffix=".dcm")
        os.close(fd)
        path = Path(name)
        try:
            client.fetch(inst.sop_uid, path, content_sha256=inst.content_sha256, size=inst.content_size)
            placements = add_local_copy(self.index, self.hot, inst, path, prefix=f"{DR_PREFIX}/{rule.from_site}")
        except StateConflict:
            detail["outcome"] = "skipped"
            detail["reason"] = "a copy at this site was recorded concurrently"
            return
        except (SiteUnavailable, NotFound, IntegrityError, StorageError) as exc:
            detail["outcome"] = "failed"
            detail["error"] = str(exc)
            report.failures += 1
            log.error("%s: cannot copy %s from site %s: %s", self.name, inst.sop_uid, rule.from_site, exc)
            return
        finally:
            path.unlink(missing_ok=True)
        report.done += 1
        report.bytes += inst.content_size
        detail["outcome"] = "copied"
        detail["stores"] = ",".join(p.store_id for p in placements if p.state is PlacementState.OK)
        log.info("%s: copied %s v%d from site %s", self.name, inst.sop_uid, inst.version, rule.from_site)
