"""STOW-RS (PS3.18 10.5): ``POST /studies[/{study}]`` through the same IngestService as C-STORE.

The body is parsed as it arrives (:class:`~vna.web.media.MultipartParser`):
each application/dicom part goes straight to its own spool file, hashed while
written (never held in memory); the body is refused above
``web.max_body_bytes`` (413). Only a well-formed multipart/related body is
ingested (a malformed or truncated one stores nothing). Then every part is
ingested at once, as a C-STORE data set is (same durability: W verified
replicas before success; same duplicate policy), on a bounded pool shared by
the server's requests. The answer is
PS3.18's: ReferencedSOPSequence for the stored, FailedSOPSequence with the
C-STORE failure status as FailureReason for the rest; 200 when all were
stored, 202 when some failed, 409 when none was stored.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import tempfile
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any, BinaryIO

from starlette.requests import Request
from starlette.responses import Response

from vna.audit import Actor
from vna.dicom.status import CANNOT_UNDERSTAND, status_for
from vna.errors import InvalidInput, VnaError
from vna.services.ingest import Spooled, read_header
from vna.web.context import WebContext, actor_of, ctx_of, uid_param
from vna.web.media import MultipartParser, PartStart, parse_media_type
from vna.web.status import BodyTooLarge, UnsupportedMediaType

__all__ = ["store", "STUDY_MISMATCH"]

log = logging.getLogger(__name__)

#: FailureReason of an instance whose StudyInstanceUID is not the one in the URL (PS3.18 Table 10.5.3-2 leaves
#: the code to the origin server; the storage "data set does not match" family is used)
STUDY_MISMATCH = 0xA900
_DICOM = "application/dicom"
#: buffer of a part's spool file (the body arrives in socket-sized chunks)
_WRITE_BUFFER = 256 << 10


def _boundary(request: Request) -> str:
    raw = request.headers.get("content-type", "")
    if not raw:
        raise UnsupportedMediaType('STOW-RS takes multipart/related; type="application/dicom" (no Content-Type)')
    mt = parse_media_type(raw)
    if mt.type != "multipart/related":
        raise UnsupportedMediaType(f'STOW-RS takes multipart/related; type="application/dicom", not {mt.type}')
    part_type = mt.params.get("type", _DICOM).lower()
    if part_type != _DICOM:
        raise UnsupportedMediaType(f"STOW-RS here takes application/dicom parts, not {part_type}"
                                   " (metadata+bulkdata uploads are not supported)")
    boundary = mt.params.get("boundary", "")
    if not boundary:
        raise InvalidInput("multipart/related without a boundary parameter")
    return boundary


class _SpoolFile:
    """One application/dicom part written to its own spool file as it arrives, hashed while written."""

    def __init__(self, spool: Path, index: int) -> None:
        self.index = index
        self.started_ns = time.time_ns()
        fd, name = tempfile.mkstemp(dir=spool, suffix=".dcm")
        self.path = Path(name)
        self._fh: BinaryIO | None = os.fdopen(fd, "wb", buffering=_WRITE_BUFFER)
        self._digest = hashlib.sha256()
        self.size = 0
        self.spooled: Spooled | None = None

    def write(self, data: bytes) -> None:
        assert self._fh is not None
        self._digest.update(data)
        self._fh.write(data)
        self.size += len(data)

    def finish(self) -> None:
        """The part is complete: close the file, record its digest."""
        assert self._fh is not None
        self._fh.close()
        self._fh = None
        self.spooled = Spooled(self._digest.hexdigest(), self.size, self.started_ns, time.time_ns())

    def discard(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        self.path.unlink(missing_ok=True)


#: one received part: its spool file, or the FailureReason of a part refused for its media type
_Received = _SpoolFile | int


async def _receive(request: Request, ctx: WebContext, boundary: str) -> list[_Received]:
    """The body's parts, each application/dicom part in its own spool file (SHA-256 computed as it arrives).

    Raises BodyTooLarge over ``web.max_body_bytes`` and InvalidInput on a
    malformed body; on any raise no spool file is left behind.
    """
    limit = ctx.cfg.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"request body of {declared} bytes is over the limit of {limit} (web.max_body_bytes)")
    parser = MultipartParser(boundary)
    received: list[_Received] = []
    current: _SpoolFile | None = None
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge(f"request body is over the limit of {limit} bytes (web.max_body_bytes)")
            for event in parser.feed(chunk):
                if isinstance(event, bytes):
                    if current is not None:
                        current.write(event)
                elif isinstance(event, PartStart):
                    ptype = parse_media_type(event.content_type or _DICOM).type
                    if ptype == _DICOM:
                        current = _SpoolFile(ctx.spool, len(received))
                        received.append(current)
                    else:
                        log.warning("STOW-RS part %d: media type %s refused", len(received), ptype)
                        received.append(CANNOT_UNDERSTAND)
                        current = None
                else:   # PART_END
                    if current is not None:
                        current.finish()
                    current = None
        parser.close()
    except BaseException:
        for r in received:
            if isinstance(r, _SpoolFile):
                r.discard()
        raise
    if not received:
        raise InvalidInput("the multipart body has no parts")
    return received


def _uids(path: Path) -> tuple[str, str, str, str]:
    """(SOP Class, SOP Instance, Study, Series) UIDs of a part; empty when unreadable (the ingest then says why)."""
    try:
        h = read_header(path)
    except VnaError:
        return "", "", "", ""
    return h.sop_class_uid, h.sop_uid, h.study_uid, h.series_uid


def _ingest_one(ctx: WebContext, part: _SpoolFile, study: str | None, actor: Actor) -> dict[str, Any]:
    """The part's ReferencedSOPSequence item, or its FailedSOPSequence item (with ``failed`` set).

    Removes the part's spool file.
    """
    try:
        cls, sop, st, series = _uids(part.path)
        if study is not None and st != study:
            log.warning("STOW-RS part %d: StudyInstanceUID differs from the URL; not stored", part.index)
            return {"failed": _failed(cls, sop, STUDY_MISMATCH)}
        try:
            res = ctx.archive.ingest.ingest_file(part.path, actor=actor, source_ae="DICOMWEB", owned=True,
                                                 spooled=part.spooled)
        except VnaError as exc:
            log.warning("STOW-RS part %d not stored: %s", part.index, exc)
            return {"failed": _failed(cls, sop, status_for(exc))}
    finally:
        part.discard()
    url = f"{ctx.prefix}/studies/{res.study_uid}/series/{series}/instances/{res.sop_uid}"
    return {"00081150": {"vr": "UI", "Value": [res.sop_class_uid]},
            "00081155": {"vr": "UI", "Value": [res.sop_uid]},
            "00081190": {"vr": "UR", "Value": [url]}}


async def _ingest_all(ctx: WebContext, received: list[_Received], study: str | None,
                      actor: Actor) -> dict[str, Any]:
    """Ingest every spooled part at once on the context's store pool (concurrent stores share the index's group
    commit and overlap their fsyncs); the PS3.18 response body. The spool files are removed."""
    jobs: list[Future[dict[str, Any]] | None] = []
    try:
        for r in received:
            jobs.append(ctx.store_pool.submit(_ingest_one, ctx, r, study, actor) if isinstance(r, _SpoolFile)
                        else None)
        done = await asyncio.gather(*(asyncio.wrap_future(j) for j in jobs if j is not None))
    except BaseException:
        for i, r in enumerate(received):   # a job that ran (or runs) removes its own spool file
            job = jobs[i] if i < len(jobs) else None
            if isinstance(r, _SpoolFile) and (job is None or job.cancel()):
                r.discard()
        raise
    answers = iter(done)
    stored: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    for r in received:
        a = next(answers) if isinstance(r, _SpoolFile) else {"failed": _failed("", "", r)}
        if "failed" in a:
            failed.append(a["failed"])
        else:
            stored.append(a)
    out: dict[str, Any] = {}
    if study is not None:
        out["00081190"] = {"vr": "UR", "Value": [f"{ctx.prefix}/studies/{study}"]}
    if failed:
        out["00081198"] = {"vr": "SQ", "Value": failed}
    if stored:
        out["00081199"] = {"vr": "SQ", "Value": stored}
    return out


def _failed(cls: str, sop: str, reason: int) -> dict[str, Any]:
    item: dict[str, Any] = {}
    if cls:
        item["00081150"] = {"vr": "UI", "Value": [cls]}
    if sop:
        item["00081155"] = {"vr": "UI", "Value": [sop]}
    item["00081197"] = {"vr": "US", "Value": [reason]}
    return item


async def store(request: Request) -> Response:
    """``POST /studies[/{study}]``: store the application/dicom parts; the PS3.18 response."""
    ctx = ctx_of(request)
    study = uid_param(request, "study") if "study" in request.path_params else None
    boundary = _boundary(request)
    actor = actor_of(request)
    received = await _receive(request, ctx, boundary)   # the whole body is checked before anything is stored
    out = await _ingest_all(ctx, received, study, actor)
    stored = len(out.get("00081199", {}).get("Value", []))
    failed = len(out.get("00081198", {}).get("Value", []))
    status = 200 if not failed else 202 if stored else 409
    return Response(json.dumps(out).encode(), status_code=status, media_type="application/dicom+json")
