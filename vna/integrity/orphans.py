"""OrphanFinder: blobs no placement names, and OK placements whose blob is gone.

Reports by default. With ``action="quarantine"`` or ``"delete"`` (the CLI asks
for ``--yes``) it moves aside or removes orphan blobs, and only those:

- a blob younger than ``grace_seconds`` (by its store's modification time) is
  never an orphan: ingest writes blobs before it registers them, repair before
  it records them. A blob whose store reports no time is never one either;
- temp and quarantine areas (keys whose first segment starts with ``.``) are
  never listed;
- the set of known keys is read before the listing and read again before any
  action, so a blob recorded meanwhile is left alone.

Placements with no blob are reported for ``OK`` rows only (a ``TO_DELETE``
row is being purged blob-first, damaged rows are known to lack one); marking
them is the scrubber's job, so nothing is changed for them here.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Mapping

from vna.domain import PlacementState, Tier
from vna.errors import BlobNotFound, StorageError
from vna.index.base import Index
from vna.jobs import NO_PROGRESS, JobReport, Progress, count_left
from vna.storage.base import BlobStore
from vna.storage.accessor import TierAccessor

__all__ = ["ACTIONS", "OrphanFinder"]

log = logging.getLogger(__name__)

ACTIONS = ("report", "quarantine", "delete")


class OrphanFinder:
    """The orphans job. ``findings``: orphan blobs + OK placements without a blob."""

    name = "integrity.orphans"

    def __init__(
        self,
        index: Index,
        tiers: Mapping[Tier, TierAccessor],
        *,
        grace_seconds: float = 86400.0,
        action: str = "report",
        clock: Callable[[], float] = time.time,
    ) -> None:
        if action not in ACTIONS:
            raise ValueError(f"action must be one of {ACTIONS}")
        self.index = index
        self.tiers = dict(tiers)
        self.grace_seconds = grace_seconds
        self.action = action
        self._clock = clock
        self._young = 0  # per run: unrecorded blobs within the grace period
        self._left = 0  # per run: items left at the limit
        self._left_capped = False  # ... and that count is a lower bound

    def _known(self, store_id: str) -> set[str]:
        return {p.blob_key for p in self.index.iter_placements(store_id=store_id)}

    def run_once(self, limit: int | None = None, dry_run: bool = False,
                 progress: Progress = NO_PROGRESS) -> JobReport:
        """Examine at most ``limit`` blobs and placements per store; act on orphans unless ``dry_run``.

        Unrecorded blobs within the grace period are counted in a note (they are
        not findings); a store whose examination stopped at ``limit`` adds what
        it left (unexamined keys counted up to a cap).
        """
        report = JobReport(job=self.name, dry_run=dry_run, limit_setting="integrity.batch_limit")
        self._young = 0
        self._left, self._left_capped = 0, False
        for tier, accessor in sorted(self.tiers.items(), key=lambda kv: kv[0].value):
            for store in accessor.stores:
                try:
                    self._store(tier, store, report, limit, dry_run, progress)
                except StorageError as exc:
                    report.failures += 1
                    report.details.append({"tier": tier.value, "store": store.store_id, "kind": "store",
                                           "error": str(exc)})
                    log.error("%s: cannot examine store %s: %s", self.name, store.store_id, exc)
        if self._young:
            report.notes.append(f"{self._young} blob{'s' if self._young != 1 else ''} younger than the grace period "
                                f"({self.grace_seconds:g} s, integrity.orphan_grace_seconds or --grace) "
                                f"not reported")
        if self._left:
            report.stopped_at_limit(self._left, self._left_capped)
        return report

    def _store(self, tier: Tier, store: BlobStore, report: JobReport, limit: int | None, dry_run: bool,
               progress: Progress) -> None:
        known_placements = list(self.index.iter_placements(store_id=store.store_id))
        known = {p.blob_key for p in known_placements}
        examined = 0
        # placements whose blob is gone
        seen: dict[str, bool] = {}
        ok = [p for p in known_placements if p.state is PlacementState.OK]
        if limit is not None and len(ok) > limit:
            self._left += len(ok) - limit
            ok = ok[:limit]
        progress.begin(f"{store.store_id}: copies with no blob", len(ok), "copies")
        for p in ok:
            progress.advance()
            examined += 1
            report.examined += 1
            if p.blob_key not in seen:
                try:
                    store.stat(p.blob_key)
                    seen[p.blob_key] = True
                except BlobNotFound:
                    seen[p.blob_key] = False
            if not seen[p.blob_key]:
                report.findings += 1
                report.details.append({"tier": tier.value, "store": store.store_id, "kind": "placement-without-blob",
                                       "sop_uid": p.sop_uid, "version": p.version, "key": p.blob_key})
                log.warning("%s: placement of %s v%d on %s has no blob %s", self.name, p.sop_uid, p.version,
                            store.store_id, p.blob_key)
        # blobs no placement names
        now = self._clock()
        orphans: list[tuple[str, int, float]] = []
        young = 0
        examined = 0
        unrecorded = (key for key in store.iter_keys() if not key.split("/", 1)[0].startswith(".") and key not in known)
        progress.begin(f"{store.store_id}: blobs no copy names", limit, "blobs")
        for key in unrecorded:
            if limit is not None and examined >= limit:
                left, capped = count_left(unrecorded)
                self._left += left + 1
                self._left_capped = self._left_capped or capped
                break
            progress.advance()
            examined += 1
            report.examined += 1
            try:
                st = store.stat(key)
            except BlobNotFound:
                continue  # went away while listing
            if st.modified is None or now - st.modified < self.grace_seconds:
                young += 1
                continue
            orphans.append((key, st.size, now - st.modified))
        if young:
            self._young += young
            log.debug("%s: %d unrecorded blobs on %s are within the grace period", self.name, young, store.store_id)
        if not orphans:
            return
        act = self.action != "report" and not dry_run
        recheck = self._known(store.store_id) if act else set()
        for key, size, age in orphans:
            detail: dict[str, Any] = {"tier": tier.value, "store": store.store_id, "kind": "orphan-blob",
                                      "key": key, "size": size, "age_s": round(age)}
            report.details.append(detail)
            if key in recheck:
                detail["kind"] = "recorded-meanwhile"
                continue
            report.findings += 1
            if not act:
                detail["action"] = f"would {self.action}" if self.action != "report" else "none"
                continue
            try:
                if self.action == "quarantine":
                    detail["action"] = f"quarantined as {store.quarantine(key)}"
                else:
                    store.delete(key)
                    detail["action"] = "deleted"
                report.done += 1
                report.bytes += size
                log.warning("%s: orphan blob %s:%s %s", self.name, store.store_id, key, detail["action"])
            except BlobNotFound:
                detail["action"] = "gone meanwhile"
            except StorageError as exc:
                report.failures += 1
                detail["action"] = f"failed: {exc}"
                log.error("%s: cannot %s orphan %s:%s: %s", self.name, self.action, store.store_id, key, exc)
