"""Migration of aged studies from the hot replicas to compressed cold bundles, and the purge that follows.

Per study (crash-safe; architecture §5):

1. take the study's lease (another worker or site never migrates it at the same time);
2. per bundle (a series, or the whole study): record cold placements ``PENDING``
   naming the new bundle key — a crash from here on leaves a known key to clean up;
3. read every instance from the hot tier, verifying its digests;
4. compress each into an independent frame of a seekable bundle; put the bundle;
5. read every frame back with a ranged read and verify both digests;
6. as each frame verifies: its cold placement ``OK`` (with frame offsets), then its hot
   placements ``TO_DELETE`` —
   the index refuses that unless another copy of the instance is OK — but only
   while the copies left still count ``archive.min_copies`` (:mod:`vna.lifecycle.copies`):
   a cold copy that counts 1 against a minimum of 2 keeps one hot copy;
7. purge: delete each hot blob, then its row (re-checking the minimum);
8. release the lease.

Steps 3-5 run on every core (``cold.encode_workers``), and steps 5-7 of one
study on a claim thread while steps 1-4 of the next run: each study keeps its
own lease and order of steps.

Killed at any step, the next run finishes the job: a ``PENDING`` cold row is
restarted under a fresh key (its half-written bundle is deleted), ``OK`` rows
are kept, ``TO_DELETE`` rows are purged after re-verifying that the other
copies still count ``min_copies`` — one that would go below (e.g. marked under
an older config) is verified and put back to ``OK`` instead.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from functools import lru_cache, partial
from itertools import islice
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator, TypeVar

from vna.audit import INSTANCES_ACCESSED, Actor, AuditLog
from vna.config import ColdTierConfig, LifecycleConfig
from vna.domain import InstanceRecord, Placement, PlacementState, Tier, site_of
from vna.errors import BlobNotFound, IntegrityError, StateConflict, StorageError, VnaError
from vna.index.base import Index, QueueEntry, StudySummary, lifecycle_queue, study_date_epoch
from vna.jobs import NO_PROGRESS, JobReport, Progress, count_left
from vna.lifecycle.copies import CopyPolicy
from vna.lifecycle.rules import evaluate
from vna.services.retrieve import RetrieveService
from vna.storage.accessor import TierAccessor, site_of_tiers
from vna.storage.base import BlobStore
from vna.storage.bundle import BundleEntry, BundleWriter, EncodedFrame, decode_frame
from vna.telemetry import Telemetry

__all__ = ["Migrator", "Purger", "StudyPlan"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")
_R = TypeVar("_R")

#: due studies counted at most past a run's limit (each costs index reads) when telling how many are left
_LEFT_STUDIES = 100
#: lifecycle queue entries read per index query
_QUEUE_PAGE = 500


@lru_cache(maxsize=4)
def _encode_pool(workers: int) -> ThreadPoolExecutor:
    """One process-wide pool per worker count for encoding cold frames (its threads idle between runs)."""
    return ThreadPoolExecutor(workers, thread_name_prefix="vna-cold-encode")


@lru_cache(maxsize=1)
def _claim_pool() -> ThreadPoolExecutor:
    """The one thread verifying and claiming a study's bundles while the next study's are written."""
    return ThreadPoolExecutor(1, thread_name_prefix="vna-cold-claim")


@dataclass(frozen=True)
class _Bundle:
    """A bundle put on the cold tier, its frames not yet verified or claimed."""

    key: str
    pending: list[Placement]
    entries: list[BundleEntry]
    instances: list[InstanceRecord]


@dataclass
class _Written:
    """The first half of a study's migration: its bundles written, and the error that stopped it, if any."""

    study_uid: str
    bundles: list[_Bundle] = field(default_factory=list)
    error: VnaError | None = None


@dataclass(frozen=True)
class _Claim:
    """A study whose second half is under way on the claim thread, or still to run here: ``result`` waits
    for it (or runs it) and returns the hot bytes freed."""

    study_uid: str
    lease: str
    result: Callable[[], int]


@dataclass(frozen=True)
class StudyPlan:
    """One study the lifecycle would move."""

    study_uid: str
    instances: int
    hot_bytes: int
    #: hot copies kept per instance because of ``archive.min_copies`` (when every hot replica holds one)
    hot_copies_kept: int = 0


class Purger:
    """Deletes copies marked TO_DELETE: blob first, row second, while the verified copies left count ``min_copies``."""

    name = "purge"

    def __init__(self, index: Index, tiers: dict[Tier, TierAccessor], *, audit: AuditLog | None = None,
                 copies: CopyPolicy | None = None) -> None:
        self.index = index
        self.tiers = tiers
        self.site = site_of_tiers(tiers)
        self.audit = audit if audit is not None else AuditLog.disabled()
        self.actor = Actor.process("vna-purge")
        self.copies = copies if copies is not None else CopyPolicy()

    def _verifies(self, p: Placement, why: str) -> bool:
        accessor = self.tiers.get(p.tier)
        if accessor is None:
            return False
        try:
            accessor.read_verified(p, lambda _data: None)
            return True
        except (IntegrityError, StorageError) as exc:
            log.error("%s: copy of %s on %s does not verify: %s", why, p.sop_uid, p.store_id, exc)
            return False

    def copies_left(self, p: Placement, *, verify: bool = True) -> int:
        """The copies the other OK copies *at this site* count for (another site's are not ours to check).

        With ``verify`` each is read and verified first, stopping once ``min_copies`` is reached;
        without it the ledger's OK is trusted (the caller has just verified them).
        """
        counted = 0
        for other in self.index.placements(p.sop_uid, p.version):
            if other.store_id == p.store_id or other.state is not PlacementState.OK \
                    or site_of(other.store_id) != self.site or other.tier not in self.tiers:
                continue
            if verify and not self._verifies(other, f"purge of {p.sop_uid} on {p.store_id}: sibling"):
                continue
            counted += self.copies.weight(other.store_id)
            if verify and counted >= self.copies.min_copies:
                break
        return counted

    def _keep(self, p: Placement) -> bool:
        """Put a TO_DELETE copy back to OK (after verifying it) because deleting it would go below the minimum."""
        if not self._verifies(p, "keeping a copy below archive.min_copies"):
            return False
        if not self.index.transition(p, PlacementState.OK, verified_at=time.time()):
            return False
        log.warning("purge: kept %s on %s (marked TO_DELETE; the other copies count fewer than "
                    "archive.min_copies = %d)", p.sop_uid, p.store_id, self.copies.min_copies)
        return True

    def purge(self, p: Placement, *, verify: bool = True) -> bool:
        """Delete one TO_DELETE copy; False (nothing deleted) unless the other copies count ``min_copies``.

        A copy refused for that reason is verified and put back to OK when it verifies
        (it is one of the copies the minimum needs). ``verify=False``: the caller has
        just verified the other copies, the ledger's OK is trusted.

        Audited ("DICOM Instances Accessed", action U: a copy is deleted, the
        instance is not); raises AuditUnavailable before deleting when the
        trail refuses service.
        """
        return self._purge(p, verify) == "purged"

    def _purge(self, p: Placement, verify: bool) -> str:
        """``purged``, ``kept`` (put back to OK: needed for the minimum) or ``refused`` (nothing changed)."""
        if self.copies_left(p, verify=verify) < self.copies.min_copies:
            return "kept" if self._keep(p) else "refused"
        accessor = self.tiers.get(p.tier)
        if accessor is None:
            return "refused"
        inst = self.index.get_instance(p.sop_uid)
        with self.audit.operation(INSTANCES_ACCESSED, "U", self.actor,
                                  patient_ids=[inst.attrs.get("PatientID", "")] if inst else [],
                                  study_uids=[inst.study_uid] if inst else [],
                                  details={"change": "copy purged", "sop_uid": p.sop_uid, "version": p.version,
                                           "tier": p.tier.value, "store": p.store_id, "bytes": p.stored_size}):
            accessor.store(p.store_id).delete(p.blob_key)
            if self.index.delete_placement(p):
                return "purged"
            self._deleted_under(p)
            return "refused"

    def _deleted_under(self, p: Placement) -> None:
        """The blob of ``p`` is gone but its row moved on meanwhile (a concurrent purge kept it):
        a row still naming that blob is marked MISSING, so nothing counts it and the repairer rebuilds it."""
        for row in self.index.placements(p.sop_uid, p.version):
            if row.store_id == p.store_id and row.blob_key == p.blob_key and row.state is not PlacementState.MISSING:
                if self.index.transition(row, PlacementState.MISSING, verified_at=time.time()):
                    log.warning("purge: %s on %s was kept by a concurrent purge after its blob was deleted; "
                                "marked MISSING for the repairer", p.sop_uid, p.store_id)

    def run_once(self, limit: int | None = None, dry_run: bool = False) -> JobReport:
        """Purge at most ``limit`` TO_DELETE copies of this site."""
        report = JobReport(self.name, dry_run=dry_run)
        retiring = (p for p in self.index.iter_placements(states=[PlacementState.TO_DELETE])
                    if site_of(p.store_id) == self.site)
        for p in islice(retiring, limit):
            report.examined += 1
            if dry_run:
                report.details.append({"sop_uid": p.sop_uid, "store": p.store_id, "bytes": p.stored_size})
                continue
            try:
                outcome = self._purge(p, verify=True)
                if outcome == "purged":
                    report.done += 1
                    report.bytes += p.stored_size
                elif outcome == "kept":
                    report.details.append({"sop_uid": p.sop_uid, "store": p.store_id,
                                           "kept": f"archive.min_copies = {self.copies.min_copies}"})
                else:
                    report.findings += 1
            except VnaError as exc:
                log.error("purge of %s on %s failed: %s", p.sop_uid, p.store_id, exc)
                report.failures += 1
        return report


class Migrator:
    """The lifecycle job: moves due studies to the cold tier (see module docstring)."""

    name = "lifecycle"

    def __init__(
        self,
        index: Index,
        hot: TierAccessor,
        cold: TierAccessor,
        retrieve: RetrieveService,
        rules: LifecycleConfig,
        cold_cfg: ColdTierConfig,
        *,
        owner: str | None = None,
        audit: AuditLog | None = None,
        telemetry: Telemetry | None = None,
        copies: CopyPolicy | None = None,
    ) -> None:
        self.index = index
        self.audit = audit if audit is not None else AuditLog.disabled()
        self.telemetry = telemetry if telemetry is not None else Telemetry.disabled()
        self.hot = hot
        self.cold = cold
        self.cold_store: BlobStore = cold.stores[0]
        self.retrieve = retrieve
        self.rules = rules
        self.cold_cfg = cold_cfg
        self.owner = owner or f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.copies = copies if copies is not None else CopyPolicy()
        self.purger = Purger(index, {Tier.HOT: hot, Tier.COLD: cold}, audit=self.audit, copies=self.copies)
        self.site = self.purger.site
        self._encode_workers = cold_cfg.encode_workers or os.cpu_count() or 1
        self._encode_pool = _encode_pool(self._encode_workers) if self._encode_workers > 1 else None
        self._claim_pool = _claim_pool() if self._encode_pool is not None else None

    # -- selection -----------------------------------------------------------
    def due(self, now: float | None = None, held: list[StudySummary] | None = None) -> Iterator[StudySummary]:
        """Studies the rules select now, in queue order (oldest first); ``held`` collects those due but under
        legal hold.

        Reads this site's lifecycle queue up to the cutoff (every basis's age is at least the queue key), not
        every study: an entry whose study has no hot copy here left is removed, one too recent is moved to
        its basis time; the others (rules exclude it, legal hold) stay."""
        now = time.time() if now is None else now
        queue = lifecycle_queue(self.site)
        cutoff = now - self.rules.min_age_days * 86400.0
        seen: set[str] = set()
        after: QueueEntry | None = None
        while True:
            seen_at = time.time()
            page = self.index.queued(queue, upto=cutoff, after=after, limit=_QUEUE_PAGE)
            for entry in page:
                after = entry
                if entry.study_uid in seen:  # another entry of a study this pass has handled
                    self.index.requeue(entry, None, seen_at=seen_at)
                    continue
                seen.add(entry.study_uid)
                study = self.index.study_summary(entry.study_uid)
                decision = evaluate(study, self.rules, now) if study is not None else None
                if study is None or decision is None:
                    self.index.requeue(entry, None, seen_at=seen_at)
                elif study.held:
                    if (held is not None and evaluate(replace(study, held=False), self.rules, now).migrate
                            and self._has_hot(study.study_uid)):
                        held.append(study)
                elif decision.reason == "too recent":
                    when = self._basis_time(study)
                    if when is not None and when > entry.due:
                        self.index.requeue(entry, when, seen_at=seen_at)
                elif not self._has_hot(study.study_uid):  # nothing here to move: out of the queue
                    self.index.requeue(entry, None, seen_at=seen_at)
                elif decision.migrate:
                    yield study
            if len(page) < _QUEUE_PAGE:
                return

    def _basis_time(self, study: StudySummary) -> float | None:
        """The time the study's age counts from under ``lifecycle.age_basis`` (None: no usable StudyDate)."""
        if self.rules.age_basis == "study_date":
            return study_date_epoch(study.study_date)
        if self.rules.age_basis == "last_access":
            return max(study.last_access or 0.0, study.last_received)
        return study.last_received

    def _has_hot(self, study_uid: str) -> bool:
        """True if some instance of the study still has a hot copy here that a run would move or retire."""
        return any(self._hot_work(inst) for inst in self.index.study_instances(study_uid))

    def _hot_work(self, inst: InstanceRecord) -> bool:
        """A hot copy here to migrate, or to retire without going below ``archive.min_copies``."""
        rows = [p for p in self.index.placements(inst.sop_uid, inst.version) if site_of(p.store_id) == self.site]
        hot = [p for p in rows if p.tier is Tier.HOT and p.state is not PlacementState.PENDING]
        if not any(p.state in (PlacementState.OK, PlacementState.TO_DELETE) for p in hot):
            return False
        if not any(p.tier is Tier.COLD and p.state is PlacementState.OK for p in rows):
            return True
        counted = self.copies.counted(rows)
        minimum = self.copies.min_copies
        return any(p.state is not PlacementState.OK or counted - self.copies.weight(p.store_id) >= minimum
                   for p in hot)

    def _hot_here(self, inst: InstanceRecord) -> bool:
        """True if this site holds a hot copy (OK or being retired) of the instance: ours to migrate."""
        return any(p.tier is Tier.HOT and p.state in (PlacementState.OK, PlacementState.TO_DELETE)
                   and site_of(p.store_id) == self.site for p in self.index.placements(inst.sop_uid, inst.version))

    def plan(self, limit: int | None = None, held: list[StudySummary] | None = None) -> list[StudyPlan]:
        """What a run would move (no change); ``held`` collects the due studies a legal hold keeps."""
        out = []
        for study in self.due(held=held):
            out.append(self.plan_one(study.study_uid))
            if limit is not None and len(out) >= limit:
                break
        return out

    @property
    def hot_copies_kept(self) -> int:
        """Hot copies a migration keeps per instance for ``archive.min_copies`` (every hot replica holding one)."""
        return self.copies.hot_copies_kept(self.cold_store.store_id, [s.store_id for s in self.hot.stores])

    # -- run -------------------------------------------------------------------
    def run_once(self, limit: int | None = None, dry_run: bool = False,
                 progress: Progress = NO_PROGRESS) -> JobReport:
        """Migrate at most ``limit`` due studies, then purge what interrupted runs left TO_DELETE.

        A run that stops at ``limit`` counts the due studies it left, up to a bound.
        """
        with self.telemetry.job(self.name) as run:
            report = self._migrate_due(limit, dry_run, progress)
            purge = self.purger.run_once(limit=None, dry_run=dry_run)
            report.findings += purge.findings
            report.failures += purge.failures
            report.bytes += purge.bytes if not dry_run else 0
            run.report = report
        return report

    def _migrate_due(self, limit: int | None, dry_run: bool, progress: Progress) -> JobReport:
        report = JobReport(self.name, dry_run=dry_run, limit_setting="lifecycle.batch_limit")
        due = self.due()
        progress.begin("migrating studies", limit, "studies")
        # a study's bundles are written (read, encode, put) while the previous study's are
        # verified and claimed, and its hot copies retired, on the claim thread
        claiming: _Claim | None = None
        try:
            for study in due:
                if limit is not None and report.examined >= limit:
                    left, capped = count_left(due, max(limit, _LEFT_STUDIES))
                    report.stopped_at_limit(left + 1, capped)
                    break
                progress.advance()
                report.examined += 1
                if dry_run:
                    plan = self.plan_one(study.study_uid)
                    report.details.append({"study": plan.study_uid, "instances": plan.instances,
                                           "bytes": plan.hot_bytes})
                    report.bytes += plan.hot_bytes
                    continue
                lease = f"lifecycle:{study.study_uid}"
                if not self.index.acquire_lease(lease, self.owner, self.rules.lease_seconds):
                    log.info("study %s is leased by another worker (or one that died: retried when it expires)",
                             study.study_uid)
                    report.details.append({"study": study.study_uid, "skipped": "leased"})
                    continue
                try:
                    finish = self._start_migration(study.study_uid)
                except VnaError as exc:
                    self._count(report, study.study_uid, None, exc)
                    self.index.release_lease(lease, self.owner)
                    continue
                except BaseException:
                    self.index.release_lease(lease, self.owner)
                    raise
                if self._claim_pool is None:  # serial: both halves here, in order
                    self._settle(_Claim(study.study_uid, lease, finish), report)
                    continue
                previous, claiming = claiming, _Claim(study.study_uid, lease, self._claim_pool.submit(finish).result)
                self._settle(previous, report)
        finally:
            self._settle(claiming, report)
        return report

    def _settle(self, claim: _Claim | None, report: JobReport) -> None:
        """Wait for (or run) the second half of a study's migration, count it, release its lease."""
        if claim is None:
            return
        try:
            try:
                freed = claim.result()
            except VnaError as exc:
                self._count(report, claim.study_uid, None, exc)
            else:
                self._count(report, claim.study_uid, freed, None)
        finally:
            self.index.release_lease(claim.lease, self.owner)

    def _count(self, report: JobReport, study_uid: str, freed: int | None, exc: VnaError | None) -> None:
        if exc is not None:
            log.error("migration of study %s failed (will be retried): %s", study_uid, exc)
            report.failures += 1
            self.telemetry.lifecycle_studies.add(1, {"outcome": "failed"})
        else:
            report.done += 1
            report.bytes += freed or 0
            self.telemetry.lifecycle_studies.add(1, {"outcome": "migrated"})

    def _audited_migrate(self, study_uid: str) -> int:
        """:meth:`migrate_study` as one audited change ("DICOM Instances Accessed", action U)."""
        return self._start_migration(study_uid)()

    def _start_migration(self, study_uid: str) -> Callable[[], int]:
        """The first half of an audited :meth:`migrate_study` (the study's bundles written); returns
        the second half (verify, claim, retire, then the audit record), which returns the hot bytes freed."""
        instances = self.index.study_instances(study_uid)
        with ExitStack() as stack:
            rec = stack.enter_context(self.audit.operation(
                INSTANCES_ACCESSED, "U", Actor.process("vna-lifecycle"), study_uids=[study_uid],
                patient_ids={i.attrs.get("PatientID", "") for i in instances},
                details={"change": "migrated to cold tier", "instances": len(instances),
                         "store": self.cold_store.store_id}))
            written = self._write_study(study_uid)
            audited = stack.pop_all()

        def finish() -> int:
            with audited:
                freed = self._claim_study(written)
                rec.details["hot_bytes_freed"] = freed
                return freed

        return finish

    def plan_one(self, study_uid: str) -> StudyPlan:
        instances = self.index.study_instances(study_uid)
        return StudyPlan(study_uid, len(instances), sum(i.content_size for i in instances), self.hot_copies_kept)

    def migrate_study(self, study_uid: str) -> int:
        """Move one study (the caller holds its lease). Returns hot bytes freed."""
        return self._claim_study(self._write_study(study_uid))

    def _write_study(self, study_uid: str) -> _Written | None:
        """First half of :meth:`migrate_study`: each bundle's PENDING rows recorded, the bundle put.

        None for a study under legal hold. A bundle that cannot be written stops the study; those
        written before it are claimed by :meth:`_claim_study`, which then raises its error.
        """
        if self.index.is_held(study_uid):
            return None
        groups: dict[str, list[InstanceRecord]] = defaultdict(list)
        for inst in self.index.study_instances(study_uid):
            if not self._hot_here(inst) and not self._cold_ok(inst):
                continue  # held only at another site: that site migrates it
            groups[study_uid if self.cold_cfg.bundle_by == "study" else inst.series_uid].append(inst)
        written = _Written(study_uid)
        try:
            for group_uid, instances in sorted(groups.items()):
                todo = [i for i in instances if not self._cold_ok(i)]
                if todo:
                    if not self.index.acquire_lease(f"lifecycle:{study_uid}", self.owner, self.rules.lease_seconds):
                        raise StateConflict(f"lost the lease of study {study_uid}")
                    written.bundles.append(self._write_bundle(study_uid, group_uid, todo))
        except VnaError as exc:
            if not written.bundles:
                raise
            written.error = exc
        return written

    def _claim_study(self, written: _Written | None) -> int:
        """Second half of :meth:`migrate_study`: every frame verified and claimed, hot copies retired."""
        if written is None:
            return 0
        if written.bundles and not self.index.acquire_lease(f"lifecycle:{written.study_uid}", self.owner,
                                                            self.rules.lease_seconds):
            raise StateConflict(f"lost the lease of study {written.study_uid}")  # its bundles stay unclaimed
        retired: set[str] = set()
        freed = sum(self._claim_bundle(bundle, retired) for bundle in written.bundles)
        if written.error is not None:
            raise written.error
        # instances this run did not migrate (their cold copy is from an earlier run)
        for inst in self.index.study_instances(written.study_uid):
            if inst.sop_uid not in retired:
                freed += self._retire_hot(inst, verified_now=False)
        return freed

    def _cold_ok(self, inst: InstanceRecord) -> bool:
        return any(p.tier is Tier.COLD and p.state is PlacementState.OK and site_of(p.store_id) == self.site
                   for p in self.index.placements(inst.sop_uid, inst.version))

    def _pending_rows(self, instances: list[InstanceRecord], key: str, now: float) -> list[Placement]:
        """Record (or restart under ``key``) the PENDING cold placements of the group.

        A bundle left by an interrupted run is deleted only once no placement
        refers to it any more: the run may have marked some of its frames OK
        before it died, and those copies (and their retired hot siblings)
        depend on it.
        """
        rows = []
        fresh = []
        abandoned: set[str] = set()
        for inst in instances:
            current = {p.store_id: p for p in self.index.placements(inst.sop_uid, inst.version)}
            row = Placement(
                sop_uid=inst.sop_uid, version=inst.version, tier=Tier.COLD, store_id=self.cold_store.store_id,
                blob_key=key, codec="pending", content_sha256=inst.content_sha256, content_size=inst.content_size,
                stored_sha256="", stored_size=0, state=PlacementState.PENDING, created_at=now)
            old = current.get(self.cold_store.store_id)
            if old is None:
                fresh.append(row)
            else:
                # a previous run died after recording its intent: restart under the new key
                if not self.index.replace_placement(old, row):
                    raise StateConflict(f"cold placement of {inst.sop_uid} changed concurrently")
                if old.blob_key != key:
                    abandoned.add(old.blob_key)
            rows.append(row)
        if fresh:
            self.index.add_placements(fresh)
        if abandoned:  # (a scan of the cold ledger, only after an interrupted run)
            in_use = {p.blob_key for p in self.index.iter_placements(tier=Tier.COLD, store_id=self.cold_store.store_id)
                      if p.blob_key in abandoned}
            for old_key in sorted(abandoned - in_use):
                self._delete_quietly(old_key)
        return rows

    def _delete_quietly(self, key: str) -> None:
        try:
            self.cold_store.delete(key)
        except StorageError as exc:
            log.warning("could not delete abandoned bundle %s: %s", key, exc)

    def _map(self, fn: Callable[[_T], _R], items: list[_T]) -> Iterator[_R]:
        """``fn`` over ``items``, results in order: on the encode pool when there is one.

        Every call's heavy part (file reads, hashing, the codec) releases the GIL, so
        the pool keeps every core busy while the caller consumes results in order.
        """
        if self._encode_pool is None:
            return map(fn, items)
        return self._encode_pool.map(fn, items)

    def _read_encode(self, writer: BundleWriter, inst: InstanceRecord) -> EncodedFrame:
        """Read one verified hot copy and encode it (a pool task)."""
        with self.retrieve.open_verified(inst.sop_uid, local_only=True) as verified:
            content = verified.path.read_bytes()
        if len(content) != inst.content_size:
            raise IntegrityError(f"hot copy of {inst.sop_uid} changed after it was verified")
        # the digest open_verified checked: the read-back of the bundle proves the frame restores it
        return writer.encode_frame(content, content_sha256=inst.content_sha256)

    def _write_bundle(self, study_uid: str, group_uid: str, instances: list[InstanceRecord]) -> _Bundle:
        """Record the group's PENDING cold rows, then encode its instances into one bundle and put it."""
        now = time.time()
        key = f"{study_uid}/{group_uid}.{uuid.uuid4().hex[:12]}.bundle"
        pending = self._pending_rows(instances, key, now)
        writer = BundleWriter(self.cold_cfg.zstd_level, codec=self.cold_cfg.codec)
        # read, hash and encode on every core; frames are added in order (the bundle holds them until the put)
        for inst, encoded in zip(instances, self._map(partial(self._read_encode, writer), instances)):
            writer.add_frame(inst.sop_uid, inst.version, encoded)
        entries, data = writer.finish()
        self.cold_store.put(key, [data] if isinstance(data, bytes) else data)
        log.info("bundle %s: %d instances of study %s on %s", key, len(entries), study_uid, self.cold_store.store_id)
        return _Bundle(key, pending, entries, instances)

    def _claim_bundle(self, bundle: _Bundle, retired: set[str]) -> int:
        """Read back every frame of a written bundle; claim each that verifies (cold row OK) and retire
        that instance's hot copies at once (adding it to ``retired``). The hot bytes freed."""
        by_uid = {e.sop_uid: e for e in bundle.entries}
        by_inst = {i.sop_uid: i for i in bundle.instances}
        verified_at = time.time()
        freed = 0
        # read back and decode on every core; the index writes and purges here overlap the decodes
        checks = self._map(partial(self._verify_frame, bundle.key), [by_uid[row.sop_uid] for row in bundle.pending])
        for row, _ in zip(bundle.pending, checks):
            entry = by_uid[row.sop_uid]
            done = replace(row, codec=entry.codec, stored_sha256=entry.stored_sha256, stored_size=entry.length,
                           offset=entry.offset, length=entry.length, state=PlacementState.OK, verified_at=verified_at)
            if not self.index.replace_placement(row, done):
                raise StateConflict(f"cold placement of {row.sop_uid} changed during migration")
            freed += self._retire_hot(by_inst[row.sop_uid], verified_now=True)
            retired.add(row.sop_uid)
        return freed

    def _verify_frame(self, key: str, entry: BundleEntry) -> None:
        """Read ``entry``'s frame back from the bundle and check both digests (a pool task)."""
        frame = b"".join(self.cold_store.open(key, entry.offset, entry.length))
        decode_frame(frame, entry)  # raises IntegrityError on any mismatch

    def _hot_rows(self, inst: InstanceRecord) -> list[Placement]:
        """This site's hot copies of the instance, in the order they are retired (last replica first)."""
        order = {s.store_id: i for i, s in enumerate(self.hot.stores)}
        rows = [p for p in self.index.placements(inst.sop_uid, inst.version)
                if p.tier is Tier.HOT and site_of(p.store_id) == self.site]
        return sorted(rows, key=lambda p: order.get(p.store_id, len(order)), reverse=True)

    def _retire_hot(self, inst: InstanceRecord, *, verified_now: bool) -> int:
        """Hot copies -> TO_DELETE (refused by the index without another OK copy), then purge.

        Copies already TO_DELETE go first (the purge keeps one the minimum needs), then
        damaged ones, then OK ones: a copy is retired only while the copies left count
        ``archive.min_copies`` (a damaged copy the minimum needs stays for the repairer
        to rebuild). The purge re-verifies the other copies it counts, unless this run
        just wrote and verified the cold one and that one copy is the minimum.
        """
        if not self._cold_ok(inst):
            return 0
        freed = 0
        for p in self._hot_rows(inst):
            if p.state is PlacementState.TO_DELETE:
                freed += self._retire(p, verified_now)
        for states in ((PlacementState.MISSING, PlacementState.CORRUPT), (PlacementState.OK,)):
            for p in self._hot_rows(inst):
                if p.state in states and self.purger.copies_left(p, verify=False) >= self.copies.min_copies:
                    freed += self._retire(p, verified_now)
        return freed

    def _retire(self, p: Placement, verified_now: bool) -> int:
        """Mark one hot copy TO_DELETE (if it is not yet) and purge it; the hot bytes freed."""
        if p.state in (PlacementState.OK, PlacementState.MISSING, PlacementState.CORRUPT):
            if not self.index.transition(p, PlacementState.TO_DELETE):
                return 0
            p = replace(p, state=PlacementState.TO_DELETE)
        if p.state is not PlacementState.TO_DELETE:
            return 0
        try:
            # only the cold copy was just verified: with a minimum above one the siblings counted are read too
            verify = not verified_now or self.copies.min_copies > 1
            return p.stored_size if self.purger.purge(p, verify=verify) else 0
        except BlobNotFound:
            return 0
