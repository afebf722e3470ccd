"""IngestService: one path for every way an instance enters the archive.

Sequence (architecture §5): hash the spooled Part 10 file -> parse the header
only -> validate UIDs -> duplicate policy -> write N hot replicas in parallel
(quorum W) -> register instance + placements in the index as one unit ->
return. Any failure before registration deletes what was written; nothing is
half-registered. Pixel data is never decoded.

Re-sends (``docs/conformance.md``, "Re-sent instances"): identity follows the
data set, not the File Meta. A known SOP Instance UID with the same content
digest is a duplicate; with another digest its data set is compared with a
verified stored copy (:mod:`vna.services.dataset_identity`), and only a real
difference is a conflict (policy reject) or a new version (policy version).
A duplicate is acknowledged only with at least W verified copies (rule 7):
damaged copies are rewritten first. A new SOP Instance UID costs nothing more.
"""

from __future__ import annotations

import logging
import os
import struct
import time
import uuid
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from pydicom import dcmread
from pydicom.charset import convert_encodings, decode_bytes, default_encoding
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.tag import BaseTag
from pydicom.dataelem import RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.uid import DeflatedExplicitVRLittleEndian

from vna.audit import INSTANCES_TRANSFERRED, Actor, AuditLog, AuditScope
from vna.checksum import sha256_file
from vna.domain import InstanceRecord, Placement, PlacementState, QueryLevel, Tier, site_of, validate_uid
from vna.errors import (DuplicateConflict, IntegrityError, InvalidDataset, LastVerifiedCopyLost, QuorumNotMet,
                        IndexUnavailable, StateConflict, StorageError)
from vna.index.base import Index
from vna.index.query import (ISSUER_ASSIGNED_KEY, LEVEL_KEYS, MAX_OTHER_IDS, OTHER_IDS_KEY, audit_patient_id,
                             encode_other_ids)
from vna.integrity.repair import new_blob_key
from vna.services.dataset_identity import same_dataset
from vna.services.part10 import scan_part10_file
from vna.storage.accessor import TierAccessor, site_of_tiers
from vna.telemetry import Telemetry, series_key

if TYPE_CHECKING:
    from vna.services.retrieve import RetrieveService
    from vna.transfer_audit import AssociationAudit

__all__ = ["IngestResult", "IngestService", "Spooled", "assign_issuer"]

log = logging.getLogger(__name__)

_ATTR_KEYS = tuple(k for lv in QueryLevel for k in LEVEL_KEYS[lv])
#: vna.ingest.instances series, by outcome
_STORED, _DUPLICATE, _FAILED = (series_key({"outcome": o}) for o in ("stored", "duplicate", "failed"))
_DAMAGED = (PlacementState.MISSING, PlacementState.CORRUPT)


@dataclass(frozen=True)
class Spooled:
    """A spool file as its writer saw it: SHA-256 and size of the bytes it wrote (hashed while
    spooling), and when receiving began and ended (``time.time_ns()``)."""

    sha256: str
    size: int
    started_ns: int
    ended_ns: int


@dataclass(frozen=True)
class IngestResult:
    """What happened to one instance. ``duplicate``: the same instance was already stored (identical
    bytes, or the same data set in other File Meta or encoding; its stored bytes are kept)."""

    sop_uid: str
    sop_class_uid: str
    study_uid: str
    version: int
    content_sha256: str
    size: int
    duplicate: bool
    missing_replicas: tuple[str, ...] = ()
    #: hot replicas rewritten from a duplicate's bytes because fewer than W verified copies were left
    restored: tuple[str, ...] = ()


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, MultiValue)):
        return "\\".join(str(v) for v in value)
    return str(value).strip(" \x00")


def _check_complete(ds: Dataset, size: int) -> None:
    """Raise InvalidDataset if a top-level value runs past the end of the file."""
    for elem in ds._dict.values():
        if not isinstance(elem, RawDataElement):
            continue
        if elem.length == 0xFFFFFFFF:
            # undefined length (encapsulated pixel data): its delimiter item must follow the value
            if elem.value is not None and elem.value_tell + len(elem.value) + 8 > size:
                raise InvalidDataset(f"dataset is truncated inside element {elem.tag}")
        elif elem.value_tell + elem.length > size:
            raise InvalidDataset(f"dataset is truncated inside element {elem.tag}")


@dataclass(frozen=True)
class _Header:
    sop_uid: str
    sop_class_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax_uid: str
    attrs: dict[str, str]


_TEXT_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UT"}
_ASCII_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "TM", "UI"}
_PN_DELIMS = {0x5C, 0x5E, 0x3D}   # \ ^ =
_TEXT_DELIMS = {0x5C}
_UID_TAGS = {
    "SOPInstanceUID": 0x00080018, "SOPClassUID": 0x00080016,
    "StudyInstanceUID": 0x0020000D, "SeriesInstanceUID": 0x0020000E,
}
_ATTR_TAGS = {kw: int(tag_for_keyword(kw) or 0) for kw in _ATTR_KEYS}
_OTHER_IDS_TAG = 0x00101002  # Other Patient IDs Sequence: when present, the scanner declines and pydicom reads it
_PATIENT_ID_TAG, _ISSUER_TAG = 0x00100020, 0x00100021
#: What the Part 10 scanner extracts (tag -> dictionary VR).
_WANTED = {tag: dictionary_VR(tag) for tag in (*_ATTR_TAGS.values(), *_UID_TAGS.values(), 0x00080005, _OTHER_IDS_TAG)}
_PARSE_ERRORS = (InvalidDicomError, ValueError, TypeError, KeyError, EOFError, OverflowError, struct.error,
                 zlib.error, LookupError, NotImplementedError)   # (pydicom: an unknown VR)


def _raw_text(elem: RawDataElement, encodings: list[str]) -> str | None:
    """A text VR's value decoded straight from its raw bytes; None if it needs pydicom's conversion."""
    if elem.VR in _TEXT_VRS and isinstance(elem.value, bytes):
        raw = elem.value
        if elem.VR == "DA":  # legacy "2020.01.01" is stored as "20200101" so every index compares alike
            return raw.decode("ascii", "replace").strip(" \x00").replace(".", "")
        if elem.VR in _ASCII_VRS:
            return raw.decode("ascii", "replace").strip(" \x00")
        return decode_bytes(raw, encodings, _PN_DELIMS if elem.VR == "PN" else _TEXT_DELIMS).strip(" \x00")
    return None


def _value(ds: Dataset, tag: int, encodings: list[str]) -> str | None:
    """The element's value as text, decoded straight from its raw bytes when possible."""
    elem = ds._dict.get(BaseTag(tag))
    if elem is None:
        return None
    if isinstance(elem, RawDataElement) and (text := _raw_text(elem, encodings)) is not None:
        return text
    return _text(ds[tag].value)


def _scanned_value(elem: RawDataElement | None, encodings: list[str]) -> str | None:
    """:func:`_value` for an element found by :func:`scan_part10` (no Dataset around it)."""
    if elem is None:
        return None
    text = _raw_text(elem, encodings)
    if text is None:
        if elem.VR == "US" and isinstance(elem.value, bytes) and len(elem.value) == 2:
            return str(int.from_bytes(elem.value, "little" if elem.is_little_endian else "big"))
        text = _text(convert_raw_data_element(elem, encoding=encodings).value)
    return text


def _charset_encodings(charset: RawDataElement | None) -> list[str]:
    """Python encodings of a scanned SpecificCharacterSet element (None: absent, the default)."""
    if charset is None:
        return convert_encodings(None)
    if isinstance(charset.value, bytes):
        return list(_encodings(charset.value, charset.VR, charset.is_implicit_VR, charset.is_little_endian))
    return convert_encodings(convert_raw_data_element(charset, encoding=default_encoding).value)


@lru_cache(maxsize=256)
def _encodings(raw: bytes, vr: str | None, implicit: bool, little: bool) -> list[str]:
    """Python encodings of a raw SpecificCharacterSet value (pydicom's conversion, once per distinct value)."""
    elem = RawDataElement(BaseTag(0x00080005), vr, len(raw), raw, 0, implicit, little)
    return convert_encodings(convert_raw_data_element(elem, encoding=default_encoding).value)


def _header(uids: dict[str, str | None], ts: str, attrs: dict[str, str]) -> _Header:
    """The parsed header, its UIDs validated (raises InvalidUID)."""
    return _Header(
        sop_uid=validate_uid(uids["SOPInstanceUID"], "SOPInstanceUID"),
        sop_class_uid=validate_uid(uids["SOPClassUID"], "SOPClassUID"),
        study_uid=validate_uid(uids["StudyInstanceUID"], "StudyInstanceUID"),
        series_uid=validate_uid(uids["SeriesInstanceUID"], "SeriesInstanceUID"),
        transfer_syntax_uid=validate_uid(ts, "TransferSyntaxUID"),
        attrs=attrs,
    )


def read_header_fast(path: Path) -> _Header | None:
    """:func:`read_header` via the Part 10 scanner; None when the scanner (or a conversion) declines.

    When it returns a header it is the one the pydicom path returns (raises
    InvalidUID like it); None means "use the pydicom path", which then
    reports any error in its own words.
    """
    try:
        scanned = scan_part10_file(path, _WANTED)
        if scanned is None:
            return None
        elems = scanned.elements
        if _OTHER_IDS_TAG in elems:
            return None  # a sequence: pydicom reads its items
        charset = elems.get(0x00080005)
        encodings = _charset_encodings(charset)
        attrs: dict[str, str] = {}
        for kw, tag in _ATTR_TAGS.items():
            text = _scanned_value(elems.get(tag), encodings)
            if text is not None:
                attrs[kw] = text
        uids = {kw: _scanned_value(elems.get(tag), encodings) for kw, tag in _UID_TAGS.items()}
        ts = _text(scanned.transfer_syntax)
    except (_PARSE_ERRORS + (OSError,)):
        return None
    return _header(uids, ts, attrs)


def read_header(path: Path) -> _Header:
    """Parse and validate a Part 10 file without reading (or decoding) its large values.

    Values over 1 KiB (pixel data above all) are skipped, not read; their
    recorded lengths are checked against the file size, so a truncated
    dataset is refused rather than stored. Text values are decoded directly
    from their raw bytes (pydicom's full conversion costs more than the rest).
    Common files are scanned by :func:`read_header_fast`; pydicom parses the rest.
    """
    fast = read_header_fast(path)
    return fast if fast is not None else read_header_pydicom(path)


def read_header_pydicom(path: Path) -> _Header:
    """:func:`read_header` by pydicom alone (the reference for :func:`read_header_fast`)."""
    try:
        size = os.path.getsize(path)
        ds = dcmread(path, defer_size=1024)
        meta = ds.file_meta
        if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
            _check_complete(ds, size)  # (a truncated deflate stream fails to inflate instead)
        ts = _text(meta.get("TransferSyntaxUID"))
        charset = ds._dict.get(BaseTag(0x00080005))
        encodings = convert_encodings(ds.SpecificCharacterSet if charset is not None else None)
        attrs: dict[str, str] = {}
        for kw, tag in _ATTR_TAGS.items():
            text = _value(ds, tag, encodings)
            if text is not None:
                attrs[kw] = text
        uids = {kw: _value(ds, tag, encodings) for kw, tag in _UID_TAGS.items()}
        others = _other_ids(ds, encodings)
        if others:
            attrs[OTHER_IDS_KEY] = others
    except _PARSE_ERRORS as exc:
        raise InvalidDataset(f"dataset cannot be parsed: {exc}") from exc
    except OSError as exc:
        raise InvalidDataset(f"dataset cannot be read: {exc}") from exc
    return _header(uids, ts, attrs)


def _other_ids(ds: Dataset, encodings: list[str]) -> str:
    """The (PatientID, IssuerOfPatientID) items of Other Patient IDs Sequence, encoded for the index.

    At most MAX_OTHER_IDS items are read (the rest are ignored and logged); items without a PatientID are skipped.
    """
    if BaseTag(_OTHER_IDS_TAG) not in ds._dict:
        return ""
    seq = ds[_OTHER_IDS_TAG].value
    if not isinstance(seq, Sequence):
        return ""
    pairs: list[tuple[str, str]] = []
    for n, item in enumerate(seq):
        if n >= MAX_OTHER_IDS:
            log.warning("Other Patient IDs Sequence has more than %d items: the rest are not indexed", MAX_OTHER_IDS)
            break
        if not isinstance(item, Dataset):
            continue
        pid = _value(item, _PATIENT_ID_TAG, encodings) or ""
        issuer = _value(item, _ISSUER_TAG, encodings) or ""
        if pid and not any(c in pid + issuer for c in "\\\t\n"):  # one value each, nothing the encoding uses
            pairs.append((pid, issuer))
    return encode_other_ids(pairs)


def assign_issuer(attrs: dict[str, str], issuer: str | None) -> dict[str, str]:
    """The catalogue attributes with ``issuer`` as the effective IssuerOfPatientID, recorded as assigned
    (``ISSUER_ASSIGNED_KEY``), when the object carries a PatientID and no issuer; else ``attrs`` unchanged."""
    if not issuer or attrs.get("IssuerOfPatientID") or not attrs.get("PatientID"):
        return attrs
    return attrs | {"IssuerOfPatientID": issuer, ISSUER_ASSIGNED_KEY: "Y"}


class IngestService:
    """Stores Part 10 files in the hot tier and registers them in the index.

    Every call is audited (one "DICOM Instances Transferred" record, action C; a DIMSE association's
    stores are listed in one record per study instead, see ``ingest_file``)
    and traced (``ingest`` > ``ingest.hash`` or ``ingest.receive``, ``ingest.parse``,
    ``ingest.write``, ``ingest.index``; ``ingest.compare`` when a re-send in other
    bytes is compared with the stored instance).
    """

    def __init__(self, index: Index, hot: TierAccessor, duplicate_policy: str = "reject", *,
                 audit: AuditLog | None = None, telemetry: Telemetry | None = None,
                 retrieve: RetrieveService | None = None, assigned_issuers: dict[str, str] | None = None) -> None:
        self.index = index
        #: calling AE title -> IssuerOfPatientID recorded for its objects that carry none (config.assigned_issuers)
        self.assigned_issuers = dict(assigned_issuers or {})
        #: reads verified copies of a stored instance to compare a re-send with (None: any other bytes conflict)
        self.retrieve = retrieve
        #: how many copies one verified copy on a store counts for (a store may declare its own redundancy)
        self.copy_weight: Callable[[str], int] = lambda _store_id: 1
        self.hot = hot
        self.site = site_of_tiers({hot.tier: hot})
        self.duplicate_policy = duplicate_policy
        self.audit = audit if audit is not None else AuditLog.disabled()
        self.telemetry = telemetry if telemetry is not None else Telemetry.disabled()

    def ingest_file(
        self,
        path: Path,
        *,
        source_ae: str = "",
        expected_sop_uid: str | None = None,
        expected_sop_class: str | None = None,
        actor: Actor | None = None,
        owned: bool = False,
        spooled: Spooled | None = None,
        transfer: AssociationAudit | None = None,
    ) -> IngestResult:
        """Store the Part 10 file at ``path`` (which the caller owns and may delete after).

        ``owned``: ``path`` is the caller's spool file, which nobody writes
        again; one replica may take it over by hard link instead of copying it.
        Never pass it for a file someone else could change in place.
        ``spooled``: the digest and size of ``path`` as its writer computed them
        (the file is then not read to hash it) and when it was received: the
        ``ingest`` span starts then, with an ``ingest.receive`` stage instead of
        ``ingest.hash``.

        Returns only once the bytes are on at least W replicas and indexed.
        A re-send of a stored instance (identical bytes, or the same data set
        in other File Meta or encoding) is a duplicate, answered only once at
        least W verified copies of the stored version exist at this site:
        fewer, and damaged or absent hot copies are first rewritten from the
        re-sent (or a verified stored) copy. Raises InvalidInput,
        DuplicateConflict, LastVerifiedCopyLost (other bytes and no verified
        stored copy to compare with, policy reject), QuorumNotMet/StorageError,
        IndexUnavailable; on any raise nothing new is registered (a rewritten
        copy of a stored version, already verified and recorded, is kept).
        Raises AuditUnavailable before anything is stored when the audit
        trail refuses service, and after storing if the record of this
        store cannot be written (the instance is then stored, unacknowledged;
        a retry is idempotent). ``actor`` defaults to the AE ``source_ae``.
        ``transfer``: the audit of the DIMSE association this store is part of; the instance is then
        journaled there (one record per association and study, :mod:`vna.transfer_audit`) instead of
        getting its own record.
        The issuer configured for ``source_ae`` (``assigned_issuers``) is recorded for an object without
        one only when the actor is that AE (a DIMSE association, a migration run): ``source_ae`` is a
        free label for gRPC, STOW-RS and CLI callers, whose objects get no assigned issuer.
        """
        who = actor if actor is not None else Actor(source_ae or "unknown", "ae")
        by_ae = who.kind == "ae" and who.id.strip() == source_ae.strip()
        issuer = self.assigned_issuers.get(source_ae.strip()) if by_ae else None
        tel = self.telemetry
        audited = (self.audit.operation(INSTANCES_TRANSFERRED, "C", who) if transfer is None
                   else transfer.instance())
        with (audited as rec,
              tel.span("ingest", start_ns=spooled.started_ns if spooled is not None else None, inner=True)):
            if spooled is not None:
                tel.stage_done("ingest.receive", spooled.started_ns, spooled.ended_ns, {"vna.bytes": spooled.size})
            try:
                result = self._ingest(path, source_ae, expected_sop_uid, expected_sop_class, rec, owned, spooled,
                                      issuer)
            except BaseException:
                tel.ingest_instances.add_key(1, _FAILED)
                raise
            rec.details.update({"version": result.version, "bytes": result.size, "duplicate": result.duplicate})
            if result.missing_replicas:
                rec.details["missing_replicas"] = list(result.missing_replicas)
            if result.restored:
                rec.details["restored_replicas"] = list(result.restored)
            tel.ingest_instances.add_key(1, _DUPLICATE if result.duplicate else _STORED)
            if not result.duplicate:
                tel.ingest_bytes.add(result.size)
            return result

    def _ingest(self, path: Path, source_ae: str, expected_sop_uid: str | None, expected_sop_class: str | None,
                rec: AuditScope, owned: bool = False, spooled: Spooled | None = None,
                issuer: str | None = None) -> IngestResult:
        if spooled is not None:
            content_sha256, size = spooled.sha256, spooled.size
        else:
            with self.telemetry.stage("ingest.hash"):
                content_sha256, size = sha256_file(path)
        with self.telemetry.stage("ingest.parse"):
            h = read_header(path)
        rec.patient_ids.append(audit_patient_id(h.attrs.get("PatientID", ""),
                                                h.attrs.get("IssuerOfPatientID") or issuer))
        rec.study_uids.append(h.study_uid)
        rec.details.update({"sop_uid": h.sop_uid, "series_uid": h.series_uid, "sop_class_uid": h.sop_class_uid})
        if expected_sop_uid is not None and h.sop_uid != expected_sop_uid.strip("\x00 "):
            raise InvalidDataset(
                f"SOPInstanceUID differs from the request: {h.sop_uid} != {expected_sop_uid}")
        if expected_sop_class is not None and h.sop_class_uid != expected_sop_class.strip("\x00 "):
            raise InvalidDataset(
                f"SOPClassUID differs from the request: {h.sop_class_uid} != {expected_sop_class}")
        for _attempt in range(5):
            existing = self.index.get_instance(h.sop_uid)
            if existing is not None and existing.content_sha256 == content_sha256:
                missing, restored = self._keep_durable(existing, path)
                return IngestResult(h.sop_uid, h.sop_class_uid, h.study_uid, existing.version,
                                    content_sha256, size, duplicate=True, missing_replicas=missing,
                                    restored=restored)
            if existing is not None:
                same = self._same_as_stored(existing, path)
                if same is not None:
                    return same
            version = 1 if existing is None else existing.version + 1
            try:
                return self._store(path, h, version, content_sha256, size, source_ae, owned, issuer)
            except StateConflict:
                log.info("concurrent store of %s version %d; re-checking", h.sop_uid, version)
                continue
        # not a duplicate (0x0111 would tell the sender it is archived): a transient failure, retry later
        raise IndexUnavailable(f"SOP Instance {h.sop_uid} is being stored concurrently; retry")

    def _same_as_stored(self, existing: InstanceRecord, path: Path) -> IngestResult | None:
        """The answer to a re-send whose bytes differ from the stored ones; None: store it as a new version.

        The data set of ``path`` is compared with a verified copy of the stored
        version (:func:`same_dataset`): the same data set in other File Meta or
        another native encoding is a duplicate (the stored bytes are kept, made
        durable like an identical re-send). Otherwise policy "reject" raises
        DuplicateConflict and "version" returns None. With no verified copy left
        nothing can be compared: "reject" raises LastVerifiedCopyLost, "version"
        returns None (a new version). Raises QuorumNotMet, SiteUnavailable.
        """
        uid = existing.sop_uid
        if self.retrieve is not None:
            try:
                with self.retrieve.open_verified(uid) as stored:
                    with self.telemetry.stage("ingest.compare"):
                        same = same_dataset(stored.path, path)
                    if same:
                        missing, restored = self._keep_durable(existing, stored.path)
                        log.info("instance %s re-sent with the same data set in other File Meta or encoding: "
                                 "a duplicate, stored bytes kept", uid)
                        return IngestResult(uid, existing.sop_class_uid, existing.study_uid, existing.version,
                                            existing.content_sha256, existing.content_size, duplicate=True,
                                            missing_replicas=missing, restored=restored)
            except LastVerifiedCopyLost as exc:
                if self.duplicate_policy == "reject":
                    raise LastVerifiedCopyLost(
                        f"stored instance has no verified copy to compare with: {uid}") from exc
                log.warning("instance %s: no verified copy of the stored version to compare with; "
                            "the re-send becomes a new version", uid)
                return None
        if self.duplicate_policy == "reject":
            raise DuplicateConflict(f"already stored with different content (data set differs): {uid}")
        return None

    def _keep_durable(self, existing: InstanceRecord, source: Path) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """Make the stored version durable at this site before a duplicate is acknowledged (rule 7).

        ``source`` holds bytes verified to be the stored content. Verified
        copies are this site's OK placements, hot and cold, each counting
        :attr:`copy_weight` copies. With none recorded
        here (another site stored it) every hot replica gets a copy; with fewer
        than W, each hot store whose copy is MISSING, CORRUPT or absent gets a
        new one (new key, read back verified, then recorded OK: blob first,
        index second). Returns (replicas that missed the write, replicas
        rewritten). Raises QuorumNotMet when fewer than W verified copies
        exist afterwards; the copies it did record are kept.
        """
        local = self._local(existing)
        if not local:
            from vna.federation.copy import add_local_copy

            try:
                placements = add_local_copy(self.index, self.hot, existing, source, prefix="")
            except StateConflict:
                local = self._local(existing)  # a concurrent store at this site recorded rows first: count them
            else:
                log.info("instance %s was stored by another site; this site keeps its own copies now",
                         existing.sop_uid)
                written = tuple(p.store_id for p in placements if p.state is PlacementState.OK)
                return tuple(p.store_id for p in placements if p.state is PlacementState.MISSING), written
        ok = self._verified(local)
        if ok >= self.hot.quorum:
            return (), ()
        return self._restore(existing, source, local, ok)

    def _local(self, existing: InstanceRecord) -> list[Placement]:
        """This site's placements of the stored version."""
        rows = self.index.placements(existing.sop_uid, existing.version)
        return [p for p in rows if site_of(p.store_id) == self.site]

    def _verified(self, placements: list[Placement]) -> int:
        """How many verified copies the OK placements count for."""
        return sum(self.copy_weight(p.store_id) for p in placements if p.state is PlacementState.OK)

    def _restore(self, existing: InstanceRecord, source: Path, local: list[Placement],
                 ok: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """Rewrite this site's damaged or absent hot copies from ``source``; see :meth:`_keep_durable`."""
        by_store = {p.store_id: p for p in local}
        hot_keys = [p.blob_key for p in local if p.tier is Tier.HOT]
        ref = hot_keys[0] if hot_keys else f"{existing.study_uid}/{existing.series_uid}/{existing.sop_uid}.dcm"
        written: list[str] = []
        failed: list[str] = []
        for store in self.hot.stores:
            row = by_store.get(store.store_id)
            if row is not None and row.state not in _DAMAGED:
                continue
            try:
                key = row.blob_key if row is not None else ref
                codec = self.hot.codec.name
                keys = (new_blob_key(key, existing.sop_uid, existing.version, codec, relocated=relocated)
                        for relocated in (False, True))   # a store refusing the usual directory: relocated/
                new = self.hot.copy_verified(
                    store, source, keys, sop_uid=existing.sop_uid, version=existing.version,
                    content_sha256=existing.content_sha256, content_size=existing.content_size, now=time.time())
            except (StorageError, IntegrityError) as exc:
                failed.append(f"{store.store_id}: {exc}")
                log.warning("instance %s: cannot rewrite the copy on %s: %s", existing.sop_uid, store.store_id, exc)
                continue
            if not self._record(row, new):
                self.hot.delete_all(new.blob_key, [store.store_id])  # the row moved on meanwhile
                continue
            written.append(store.store_id)
        have = self._verified(self._local(existing))  # the index is the truth (a concurrent re-send may have won)
        if written:
            log.info("instance %s had %d verified copies; rewrote the copies on %s from the re-sent bytes",
                     existing.sop_uid, ok, ",".join(written))
        if have < self.hot.quorum:
            raise QuorumNotMet(f"not durable: {have} of {self.hot.quorum} verified copies of {existing.sop_uid} "
                               f"({'; '.join(failed) or 'copies changed concurrently'})")
        return tuple(f.split(":", 1)[0] for f in failed), tuple(written)

    def _record(self, row: Placement | None, new: Placement) -> bool:
        """Record the new copy: a new row, or the damaged row replaced (compare-and-set). False if it lost."""
        if row is not None:
            return self.index.replace_placement(row, new)
        try:
            self.index.add_placements([new])
        except StateConflict:
            return False
        return True

    def _store(self, path: Path, h: _Header, version: int, sha: str, size: int, source_ae: str,
               owned: bool = False, issuer: str | None = None) -> IngestResult:
        key = f"{h.study_uid}/{h.series_uid}/{h.sop_uid}.v{version}.{uuid.uuid4().hex[:12]}.dcm"
        t0 = time.monotonic()
        with self.telemetry.stage("ingest.write"):
            writes = self.hot.write_file(key, path, sha, size, adopt=owned)
        now = time.time()
        placements = self.hot.placements(
            writes, sop_uid=h.sop_uid, version=version, content_sha256=sha, content_size=size, now=now)
        record = InstanceRecord(
            sop_uid=h.sop_uid, series_uid=h.series_uid, study_uid=h.study_uid, sop_class_uid=h.sop_class_uid,
            transfer_syntax_uid=h.transfer_syntax_uid, version=version, content_sha256=sha,
            content_size=size, received_at=now, source_ae=source_ae,
            attrs=assign_issuer(h.attrs, issuer),
        )
        written = [w.store_id for w in writes if w.ok]
        try:
            with self.telemetry.stage("ingest.index"):
                self.index.register(record, placements)
        except BaseException:
            self.hot.delete_all(key, written)
            raise
        missing = tuple(p.store_id for p in placements if p.state is PlacementState.MISSING)
        if missing:
            log.warning("instance %s stored with replicas missing on %s", h.sop_uid, ",".join(missing))
        log.debug("stored %s v%d (%d bytes) in %.1f ms", h.sop_uid, version, size, (time.monotonic() - t0) * 1e3)
        return IngestResult(h.sop_uid, h.sop_class_uid, h.study_uid, version, sha, size, False, missing)
