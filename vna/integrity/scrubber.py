"""Scrubber: detection only (Swift's auditor). It never fixes and never deletes.

``run_once`` walks the ``OK`` placements of every tier, never-verified first,
then oldest ``verified_at`` (the order of ``Index.iter_placements``), checks
each at a :class:`VerifyLevel` and records the facts it proves:

- the copy checks out: ``transition(p, OK, verified_at=now)`` (a CAS touch);
- the blob is absent: ``OK -> MISSING``;
- the bytes are wrong (size or digest): ``OK -> CORRUPT``, then the blob is
  quarantined (moved aside, kept for forensics). A frame inside a shared cold
  bundle is marked but the bundle is not moved: its other frames are good;
- the blob cannot be read (I/O or permission error) while the store answers
  for other blobs: ``OK -> MISSING`` with reason ``unreadable``. If the store
  answers for nothing (a replica that is down), nothing is marked and the run
  reports failures: an outage is not data that is wrong.

Federation: the index is shared by every site; a scrubber examines only the
placements of its own site (the site of the stores it was given), never
another site's.

Every mark is compare-and-set on (state, blob key) and also sets
``verified_at`` (the time of the check whose outcome the state records), so a
placement that changed between the read and the mark is left alone. Only
``OK`` placements are examined: ``PENDING`` copies are being written,
``TO_DELETE`` ones are being retired, damaged ones belong to the repairer.
Reads are paced by :class:`RateLimiter` (objects/s and bytes/s) so a scrub can
run beside clinical traffic.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, Callable, Mapping, cast

from vna.domain import Placement, PlacementState, Tier, site_of
from vna.errors import BlobNotFound, ConfigError, IntegrityError, StorageError, StorageUnavailable
from vna.index.base import Index
from vna.jobs import NO_PROGRESS, JobReport, Progress, count_left
from vna.storage.accessor import TierAccessor, site_of_tiers
from vna.storage.base import BlobStore, LocalPathStore

__all__ = ["VerifyLevel", "Outcome", "CheckResult", "RateLimiter", "ScrubReport", "Scrubber"]

log = logging.getLogger(__name__)

_PROBE_KEYS = 200  # keys listed at most when probing whether a store answers at all
_CHUNK = 1 << 20


class VerifyLevel(str, enum.Enum):
    """How hard a check looks, cheapest first; each level includes the ones before it."""

    EXISTS = "exists"     # the blob is there (stat)
    SIZE = "size"         # ... with the recorded stored size
    STORED = "stored"     # ... and its bytes at rest hash to ``stored_sha256``
    CONTENT = "content"   # ... and decode to bytes hashing to ``content_sha256``


class Outcome(str, enum.Enum):
    """What one check found."""

    VERIFIED = "VERIFIED"
    MISSING = "MISSING"
    CORRUPT = "CORRUPT"
    UNREADABLE = "UNREADABLE"   # an I/O error: proves nothing until the store is known to answer
    UNCHECKED = "UNCHECKED"     # no configured store / codec to check it with


@dataclass(frozen=True)
class CheckResult:
    """The typed result of checking one placement (nothing is changed by a check)."""

    outcome: Outcome
    reason: str = ""
    bytes_read: int = 0


class RateLimiter:
    """Paces units (objects, bytes) to at most ``rate`` per second; 0 means unlimited.

    ``take(n)`` returns at once for the first call and otherwise sleeps until
    the units taken before have "drained" at ``rate``. Not thread-safe.
    """

    def __init__(self, rate: float, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.rate = float(rate)
        self._clock = clock
        self._sleep = sleep
        self._next = 0.0

    def take(self, n: float = 1.0) -> None:
        """Account for ``n`` units, sleeping first if the previous ones are not drained yet."""
        if self.rate <= 0 or n <= 0:
            return
        now = self._clock()
        if self._next > now:
            self._sleep(self._next - now)
            now = self._next
        self._next = max(self._next, now) + n / self.rate


@dataclass
class ScrubReport(JobReport):
    """A scrub run: the JobReport plus the level, the elapsed time and per-store counts."""

    level: str = VerifyLevel.CONTENT.value
    elapsed: float = 0.0
    stores: dict[str, dict[str, int]] = field(default_factory=dict)

    def counts(self) -> str:
        rate = self.bytes / self.elapsed / 1e6 if self.elapsed > 0 else 0.0
        return f"{super().counts()}, level {self.level}, {self.elapsed:.2f} s, {rate:.1f} MB/s"

    def as_dict(self) -> dict[str, Any]:
        return super().as_dict() | {"level": self.level, "elapsed": round(self.elapsed, 4), "stores": self.stores}


def _detail(p: Placement, outcome: str, reason: str) -> dict[str, Any]:
    return {"sop_uid": p.sop_uid, "version": p.version, "tier": p.tier.value, "store": p.store_id,
            "key": p.blob_key, "outcome": outcome, "reason": reason}


class Scrubber:
    """The scrub job (detection only). See the module docstring for the contract."""

    name = "integrity.scrub"

    def __init__(
        self,
        index: Index,
        tiers: Mapping[Tier, TierAccessor],
        *,
        level: VerifyLevel | str = VerifyLevel.CONTENT,
        objects_per_second: float = 0.0,
        bytes_per_second: float = 0.0,
        tier: Tier | None = None,
        store_id: str | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.index = index
        self.tiers = dict(tiers)
        self.site = site_of_tiers(self.tiers)
        self.level = VerifyLevel(level)
        self.tier = tier
        self.store_id = store_id
        self._clock = clock
        self._objects = RateLimiter(objects_per_second, sleep=sleep)
        self._bytes = RateLimiter(bytes_per_second, sleep=sleep)
        self._buf = bytearray(_CHUNK)
        self._local: dict[str, bool] = {}  # store id -> has local files (a Protocol isinstance is slow)

    # -- one check ---------------------------------------------------------
    def _store(self, p: Placement) -> tuple[TierAccessor, BlobStore] | str:
        accessor = self.tiers.get(p.tier)
        if accessor is None:
            return f"tier {p.tier.value} is not configured"
        try:
            return accessor, accessor.store(p.store_id)
        except KeyError:
            return f"store {p.store_id} is not configured"

    def check(self, p: Placement, level: VerifyLevel | None = None) -> CheckResult:
        """Check one placement at ``level`` (default: the job's). Changes nothing."""
        level = self.level if level is None else level
        found = self._store(p)
        if isinstance(found, str):
            return CheckResult(Outcome.UNCHECKED, found)
        accessor, store = found
        try:
            if level in (VerifyLevel.EXISTS, VerifyLevel.SIZE):
                return self._check_stat(p, store, level)
            single_pass = (p.codec == "identity" and p.stored_sha256 == p.content_sha256
                           and p.stored_size == p.content_size)
            if level is VerifyLevel.STORED or single_pass:
                # identity codec: the bytes at rest are the content, one hash proves both digests
                return self._check_stored(p, store)
            return self._check_content(p, accessor)
        except BlobNotFound as exc:
            return CheckResult(Outcome.MISSING, str(exc))
        except IntegrityError as exc:
            return CheckResult(Outcome.CORRUPT, str(exc))
        except StorageError as exc:
            return CheckResult(Outcome.UNREADABLE, str(exc))
        except ConfigError as exc:  # e.g. a codec this build cannot decode
            return CheckResult(Outcome.UNCHECKED, str(exc))

    @staticmethod
    def _check_stat(p: Placement, store: BlobStore, level: VerifyLevel) -> CheckResult:
        st = store.stat(p.blob_key)
        if level is VerifyLevel.SIZE:
            if p.offset is None:
                if st.size != p.stored_size:
                    return CheckResult(Outcome.CORRUPT, f"size {st.size}, expected {p.stored_size}")
            else:
                end = p.offset + (p.length if p.length is not None else p.stored_size)
                if st.size < end:
                    return CheckResult(Outcome.CORRUPT, f"bundle size {st.size} ends before the frame ({end})")
        return CheckResult(Outcome.VERIFIED)

    def _check_stored(self, p: Placement, store: BlobStore) -> CheckResult:
        local = self._local.get(store.store_id)
        if local is None:
            local = self._local[store.store_id] = isinstance(store, LocalPathStore)
        if p.offset is None and local:
            h, size = self._hash_file(cast(LocalPathStore, store), p)
        else:
            h, size = hashlib.sha256(), 0
            for chunk in store.open(p.blob_key, p.offset or 0, p.length):
                h.update(chunk)
                size += len(chunk)
                self._bytes.take(len(chunk))
        if size != p.stored_size:
            return CheckResult(Outcome.CORRUPT, f"size {size}, expected {p.stored_size}", size)
        if h.hexdigest() != p.stored_sha256:
            return CheckResult(Outcome.CORRUPT, "stored digest mismatch", size)
        return CheckResult(Outcome.VERIFIED, "", size)

    def _hash_file(self, store: LocalPathStore, p: Placement) -> tuple[Any, int]:
        """SHA-256 and size of a local blob file, read into one reused buffer (no per-chunk allocation)."""
        h = hashlib.sha256()
        size = 0
        view = memoryview(self._buf)
        try:
            with open(store.local_path(p.blob_key), "rb", buffering=0) as fh:
                while n := fh.readinto(view):
                    h.update(view[:n])
                    size += n
                    self._bytes.take(n)
        except FileNotFoundError:
            raise BlobNotFound(f"{p.store_id}: {p.blob_key} not found") from None
        except OSError as exc:
            raise StorageUnavailable(f"{p.store_id}: cannot read {p.blob_key}: {exc.strerror}") from exc
        return h, size

    def _check_content(self, p: Placement, accessor: TierAccessor) -> CheckResult:
        def sink(data: bytes) -> None:
            self._bytes.take(len(data))

        accessor.read_verified(p, sink)
        return CheckResult(Outcome.VERIFIED, "", p.stored_size)

    # -- the job -------------------------------------------------------------
    def run_once(self, limit: int | None = None, dry_run: bool = False,
                 progress: Progress = NO_PROGRESS) -> ScrubReport:
        """Check at most ``limit`` OK placements, oldest-verified first, and record the outcomes.

        A run that stops at ``limit`` counts (up to a cap) the placements it left.
        """
        report = ScrubReport(job=self.name, dry_run=dry_run, level=self.level.value,
                             limit_setting="integrity.batch_limit")
        started = time.monotonic()
        answered: set[str] = set()
        unreadable: dict[str, list[tuple[Placement, CheckResult]]] = defaultdict(list)
        ours = (p for p in self.index.iter_placements(
            tier=self.tier, states=[PlacementState.OK], store_id=self.store_id) if site_of(p.store_id) == self.site)
        progress.begin("checking copies", limit, "copies")
        for p in islice(ours, limit):
            progress.advance()
            self._objects.take(1)
            result = self.check(p)
            report.examined += 1
            report.bytes += result.bytes_read
            counts = report.stores.setdefault(p.store_id, {})
            counts[result.outcome.value] = counts.get(result.outcome.value, 0) + 1
            if result.outcome is Outcome.VERIFIED:
                answered.add(p.store_id)
                if dry_run or self.index.transition(p, PlacementState.OK, verified_at=self._clock()):
                    report.done += 1
            elif result.outcome in (Outcome.MISSING, Outcome.CORRUPT):
                answered.add(p.store_id)
                self._record(report, p, result, dry_run)
            elif result.outcome is Outcome.UNREADABLE:
                unreadable[p.store_id].append((p, result))
            else:
                report.failures += 1
                report.details.append(_detail(p, result.outcome.value, result.reason))
                log.warning("%s: cannot check %s v%d on %s: %s", self.name, p.sop_uid, p.version,
                            p.store_id, result.reason)
        for store_id, items in unreadable.items():
            if store_id in answered or self._store_answers(items):
                for p, result in items:
                    self._record(report, p, CheckResult(Outcome.MISSING, f"unreadable: {result.reason}"), dry_run)
            else:
                report.failures += len(items)
                log.error("%s: store %s answers for nothing (%d copies unreadable); it looks down, "
                          "nothing marked: %s", self.name, store_id, len(items), items[0][1].reason)
                for p, result in items:
                    report.details.append(_detail(p, "STORE_UNAVAILABLE", result.reason))
        if limit is not None and report.examined >= limit:
            report.stopped_at_limit(*count_left(ours))
        report.elapsed = time.monotonic() - started
        return report

    def _store_answers(self, items: list[tuple[Placement, CheckResult]]) -> bool:
        """True if the store of these unreadable copies serves some other blob (so it is not down)."""
        found = self._store(items[0][0])
        if isinstance(found, str):
            return False
        _, store = found
        failing = {p.blob_key for p, _ in items}
        try:
            for n, key in enumerate(store.iter_keys()):
                if n >= _PROBE_KEYS:
                    return False
                if key in failing:
                    continue
                store.stat(key)
                return True
        except StorageError:
            return False
        return False

    def _record(self, report: ScrubReport, p: Placement, result: CheckResult, dry_run: bool) -> None:
        """Mark a proven MISSING/CORRUPT copy (CAS) and quarantine a corrupt blob it owns alone."""
        state = PlacementState.CORRUPT if result.outcome is Outcome.CORRUPT else PlacementState.MISSING
        detail = _detail(p, state.value, result.reason)
        report.details.append(detail)
        report.findings += 1
        if dry_run:
            detail["action"] = "none (dry run)"
            return
        if not self.index.transition(p, state, verified_at=self._clock()):
            now = next((r for r in self.index.placements(p.sop_uid, p.version) if r.store_id == p.store_id), None)
            if now is not None and now.blob_key == p.blob_key and now.state in (
                    PlacementState.MISSING, PlacementState.CORRUPT):
                detail["action"] = f"already recorded {now.state.value}"
            else:  # moved on (repaired, retired, purged) between our read and the mark
                report.findings -= 1
                detail["outcome"] = "CHANGED"
                detail["action"] = "not marked: the placement changed concurrently"
            return
        log.error("%s: copy of %s v%d on %s is %s: %s", self.name, p.sop_uid, p.version, p.store_id,
                  state.value, result.reason)
        detail["action"] = f"marked {state.value}"
        if state is PlacementState.CORRUPT:
            if p.offset is not None:
                detail["quarantine"] = "skipped: the blob is a shared bundle"
                return
            found = self._store(p)
            if isinstance(found, str):
                return
            try:
                detail["quarantine"] = found[1].quarantine(p.blob_key)
            except StorageError as exc:
                detail["quarantine"] = f"failed: {exc}"
                log.error("%s: could not quarantine %s:%s: %s", self.name, p.store_id, p.blob_key, exc)
