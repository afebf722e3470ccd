"""RetrieveService: find the instances to send and hand out verified copies.

Copies are tried in tier order (cache, hot, cold). Each is verified against its
recorded digests before it is handed out; a copy that fails is marked CORRUPT
(or MISSING) in the index, quarantined, and the next copy is tried.

Federation: only this site's copies are read (and ever marked). When none
verifies and another site holds an OK copy, the instance is fetched from that
site's gRPC front-end (``local_only``: the peer serves its own copies, never
proxies on), verified against the index's content digest and size, and with
``cache_remote`` kept as a local hot copy recorded in the index.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

from vna.audit import INSTANCES_TRANSFERRED, Actor, AuditLog
from vna.checksum import sha256_file
from vna.domain import LOCAL_SITE, Placement, PlacementState, QueryLevel, Tier, site_of
from vna.errors import (BlobNotFound, IntegrityError, LastVerifiedCopyLost, NotFound, SiteUnavailable, StorageError,
                        InvalidInput, VnaError)
from vna.index.base import Index
from vna.index.query import Condition, audit_patient_id, matches_primary_identity
from vna.storage.accessor import TierAccessor
from vna.storage.base import LocalPathStore
from vna.telemetry import Telemetry

if TYPE_CHECKING:
    from vna.federation.sites import Sites

__all__ = ["VerifiedInstance", "InstanceRef", "Transfer", "RetrieveService"]

log = logging.getLogger(__name__)

#: the keys a retrieve must hold one of (IssuerOfPatientID alone would select a whole domain)
_RETRIEVE_UNIQUE_KEYS = frozenset({"PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"})

_TIER_ORDER = {Tier.CACHE: 0, Tier.HOT: 1, Tier.COLD: 2}
#: seconds within which a study read again is not written to the index again (:meth:`RetrieveService.record_access`)
ACCESS_RESOLUTION = 60.0
_ACCESS_MEMORY = 100_000


@dataclass(frozen=True)
class InstanceRef:
    """An instance selected for retrieval."""

    sop_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    study_uid: str = ""
    patient_id: str = ""  # as the audit trail names the patient (vna.index.query.audit_patient_id)


@dataclass(frozen=True)
class VerifiedInstance:
    """A local file whose bytes were just verified against the index digests."""

    path: Path
    sop_uid: str
    content_sha256: str
    size: int


@dataclass
class Transfer:
    """One retrieve operation in progress: the front-end counts what it handed out."""

    refs: list[InstanceRef]
    completed: int = 0
    failed: int = 0
    bytes: int = 0

    def sent(self, ok: bool, size: int = 0) -> None:
        """Count one sub-operation's result."""
        if ok:
            self.completed += 1
            self.bytes += size
        else:
            self.failed += 1


class RetrieveService:
    """Reads instances back, verifying every byte."""

    def __init__(self, index: Index, tiers: dict[Tier, TierAccessor], spool_dir: Path, *,
                 audit: AuditLog | None = None, telemetry: Telemetry | None = None,
                 site: str = LOCAL_SITE, sites: Sites | None = None, cache_remote: bool = False) -> None:
        self.index = index
        self.tiers = tiers
        self.site = site
        self.sites = sites
        self.cache_remote = cache_remote
        self.spool_dir = spool_dir
        self.audit = audit if audit is not None else AuditLog.disabled()
        self.telemetry = telemetry if telemetry is not None else Telemetry.disabled()
        spool_dir.mkdir(parents=True, exist_ok=True)
        self._accessed: dict[str, float] = {}   # study UID -> the access time this process last wrote
        self._access_lock = threading.Lock()

    def select(self, level: QueryLevel, conditions: Sequence[Condition]) -> list[InstanceRef]:
        """Instances under the matching entities, in a stable order.

        ``conditions`` must hold a unique key (PatientID or a UID; InvalidInput otherwise). PatientID and
        IssuerOfPatientID match the study's primary identity only: a retrieve never follows Other Patient
        IDs, and with an issuer it sends that patient's instances only (docs/patient-identity.md)."""
        if not any(c.keyword in _RETRIEVE_UNIQUE_KEYS for c in conditions):
            raise InvalidInput("a retrieve needs at least one unique key")
        with self.telemetry.stage("retrieve.select"):
            rows = self.index.find(QueryLevel.IMAGE, conditions)
            refs = [InstanceRef(r["SOPInstanceUID"], r["SOPClassUID"], r["TransferSyntaxUID"], r["StudyInstanceUID"],
                                audit_patient_id(r.get("PatientID", ""), r.get("IssuerOfPatientID")))
                    for r in rows if matches_primary_identity(conditions, r)]
        return sorted(refs, key=lambda r: r.sop_uid)

    @contextmanager
    def transfer(self, refs: list[InstanceRef], actor: Actor, *, op: str,
                 destination: Actor | None = None) -> Iterator[Transfer]:
        """Audit and count one retrieve of ``refs`` by ``actor`` (to ``destination``, else to the actor).

        Raises AuditUnavailable on entry, before anything is sent, when the
        audit trail refuses service. Records the study access (lifecycle
        ``last_access``) and, at the end, one "DICOM Instances Transferred"
        record (action R) with the counts the block reported.
        """
        with self.audit.operation(INSTANCES_TRANSFERRED, "R", actor, patient_ids=[r.patient_id for r in refs],
                                  study_uids=[r.study_uid for r in refs]) as rec:
            self.record_access(refs)
            xfer = Transfer(refs)
            try:
                yield xfer
            finally:
                rec.details.update({"op": op, "instances": len(refs), "completed": xfer.completed,
                                    "failed": xfer.failed, "bytes": xfer.bytes})
                if destination is not None:
                    rec.details["destination"] = destination.as_dict()
                if xfer.failed:
                    rec.outcome = 4 if xfer.completed else 8
                self.telemetry.retrieve_instances.add(xfer.completed, {"op": op})
                self.telemetry.retrieve_bytes.add(xfer.bytes, {"op": op})

    def record_access(self, refs: Sequence[InstanceRef]) -> None:
        """Note a read of each study the refs belong to (lifecycle ``age_basis = "last_access"``).

        A study read again within ``ACCESS_RESOLUTION`` seconds of the access this process last wrote is not
        written again (a viewer reads a study in many requests; lifecycle ages are days): ``last_access`` is
        exact to that resolution. The memory of written accesses is bounded (``_ACCESS_MEMORY`` studies)."""
        now = time.time()
        with self._access_lock:
            due = sorted(uid for uid in {r.study_uid for r in refs if r.study_uid}
                         if now - self._accessed.get(uid, -ACCESS_RESOLUTION) >= ACCESS_RESOLUTION)
        for study_uid in due:
            self.index.record_access(study_uid, now)
            with self._access_lock:
                if len(self._accessed) >= _ACCESS_MEMORY:
                    self._accessed.clear()
                self._accessed[study_uid] = now

    @contextmanager
    def open_verified(self, sop_uid: str, *, local_only: bool = False) -> Iterator[VerifiedInstance]:
        """Yield a verified local copy of the current version of ``sop_uid``.

        This site's copies first; then (unless ``local_only``) another site's,
        fetched over gRPC. Raises NotFound if the instance is unknown (or,
        with ``local_only``, not held at this site),
        SiteUnavailable if the only copies are at sites that cannot be reached
        now, and LastVerifiedCopyLost if no recorded copy verifies.
        """
        ok = [p for p in self.index.placements(sop_uid) if p.state is PlacementState.OK]
        if not ok and self.index.get_instance(sop_uid) is None:
            raise NotFound(f"instance {sop_uid} is not in the archive")
        placements = sorted((p for p in ok if site_of(p.store_id) == self.site),
                            key=lambda p: (_TIER_ORDER[p.tier], p.store_id))
        remote = sorted({site_of(p.store_id) for p in ok} - {self.site})
        for p in placements:
            with self.telemetry.stage("retrieve.verify", {"vna.tier": p.tier.value}):
                found = self._verify(p)
            if found is None:
                continue
            path, is_temp = found
            try:
                yield VerifiedInstance(path, sop_uid, p.content_sha256, p.content_size)
            finally:
                if is_temp:
                    path.unlink(missing_ok=True)
            return
        if remote and not local_only and self.sites:
            with self._open_remote(sop_uid, remote) as inst:
                yield inst
            return
        if remote and local_only and not placements:
            raise NotFound(f"no copy of instance {sop_uid} is held at this site (it is at {', '.join(remote)})")
        if remote and not local_only:
            raise SiteUnavailable(f"instance {sop_uid} is held only at site(s) {', '.join(remote)}, "
                                  "which this site does not reach ([[federation.site]])")
        raise LastVerifiedCopyLost(f"no copy of instance {sop_uid} verifies")

    @contextmanager
    def _open_remote(self, sop_uid: str, remote: list[str]) -> Iterator[VerifiedInstance]:
        """Fetch the current version from the first reachable site holding it, verified against the index."""
        assert self.sites is not None
        inst = self.index.get_instance(sop_uid)
        if inst is None:
            raise NotFound(f"instance {sop_uid} is not in the archive")
        errors: list[str] = []
        for site in remote:
            client = self.sites.get(site)
            if client is None:
                errors.append(f"{site}: not a configured [[federation.site]]")
                continue
            if not client.healthy():
                errors.append(f"{site}: unreachable")
                continue
            fd, name = tempfile.mkstemp(dir=self.spool_dir, suffix=".dcm")
            os.close(fd)
            path = Path(name)
            try:
                with self.telemetry.stage("retrieve.remote", {"vna.site": site}):
                    client.fetch(sop_uid, path, content_sha256=inst.content_sha256, size=inst.content_size)
            except (SiteUnavailable, NotFound, IntegrityError, StorageError) as exc:
                path.unlink(missing_ok=True)
                log.warning("cross-site fetch of %s from site %s failed: %s", sop_uid, site, exc)
                errors.append(f"{site}: {exc}")
                continue
            log.info("instance %s fetched from site %s (%d bytes, verified)", sop_uid, site, inst.content_size)
            if self.cache_remote:
                self._cache(inst.sop_uid, path)
            try:
                yield VerifiedInstance(path, sop_uid, inst.content_sha256, inst.content_size)
            finally:
                path.unlink(missing_ok=True)
            return
        raise SiteUnavailable(f"instance {sop_uid} is held only at other sites, none served it: {'; '.join(errors)}")

    def _cache(self, sop_uid: str, path: Path) -> None:
        """Keep a verified remote copy on this site's hot tier (recorded); a failure only logs."""
        from vna.federation.copy import add_local_copy

        inst = self.index.get_instance(sop_uid)
        hot = self.tiers.get(Tier.HOT)
        if inst is None or hot is None:
            return
        try:
            add_local_copy(self.index, hot, inst, path)
        except VnaError as exc:
            log.warning("could not keep a local copy of %s: %s", sop_uid, exc)

    def local_copies_many(self, sop_uids: Sequence[str]) -> dict[str, list[tuple[Placement, Path]]]:
        """By SOP Instance UID, this site's OK copies of the current version of each instance that are whole
        plain files on a local store, in the order :meth:`open_verified` tries them: what a sender may verify
        itself (then report a failing one with :meth:`mark_bad`). One index read for all of them."""
        stores: dict[tuple[Tier, str], LocalPathStore | None] = {}

        def local(p: Placement) -> LocalPathStore | None:
            key = (p.tier, p.store_id)
            if key not in stores:
                accessor = self.tiers.get(p.tier)
                try:
                    store = accessor.store(p.store_id) if accessor is not None else None
                except KeyError:
                    store = None
                stores[key] = store if isinstance(store, LocalPathStore) else None
            return stores[key]

        out: dict[str, list[tuple[Placement, Path]]] = {}
        for uid, placements in self.index.placements_many(sop_uids).items():
            ok = [p for p in placements if p.state is PlacementState.OK and site_of(p.store_id) == self.site
                  and p.codec == "identity" and p.offset is None]
            copies = out[uid] = []
            for p in sorted(ok, key=lambda p: (_TIER_ORDER[p.tier], p.store_id)):
                if (store := local(p)) is not None:
                    copies.append((p, store.local_path(p.blob_key)))
        return out

    def mark_bad(self, p: Placement, fault: str, why: str) -> None:
        """Record a copy that failed its verification, as :meth:`open_verified` does: ``fault`` "corrupt"
        (marked CORRUPT and quarantined), "missing" (marked MISSING) or "unreadable" (logged only)."""
        if fault == "corrupt":
            self._mark(p, PlacementState.CORRUPT, why)
            accessor = self.tiers.get(p.tier)
            try:
                if accessor is not None:
                    accessor.store(p.store_id).quarantine(p.blob_key)
            except (KeyError, StorageError) as qexc:
                log.error("could not quarantine %s:%s: %s", p.store_id, p.blob_key, qexc)
        elif fault == "missing":
            self._mark(p, PlacementState.MISSING, why)
        else:
            log.warning("copy of %s on %s unreadable: %s", p.sop_uid, p.store_id, why)

    def _verify(self, p: Placement) -> tuple[Path, bool] | None:
        """A verified local file for the placement (and whether it is a temp copy), or None."""
        accessor = self.tiers.get(p.tier)
        if accessor is None:
            return None
        try:
            store = accessor.store(p.store_id)
        except KeyError:
            return None
        tmp: Path | None = None
        try:
            if p.codec == "identity" and p.offset is None and isinstance(store, LocalPathStore):
                path = store.local_path(p.blob_key)
                try:
                    sha, size = sha256_file(path)
                except FileNotFoundError:
                    raise BlobNotFound(f"{p.store_id}:{p.blob_key} not found") from None
                except OSError as exc:
                    raise StorageError(f"{p.store_id}:{p.blob_key}: {exc.strerror}") from exc
                if sha != p.content_sha256 or size != p.content_size:
                    raise IntegrityError(f"{p.store_id}:{p.blob_key} content digest mismatch")
                return path, False
            fd, name = tempfile.mkstemp(dir=self.spool_dir, suffix=".dcm")
            tmp = Path(name)
            with os.fdopen(fd, "wb") as fh:
                accessor.read_verified(p, fh.write)
            return tmp, True
        except IntegrityError as exc:
            self.mark_bad(p, "corrupt", str(exc))
        except BlobNotFound as exc:
            self.mark_bad(p, "missing", str(exc))
        except StorageError as exc:
            self.mark_bad(p, "unreadable", str(exc))
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        return None

    def _mark(self, p: Placement, state: PlacementState, why: str) -> None:
        log.error("placement %s on %s is %s: %s", p.sop_uid, p.store_id, state.value, why)
        self.index.transition(p, state)
