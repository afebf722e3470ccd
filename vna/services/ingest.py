"""IngestService: one path for every way an instance enters the archive.

Sequence (architecture §5): hash the spooled Part 10 file -> parse the header
only -> validate UIDs -> duplicate policy -> write N hot replicas in parallel
(quorum W) -> register instance + placements in the index as one unit ->
return. Any failure before registration deletes what was written; nothing is
half-registered. Pixel data is never decoded.
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
from typing import Any

from pydicom import dcmread
from pydicom.charset import convert_encodings, decode_bytes, default_encoding
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.tag import BaseTag
from pydicom.dataelem import RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.uid import DeflatedExplicitVRLittleEndian

from vna.audit import INSTANCES_TRANSFERRED, Actor, AuditLog, AuditScope
from vna.checksum import sha256_file
from vna.domain import InstanceRecord, PlacementState, QueryLevel, site_of, validate_uid
from vna.errors import DuplicateConflict, InvalidDataset, StateConflict
from vna.index.base import Index
from vna.index.query import LEVEL_KEYS
from vna.services.part10 import scan_part10
from vna.storage.accessor import TierAccessor, site_of_tiers
from vna.telemetry import Telemetry, series_key

__all__ = ["IngestResult", "IngestService", "Spooled"]

log = logging.getLogger(__name__)

_ATTR_KEYS = tuple(k for lv in QueryLevel for k in LEVEL_KEYS[lv])
#: vna.ingest.instances series, by outcome
_STORED, _DUPLICATE, _FAILED = (series_key({"outcome": o}) for o in ("stored", "duplicate", "failed"))


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
    """What happened to one instance. ``duplicate``: identical bytes were already stored."""

    sop_uid: str
    sop_class_uid: str
    study_uid: str
    version: int
    content_sha256: str
    size: int
    duplicate: bool
    missing_replicas: tuple[str, ...] = ()


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
#: What the Part 10 scanner extracts (tag -> dictionary VR).
_WANTED = {tag: dictionary_VR(tag) for tag in (*_ATTR_TAGS.values(), *_UID_TAGS.values(), 0x00080005)}
_PARSE_ERRORS = (InvalidDicomError, ValueError, TypeError, KeyError, EOFError, OverflowError, struct.error,
                 zlib.error, LookupError)


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
        with open(path, "rb", buffering=0) as fp:
            scanned = scan_part10(fp, os.fstat(fp.fileno()).st_size, _WANTED)
        if scanned is None:
            return None
        elems = scanned.elements
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
    except _PARSE_ERRORS as exc:
        raise InvalidDataset(f"dataset cannot be parsed: {exc}") from exc
    except OSError as exc:
        raise InvalidDataset(f"dataset cannot be read: {exc}") from exc
    return _header(uids, ts, attrs)


class IngestService:
    """Stores Part 10 files in the hot tier and registers them in the index.

    Every call is audited (one "DICOM Instances Transferred" record, action C)
    and traced (``ingest`` > ``ingest.hash`` or ``ingest.receive``, ``ingest.parse``,
    ``ingest.write``, ``ingest.index``).
    """

    def __init__(self, index: Index, hot: TierAccessor, duplicate_policy: str = "reject", *,
                 audit: AuditLog | None = None, telemetry: Telemetry | None = None) -> None:
        self.index = index
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
        Raises InvalidInput, DuplicateConflict, QuorumNotMet/StorageError,
        IndexUnavailable; on any raise nothing new is stored or registered.
        Raises AuditUnavailable before anything is stored when the audit
        trail refuses service, and after storing if the record of this
        store cannot be written (the instance is then stored, unacknowledged;
        a retry is idempotent). ``actor`` defaults to the AE ``source_ae``.
        """
        who = actor if actor is not None else Actor(source_ae or "unknown", "ae")
        tel = self.telemetry
        with (self.audit.operation(INSTANCES_TRANSFERRED, "C", who) as rec,
              tel.span("ingest", start_ns=spooled.started_ns if spooled is not None else None, inner=True)):
            if spooled is not None:
                tel.stage_done("ingest.receive", spooled.started_ns, spooled.ended_ns, {"vna.bytes": spooled.size})
            try:
                result = self._ingest(path, source_ae, expected_sop_uid, expected_sop_class, rec, owned, spooled)
            except BaseException:
                tel.ingest_instances.add_key(1, _FAILED)
                raise
            rec.details.update({"version": result.version, "bytes": result.size, "duplicate": result.duplicate})
            if result.missing_replicas:
                rec.details["missing_replicas"] = list(result.missing_replicas)
            tel.ingest_instances.add_key(1, _DUPLICATE if result.duplicate else _STORED)
            if not result.duplicate:
                tel.ingest_bytes.add(result.size)
            return result

    def _ingest(self, path: Path, source_ae: str, expected_sop_uid: str | None, expected_sop_class: str | None,
                rec: AuditScope, owned: bool = False, spooled: Spooled | None = None) -> IngestResult:
        if spooled is not None:
            content_sha256, size = spooled.sha256, spooled.size
        else:
            with self.telemetry.stage("ingest.hash"):
                content_sha256, size = sha256_file(path)
        with self.telemetry.stage("ingest.parse"):
            h = read_header(path)
        rec.patient_ids.append(h.attrs.get("PatientID", ""))
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
                return IngestResult(h.sop_uid, h.sop_class_uid, h.study_uid, existing.version,
                                    content_sha256, size, duplicate=True,
                                    missing_replicas=self._keep_here(existing, path))
            if existing is not None and self.duplicate_policy == "reject":
                raise DuplicateConflict(
                    f"already stored with different content: {h.sop_uid}")
            version = 1 if existing is None else existing.version + 1
            try:
                return self._store(path, h, version, content_sha256, size, source_ae, owned)
            except StateConflict:
                log.info("concurrent store of %s version %d; re-checking", h.sop_uid, version)
                continue
        raise DuplicateConflict(f"SOP Instance {h.sop_uid} is being stored concurrently; retry")

    def _keep_here(self, existing: InstanceRecord, path: Path) -> tuple[str, ...]:
        """Identical bytes stored by another site of the federation: keep this site's copies too.

        Returns the replicas that missed the write. Nothing is written when this
        site already records a copy (in any state: repair is the repairer's).
        """
        if any(site_of(p.store_id) == self.site for p in self.index.placements(existing.sop_uid, existing.version)):
            return ()
        from vna.federation.copy import add_local_copy

        try:
            placements = add_local_copy(self.index, self.hot, existing, path, prefix="")
        except StateConflict:
            return ()  # a concurrent store at this site recorded them first
        log.info("instance %s was stored by another site; this site keeps its own copies now", existing.sop_uid)
        return tuple(p.store_id for p in placements if p.state is PlacementState.MISSING)

    def _store(self, path: Path, h: _Header, version: int, sha: str, size: int, source_ae: str,
               owned: bool = False) -> IngestResult:
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
            content_size=size, received_at=now, source_ae=source_ae, attrs=h.attrs,
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
