"""STOW-RS (PS3.18 10.5): ``POST /studies[/{study}]`` through the same IngestService as C-STORE.

The body is streamed to a spool file (never held in memory), refused above
``web.max_body_bytes`` (413), then split into its parts; only a well-formed
multipart/related body is ingested (a malformed one stores nothing). Each
application/dicom part is ingested as a C-STORE data set is: same durability
(W verified replicas before success), same duplicate policy. The answer is
PS3.18's: ReferencedSOPSequence for the stored, FailedSOPSequence with the
C-STORE failure status as FailureReason for the rest; 200 when all were
stored, 202 when some failed, 409 when none was stored.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from vna.audit import Actor
from vna.dicom.status import CANNOT_UNDERSTAND, status_for
from vna.errors import InvalidInput, VnaError
from vna.services.ingest import Spooled, read_header
from vna.web.context import WebContext, actor_of, ctx_of, uid_param
from vna.web.media import copy_range, parse_media_type, split_multipart
from vna.web.status import BodyTooLarge, UnsupportedMediaType

__all__ = ["store", "STUDY_MISMATCH"]

log = logging.getLogger(__name__)

#: FailureReason of an instance whose StudyInstanceUID is not the one in the URL (PS3.18 Table 10.5.3-2 leaves
#: the code to the origin server; the storage "data set does not match" family is used)
STUDY_MISMATCH = 0xA900
_DICOM = "application/dicom"
#: instances of one request stored at once
_STORE_THREADS = 4


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


async def _spool(request: Request, ctx: WebContext) -> Path:
    """The request body in a spool file; raises BodyTooLarge (the partial file removed)."""
    limit = ctx.cfg.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"request body of {declared} bytes is over the limit of {limit} (web.max_body_bytes)")
    fd, name = tempfile.mkstemp(dir=ctx.spool, suffix=".stow")
    path = Path(name)
    size = 0
    try:
        with os.fdopen(fd, "wb") as fh:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise BodyTooLarge(f"request body is over the limit of {limit} bytes (web.max_body_bytes)")
                fh.write(chunk)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path


def _uids(path: Path) -> tuple[str, str, str, str]:
    """(SOP Class, SOP Instance, Study, Series) UIDs of a part; empty when unreadable (the ingest then says why)."""
    try:
        h = read_header(path)
    except VnaError:
        return "", "", "", ""
    return h.sop_class_uid, h.sop_uid, h.study_uid, h.series_uid


@dataclass
class _Part:
    """One application/dicom part copied to its own spool file (hashed while copied)."""

    index: int
    path: Path
    spooled: Spooled
    uids: tuple[str, str, str, str]


def _copy_part(ctx: WebContext, src: BinaryIO, index: int, start: int, end: int) -> _Part:
    fd, name = tempfile.mkstemp(dir=ctx.spool, suffix=".dcm")
    path = Path(name)
    t0 = time.time_ns()
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as fh:
            def write(data: bytes) -> None:
                digest.update(data)
                fh.write(data)
            copy_range(src, start, end, write)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return _Part(index, path, Spooled(digest.hexdigest(), end - start, t0, time.time_ns()), _uids(path))


def _ingest_one(ctx: WebContext, part: _Part, study: str | None, actor: Actor) -> dict[str, Any]:
    """The part's ReferencedSOPSequence item, or its FailedSOPSequence item (with ``failed`` set)."""
    cls, sop, st, series = part.uids
    if study is not None and st != study:
        log.warning("STOW-RS part %d: StudyInstanceUID differs from the URL; not stored", part.index)
        return {"failed": _failed(cls, sop, STUDY_MISMATCH)}
    try:
        res = ctx.archive.ingest.ingest_file(part.path, actor=actor, source_ae="DICOMWEB", owned=True,
                                             spooled=part.spooled)
    except VnaError as exc:
        log.warning("STOW-RS part %d not stored: %s", part.index, exc)
        return {"failed": _failed(cls, sop, status_for(exc))}
    url = f"{ctx.prefix}/studies/{res.study_uid}/series/{series}/instances/{res.sop_uid}"
    return {"00081150": {"vr": "UI", "Value": [res.sop_class_uid]},
            "00081155": {"vr": "UI", "Value": [res.sop_uid]},
            "00081190": {"vr": "UR", "Value": [url]}}


def _ingest_all(ctx: WebContext, body: Path, boundary: str, study: str | None, actor: Actor) -> dict[str, Any]:
    """Split, then ingest the parts a few at a time (concurrent stores share the index's group commit)."""
    found = split_multipart(body, boundary)   # the whole body is checked before anything is stored
    if not found:
        raise InvalidInput("the multipart body has no parts")
    answers: list[dict[str, Any] | None] = [None] * len(found)
    parts: list[_Part] = []
    try:
        with open(body, "rb") as src:
            for i, part in enumerate(found):
                ptype = parse_media_type(part.content_type or _DICOM).type
                if ptype != _DICOM:
                    log.warning("STOW-RS part %d: media type %s refused", i, ptype)
                    answers[i] = {"failed": _failed("", "", CANNOT_UNDERSTAND)}
                    continue
                parts.append(_copy_part(ctx, src, i, part.start, part.end))
        if len(parts) == 1:
            answers[parts[0].index] = _ingest_one(ctx, parts[0], study, actor)
        else:
            with ThreadPoolExecutor(min(_STORE_THREADS, len(parts)), thread_name_prefix="vna-stow") as pool:
                for done, answer in zip(parts, pool.map(lambda p: _ingest_one(ctx, p, study, actor), parts)):
                    answers[done.index] = answer
    finally:
        for p in parts:
            p.path.unlink(missing_ok=True)
    stored = [a for a in answers if a is not None and "failed" not in a]
    failed = [a["failed"] for a in answers if a is not None and "failed" in a]
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
    body = await _spool(request, ctx)
    try:
        out = await run_in_threadpool(_ingest_all, ctx, body, boundary, study, actor)
    finally:
        body.unlink(missing_ok=True)
    stored = len(out.get("00081199", {}).get("Value", []))
    failed = len(out.get("00081198", {}).get("Value", []))
    status = 200 if not failed else 202 if stored else 409
    return Response(json.dumps(out).encode(), status_code=status, media_type="application/dicom+json")
