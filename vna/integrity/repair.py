"""Repairer: rebuilds damaged copies and re-replicates (Swift's replicator). Detection is the scrubber's.

For each ``MISSING``/``CORRUPT`` placement (any tier, oldest-verified first):
find a sibling copy of the same instance version (``OK`` ones in tier order
cache, hot, cold; then ``TO_DELETE`` ones still on disk), read it verifying
every byte into a spool file, write a new copy to the damaged copy's store
under a **new** key (with that tier's codec; never reusing a key), read the new
copy back verifying it, then ``replace_placement(damaged -> new OK)``. If that
compare-and-set loses (someone else moved the row), the new blob is deleted.
If no sibling verifies, the instance is logged at ERROR as
:class:`~vna.errors.LastVerifiedCopyLost`, counted as a failure, and nothing
is touched.

Re-replication: every instance version that has hot copies (none of them being
retired) and no row on some hot store gets one: a ``PENDING`` row is recorded
first, then the blob is written and verified, then the row becomes ``OK``.
A crash leaves a ``PENDING`` row naming the key, never an unrecorded blob; a
hot ``PENDING`` row older than ``stale_pending_seconds`` is redone (its blob,
never acknowledged, is deleted first and the copy is written under a new key).

A sibling that fails verification while being read as a source is marked
``CORRUPT``/``MISSING`` (compare-and-set) and a corrupt blob is quarantined,
exactly as the retrieve path does: what a reader proves is recorded.

Federation: the index is shared by every site. A repairer repairs and
re-replicates only its own site's placements (the site of the stores it was
given) and never marks another site's. With ``sites``, a verified copy at
another site (fetched over gRPC, checked against the recorded digest) is a
valid source when no local sibling verifies.
"""

from __future__ import annotations

import logging
import os
import posixpath
import tempfile
import time
import uuid
from collections import defaultdict
from itertools import islice
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

from vna.checksum import HashingIterator
from vna.domain import Placement, PlacementState, Tier, site_of
from vna.errors import (BlobExists, BlobNotFound, ConfigError, IntegrityError, LastVerifiedCopyLost, NotFound,
                        StateConflict, StorageError, StorageUnavailable)
from vna.index.base import Index
from vna.jobs import JobReport
from vna.storage.accessor import TierAccessor, iter_file, site_of_tiers
from vna.storage.base import BlobStore

if TYPE_CHECKING:
    from vna.federation.sites import Sites

__all__ = ["Repairer", "new_blob_key", "TIER_ORDER"]

log = logging.getLogger(__name__)

#: The order copies are preferred in as sources (and by retrieve).
TIER_ORDER = {Tier.CACHE: 0, Tier.HOT: 1, Tier.COLD: 2}
_DAMAGED = (PlacementState.MISSING, PlacementState.CORRUPT)
_RELOCATED = "relocated"


def new_blob_key(ref_key: str, sop_uid: str, version: int, codec: str, *, relocated: bool = False) -> str:
    """A fresh key next to ``ref_key`` (or under ``relocated/`` when that directory cannot take writes)."""
    directory = posixpath.dirname(ref_key)
    if directory == _RELOCATED or directory.startswith(_RELOCATED + "/"):
        directory = directory[len(_RELOCATED):].lstrip("/")
    if relocated:
        directory = posixpath.join(_RELOCATED, directory) if directory else _RELOCATED
    ext = ".dcm" if codec == "identity" else ".dcm." + "".join(c if c.isalnum() or c in "._-" else "-" for c in codec)
    name = f"{sop_uid}.v{version}.{uuid.uuid4().hex[:12]}{ext}"
    return posixpath.join(directory, name) if directory else name


@dataclass(frozen=True)
class _Source:
    """A verified local copy of one instance version's content."""

    path: Path
    placement: Placement


class Repairer:
    """The repair + re-replication job. See the module docstring for the contract."""

    name = "integrity.repair"

    def __init__(
        self,
        index: Index,
        tiers: Mapping[Tier, TierAccessor],
        spool_dir: Path,
        *,
        stale_pending_seconds: float = 3600.0,
        rereplicate: bool = True,
        clock: Callable[[], float] = time.time,
        sites: Sites | None = None,
    ) -> None:
        self.index = index
        self.tiers = dict(tiers)
        self.site = site_of_tiers(self.tiers)
        self.sites = sites
        self.spool_dir = Path(spool_dir)
        self.stale_pending_seconds = stale_pending_seconds
        self.rereplicate = rereplicate
        self._clock = clock

    # -- the job -------------------------------------------------------------
    def run_once(self, limit: int | None = None, dry_run: bool = False) -> JobReport:
        """Repair at most ``limit`` damaged or missing copies and report.

        ``findings``: damaged copies still damaged (every one, in a dry run);
        ``failures``: copies that could not be rebuilt (LastVerifiedCopyLost,
        a store refusing writes).
        """
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        report = JobReport(job=self.name, dry_run=dry_run)
        lost: set[tuple[str, int]] = set()
        damaged = (p for p in self.index.iter_placements(states=list(_DAMAGED)) if self._ours(p))
        for p in islice(damaged, limit):
            report.examined += 1
            self._repair(p, report, dry_run, lost)
        if self.rereplicate and (limit is None or report.examined < limit):
            budget = None if limit is None else limit - report.examined
            self._rereplicate(report, dry_run, lost, budget)
        log.info("%s", report.summary())
        return report

    def _ours(self, p: Placement) -> bool:
        """True for a placement on one of this site's stores."""
        return site_of(p.store_id) == self.site

    # -- repair of one damaged copy ----------------------------------------------
    def _repair(self, p: Placement, report: JobReport, dry_run: bool, lost: set[tuple[str, int]]) -> None:
        detail: dict[str, Any] = {"sop_uid": p.sop_uid, "version": p.version, "tier": p.tier.value,
                                  "store": p.store_id, "state": p.state.value, "key": p.blob_key}
        report.details.append(detail)
        target = self._target(p.tier, p.store_id)
        if isinstance(target, str):
            report.failures += 1
            detail["outcome"] = "failed"
            detail["error"] = target
            return
        accessor, store = target
        rows = self.index.placements(p.sop_uid, p.version)
        current = next((r for r in rows if r.store_id == p.store_id), None)
        if current is None or current.blob_key != p.blob_key or current.state not in _DAMAGED:
            detail["outcome"] = "skipped"
            detail["reason"] = "changed concurrently"
            return
        if any(r.tier is p.tier and r.state is PlacementState.TO_DELETE and self._ours(r) for r in rows):
            detail["outcome"] = "skipped"
            detail["reason"] = f"the {p.tier.value} copies of this instance are being retired"
            return
        siblings = [r for r in rows if r.store_id != p.store_id]
        with self._verified_source(siblings, mark=not dry_run) as source:
            if source is None:
                self._lost(p.sop_uid, p.version, p.store_id, report, detail, lost)
                return
            detail["source"] = source.placement.store_id
            if source.placement.content_sha256 != p.content_sha256 and p.content_sha256:
                report.failures += 1
                detail["outcome"] = "failed"
                detail["error"] = "the copies disagree about the content digest"
                log.error("%s: copies of %s v%d disagree about the content digest; not repaired", self.name,
                          p.sop_uid, p.version)
                return
            if dry_run:
                report.findings += 1
                detail["outcome"] = "would repair"
                return
            try:
                new = self._write_copy(accessor, store, current, source, relocate=True)
            except (StorageError, IntegrityError) as exc:
                report.failures += 1
                detail["outcome"] = "failed"
                detail["error"] = str(exc)
                log.error("%s: cannot rebuild the copy of %s v%d on %s: %s", self.name, p.sop_uid, p.version,
                          p.store_id, exc)
                return
        if not self._claim(current, new, store, report, detail, "repaired"):
            return
        log.info("%s: rebuilt the %s copy of %s v%d on %s from %s as %s", self.name, p.state.value, p.sop_uid,
                 p.version, p.store_id, source.placement.store_id, new.blob_key)

    def _lost(self, sop_uid: str, version: int, store_id: str, report: JobReport, detail: dict[str, Any],
              lost: set[tuple[str, int]]) -> None:
        err = LastVerifiedCopyLost(f"no verified copy of instance {sop_uid} version {version} is left")
        detail["outcome"] = "unrecoverable"
        detail["error"] = type(err).__name__
        report.failures += 1
        if (sop_uid, version) not in lost:
            lost.add((sop_uid, version))
            log.error("%s: %s: %s (copy on %s left untouched)", self.name, type(err).__name__, err, store_id)

    # -- re-replication ---------------------------------------------------------
    def _rereplicate(self, report: JobReport, dry_run: bool, lost: set[tuple[str, int]], budget: int | None) -> None:
        hot = self.tiers.get(Tier.HOT)
        if hot is None:
            return
        store_ids = [s.store_id for s in hot.stores]
        groups: dict[tuple[str, int], dict[str, Placement]] = defaultdict(dict)
        for r in self.index.iter_placements(tier=Tier.HOT):
            if self._ours(r):  # another site's instances are its own business (or a DR copy's)
                groups[(r.sop_uid, r.version)][r.store_id] = r
        stale_before = self._clock() - self.stale_pending_seconds
        for (sop_uid, version), have in groups.items():
            if any(r.state is PlacementState.TO_DELETE for r in have.values()):
                continue  # migrated to cold: its hot copies are going away on purpose
            if len(have) < len(store_ids) and any(
                    r.tier is Tier.COLD and r.state is PlacementState.OK and self._ours(r)
                    for r in self.index.placements(sop_uid, version)):
                continue  # migrated to cold: the lifecycle keeps only the hot copies archive.min_copies needs
            for sid in store_ids:
                row = have.get(sid)
                if row is not None and not (row.state is PlacementState.PENDING and row.created_at < stale_before):
                    continue
                if budget is not None and budget <= 0:
                    return
                if budget is not None:
                    budget -= 1
                report.examined += 1
                self._replicate(sop_uid, version, sid, row, next(iter(have.values())).blob_key, report, dry_run,
                                lost)

    def _replicate(self, sop_uid: str, version: int, store_id: str, stale: Placement | None, ref_key: str,
                   report: JobReport, dry_run: bool, lost: set[tuple[str, int]]) -> None:
        detail: dict[str, Any] = {"sop_uid": sop_uid, "version": version, "tier": Tier.HOT.value,
                                  "store": store_id, "state": "PENDING" if stale else "ABSENT"}
        report.details.append(detail)
        target = self._target(Tier.HOT, store_id)
        if isinstance(target, str):
            report.failures += 1
            detail["outcome"] = "failed"
            detail["error"] = target
            return
        accessor, store = target
        if (sop_uid, version) in lost:
            report.failures += 1
            detail["outcome"] = "unrecoverable"
            detail["error"] = LastVerifiedCopyLost.__name__
            return
        rows = self.index.placements(sop_uid, version)
        siblings = [r for r in rows if r.store_id != store_id]
        with self._verified_source(siblings, mark=not dry_run) as source:
            if source is None:
                self._lost(sop_uid, version, store_id, report, detail, lost)
                return
            detail["source"] = source.placement.store_id
            if dry_run:
                report.findings += 1
                detail["outcome"] = "would replicate"
                return
            src = source.placement
            key = new_blob_key(ref_key, sop_uid, version, accessor.codec.name)
            now = self._clock()
            if stale is None:
                pending = Placement(
                    sop_uid=sop_uid, version=version, tier=Tier.HOT, store_id=store_id, blob_key=key,
                    codec=accessor.codec.name, content_sha256=src.content_sha256, content_size=src.content_size,
                    stored_sha256="", stored_size=0, state=PlacementState.PENDING, created_at=now)
                try:
                    self.index.add_placements([pending])
                except StateConflict:
                    detail["outcome"] = "skipped"
                    detail["reason"] = "a copy was recorded concurrently"
                    return
            else:
                self._delete_quietly(store, stale.blob_key)  # never acknowledged: ours to remove
                pending = replace(stale, blob_key=key, created_at=now)
                if not self.index.replace_placement(stale, pending):
                    detail["outcome"] = "skipped"
                    detail["reason"] = "changed concurrently"
                    return
            try:
                new = self._write_copy(accessor, store, pending, source, relocate=False)
            except (StorageError, IntegrityError) as exc:
                report.failures += 1
                detail["outcome"] = "failed"
                detail["error"] = str(exc)
                log.error("%s: cannot add a copy of %s v%d on %s: %s", self.name, sop_uid, version, store_id, exc)
                self._withdraw(pending)
                return
        if not self._claim(pending, new, store, report, detail, "replicated"):
            return
        log.info("%s: added the missing copy of %s v%d on %s from %s", self.name, sop_uid, version, store_id,
                 src.store_id)

    def _withdraw(self, pending: Placement) -> None:
        """Remove our PENDING row after a failed write (else it goes stale and is redone later)."""
        retiring = replace(pending, state=PlacementState.TO_DELETE)
        if self.index.replace_placement(pending, retiring):
            self.index.delete_placement(retiring)

    # -- helpers -----------------------------------------------------------------
    def _target(self, tier: Tier, store_id: str) -> tuple[TierAccessor, BlobStore] | str:
        accessor = self.tiers.get(tier)
        if accessor is None:
            return f"tier {tier.value} is not configured"
        try:
            return accessor, accessor.store(store_id)
        except KeyError:
            return f"store {store_id} is not configured"

    @contextmanager
    def _verified_source(self, siblings: list[Placement], *, mark: bool) -> Iterator[_Source | None]:
        """A spooled, verified copy of the content from the first sibling that verifies (or None).

        This site's OK copies first, then its retiring ones, then OK copies at
        other sites (fetched over gRPC when ``sites`` is given; never marked).
        """
        def order(r: Placement) -> tuple[int, str]:
            return TIER_ORDER[r.tier], r.store_id

        ok = sorted((r for r in siblings if r.state is PlacementState.OK and self._ours(r)), key=order)
        retiring = sorted((r for r in siblings if r.state is PlacementState.TO_DELETE and self._ours(r)), key=order)
        remote = sorted((r for r in siblings if r.state is PlacementState.OK and not self._ours(r)), key=order)
        for candidate, may_mark in [*((r, mark) for r in ok), *((r, False) for r in retiring),
                                    *((r, False) for r in remote)]:
            path = self._read_verified(candidate, may_mark)
            if path is not None:
                try:
                    yield _Source(path, candidate)
                finally:
                    path.unlink(missing_ok=True)
                return
        yield None

    def _read_remote(self, p: Placement) -> Path | None:
        """The content of another site's copy, fetched and verified against the placement's digest."""
        client = self.sites.get(site_of(p.store_id)) if self.sites is not None else None
        if client is None or not client.healthy():
            return None
        fd, name = tempfile.mkstemp(dir=self.spool_dir, suffix=".part")
        os.close(fd)
        path = Path(name)
        try:
            client.fetch(p.sop_uid, path, content_sha256=p.content_sha256, size=p.content_size)
            return path
        except (StorageError, NotFound, IntegrityError, ConfigError) as exc:
            path.unlink(missing_ok=True)
            log.warning("%s: copy of %s v%d at site %s unusable as a source: %s", self.name, p.sop_uid, p.version,
                        site_of(p.store_id), exc)
            return None

    def _read_verified(self, p: Placement, mark: bool) -> Path | None:
        if not self._ours(p):
            return self._read_remote(p)
        target = self._target(p.tier, p.store_id)
        if isinstance(target, str):
            return None
        accessor, store = target
        fd, name = tempfile.mkstemp(dir=self.spool_dir, suffix=".part")
        path = Path(name)
        try:
            with os.fdopen(fd, "wb") as fh:
                accessor.read_verified(p, fh.write)
            return path
        except IntegrityError as exc:
            path.unlink(missing_ok=True)
            log.error("%s: source copy of %s v%d on %s is corrupt: %s", self.name, p.sop_uid, p.version,
                      p.store_id, exc)
            if mark and self.index.transition(p, PlacementState.CORRUPT, verified_at=self._clock()) \
                    and p.offset is None:
                try:
                    store.quarantine(p.blob_key)
                except StorageError as qexc:
                    log.error("%s: could not quarantine %s:%s: %s", self.name, p.store_id, p.blob_key, qexc)
        except BlobNotFound as exc:
            path.unlink(missing_ok=True)
            log.error("%s: source copy of %s v%d on %s is missing: %s", self.name, p.sop_uid, p.version,
                      p.store_id, exc)
            if mark:
                self.index.transition(p, PlacementState.MISSING, verified_at=self._clock())
        except (StorageError, ConfigError, OSError) as exc:
            path.unlink(missing_ok=True)
            log.warning("%s: source copy of %s v%d on %s unreadable: %s", self.name, p.sop_uid, p.version,
                        p.store_id, exc)
        return None

    def _write_copy(self, accessor: TierAccessor, store: BlobStore, old: Placement, source: _Source,
                    *, relocate: bool) -> Placement:
        """Write ``source`` to ``store`` under a new key, read it back verified; return its OK placement.

        With ``relocate``, a store that refuses the usual directory (e.g. an
        unreadable or broken directory) gets the copy under ``relocated/``.
        Raises StorageError/IntegrityError, leaving no blob behind.
        """
        src = source.placement
        keys: Iterator[str]
        if old.state is PlacementState.PENDING:
            keys = iter([old.blob_key])  # the key already recorded in our PENDING row
        else:
            keys = iter([new_blob_key(old.blob_key, old.sop_uid, old.version, accessor.codec.name)])
        if relocate:
            keys = iter([*keys, new_blob_key(old.blob_key, old.sop_uid, old.version, accessor.codec.name,
                                             relocated=True)])
        error: StorageError = StorageUnavailable("no key tried")
        for key in keys:
            content = HashingIterator(iter_file(str(source.path)))
            stored = HashingIterator(accessor.codec.encode(content))
            try:
                store.put(key, stored)
            except (StorageUnavailable, BlobExists) as exc:
                error = exc
                continue
            now = self._clock()
            new = Placement(
                sop_uid=old.sop_uid, version=old.version, tier=accessor.tier, store_id=store.store_id,
                blob_key=key, codec=accessor.codec.name, content_sha256=src.content_sha256,
                content_size=src.content_size, stored_sha256=stored.hexdigest(), stored_size=stored.size,
                state=PlacementState.OK, created_at=now, verified_at=now)
            try:
                if content.hexdigest() != src.content_sha256 or content.size != src.content_size:
                    raise IntegrityError(f"spooled source of {old.sop_uid} changed while being copied")
                accessor.read_verified(new, lambda _data: None)
            except (IntegrityError, StorageError):
                self._delete_quietly(store, key)
                raise
            return new
        raise error

    def _claim(self, old: Placement, new: Placement, store: BlobStore, report: JobReport,
               detail: dict[str, Any], outcome: str) -> bool:
        """Swap the row to the verified new copy (CAS); if the row moved meanwhile, delete the new copy."""
        if not self.index.replace_placement(old, new):
            self._delete_quietly(store, new.blob_key)
            detail["outcome"] = "skipped"
            detail["reason"] = "changed concurrently; the new copy was removed"
            return False
        report.done += 1
        report.bytes += new.stored_size
        detail["outcome"] = outcome
        detail["new_key"] = new.blob_key
        return True

    def _delete_quietly(self, store: BlobStore, key: str) -> None:
        try:
            store.delete(key)
        except StorageError as exc:
            log.error("%s: could not remove %s:%s: %s", self.name, store.store_id, key, exc)
