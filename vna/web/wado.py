"""WADO-RS (PS3.18 10.4): instances, metadata, bulk data, frames, rendered images and thumbnails.

Every read goes through the RetrieveService as C-GET's does: the copies are
verified against the index digests, cold copies recalled, instances held only
at another site fetched from it. Instances are sent as stored (Part 10 bytes
unchanged); frames in their stored syntax when ``transfer-syntax=*`` (or the
stored syntax's media type) is accepted. Each request is audited as one
"DICOM Instances Transferred" record.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import threading
from collections import deque
from contextlib import ExitStack
from pathlib import Path
from typing import Any, BinaryIO, Callable, Generator, TypeVar

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from vna.audit import Actor
from vna.domain import Placement, QueryLevel
from vna.errors import IntegrityError, InvalidDataset, InvalidInput, NotFound, StorageError, VnaError
from vna.index.query import make_condition
from vna.services.retrieve import InstanceRef
from vna.web.context import WebContext, actor_of, ctx_of, uid_param
from vna.web.dicomjson import dataset_json, tag_path
from vna.web.media import (BIG_ENDIAN, DEFLATED_LE, EXPLICIT_LE, IMPLICIT_LE, NATIVE_SYNTAXES, TS_MEDIA_TYPES,
                           MediaRange, PartWriter, file_chunks, parse_accept)
from vna.web.status import NotAcceptable, error_response

__all__ = ["retrieve", "metadata", "bulkdata", "frames", "rendered", "thumbnail"]

log = logging.getLogger(__name__)
T = TypeVar("T")
OCTET = "application/octet-stream"
#: instances up to this size are read and sent as one piece of the response stream; larger ones in such pieces
_ONE_PIECE = 4 << 20
#: pieces read and verified ahead of the one being sent, per response
_PREFETCH = 4
#: instances whose copies are read from the index at once
_BATCH = 64


def _path_uids(request: Request) -> tuple[str | None, str | None, str | None]:
    p = request.path_params
    return (uid_param(request, "study") if "study" in p else None,
            uid_param(request, "series") if "series" in p else None,
            uid_param(request, "instance") if "instance" in p else None)


def _select(ctx: WebContext, study: str | None, series: str | None, sop: str | None) -> list[InstanceRef]:
    """The instances under the URL (raises NotFound when none)."""
    conds = [c for kw, v in (("StudyInstanceUID", study), ("SeriesInstanceUID", series), ("SOPInstanceUID", sop))
             if v and (c := make_condition(kw, v)) is not None]
    refs = ctx.archive.retrieve.select(QueryLevel.IMAGE, conds)
    if not refs:
        what = "instance" if sop else "series" if series else "study"
        raise NotFound(f"no such {what} in the archive")
    return refs


def _each_verified(ctx: WebContext, refs: list[InstanceRef], actor: Actor, op: str,
                   fn: Callable[[InstanceRef, Path | BinaryIO], T]) -> list[T]:
    """``fn`` on a verified copy of every ref, in one audited transfer; an unreadable instance fails the request.
    ``fn`` gets the copy's bytes in memory when a local plain copy was read and verified at once
    (:func:`_read_local`), else the path of a verified copy."""
    out = []
    rs = ctx.archive.retrieve
    copies = _Copies(ctx, refs)
    with rs.transfer(refs, actor, op=op) as xfer:
        for ref in refs:
            try:
                local = _read_local(ctx, ref, copies=copies)
                if local is not None:
                    out.append(fn(ref, io.BytesIO(local[0])))
                    xfer.sent(True, local[1])
                    continue
                with rs.open_verified(ref.sop_uid) as v:
                    out.append(fn(ref, v.path))
                    xfer.sent(True, v.size)
            except VnaError:
                xfer.sent(False)
                raise
    return out


def _accepts_any(accept: list[MediaRange], *types: str) -> bool:
    return any(m.matches(t) for m in accept for t in types)


# -- instances ----------------------------------------------------------------------------------------------------

def _wants_dicom(accept: list[MediaRange]) -> bool:
    for m in accept:
        if m.type == "multipart/related":
            t = m.params.get("type", "application/dicom").lower()
            if t in ("application/dicom", "*/*"):
                return True
        elif m.type in ("*/*", "multipart/*"):
            return True
    return False


def _read_piece(path: Path, head: bytes, size: int, sop_uid: str, tail: bytes = b"\r\n") -> bytearray:
    """``head``, the ``size`` bytes of ``path`` and ``tail`` in one buffer, read in place (no copy to join them)."""
    piece = bytearray(len(head) + size + len(tail))
    piece[:len(head)] = head
    piece[len(head) + size:] = tail
    view = memoryview(piece)[len(head):len(head) + size]
    with open(path, "rb", buffering=0) as fh:
        while view and (n := fh.readinto(view)):
            view = view[n:]
        longer = bool(fh.read(1))
    if view or longer:
        raise IntegrityError(f"instance {sop_uid} changed size after it was verified")
    return piece


class _Copies:
    """The local plain copies of a list of instances, read from the index a batch at a time (``_BATCH``
    instances from the first one asked for) when first needed; thread-safe."""

    def __init__(self, ctx: WebContext, refs: list[InstanceRef]) -> None:
        self._rs = ctx.archive.retrieve
        self._uids = [r.sop_uid for r in refs]
        self._at = {uid: i for i, uid in enumerate(self._uids)}
        self._got: dict[str, list[tuple[Placement, Path]]] = {}
        self._lock = threading.Lock()

    def of(self, sop_uid: str) -> list[tuple[Placement, Path]]:
        with self._lock:
            if sop_uid not in self._got:
                i = self._at.get(sop_uid, 0)
                batch = [u for u in self._uids[i:i + _BATCH] if u not in self._got] or [sop_uid]
                found = self._rs.local_copies_many(batch)
                self._got.update({u: found.get(u, []) for u in batch})
            return self._got.pop(sop_uid, [])


def _read_local(ctx: WebContext, ref: InstanceRef, head_for: Callable[[int], bytes] = lambda _size: b"",
                tail: bytes = b"", copies: _Copies | None = None) -> tuple[bytearray, int] | None:
    """``head_for(size)``, the instance's bytes and ``tail`` in one buffer, read once from a local plain copy up to
    ``_ONE_PIECE`` bytes and verified from that buffer (SHA-256 and size against the index), with the size; a
    failing copy is recorded as ``open_verified`` records it and the next one tried. None: no such copy verifies
    (the caller falls back to ``open_verified``: cold, encoded, remote or larger copies)."""
    rs = ctx.archive.retrieve
    found = copies.of(ref.sop_uid) if copies is not None else rs.local_copies_many([ref.sop_uid]).get(ref.sop_uid, [])
    for p, path in found:
        if p.content_size > _ONE_PIECE:
            return None
        head = head_for(p.content_size)
        try:
            piece = _read_piece(path, head, p.content_size, ref.sop_uid, tail)
        except FileNotFoundError:
            rs.mark_bad(p, "missing", f"{p.store_id}:{p.blob_key} not found")
            continue
        except IntegrityError as exc:
            rs.mark_bad(p, "corrupt", f"{p.store_id}:{p.blob_key} size differs from the index ({exc})")
            continue
        except OSError as exc:
            rs.mark_bad(p, "unreadable", f"{p.store_id}:{p.blob_key}: {exc.strerror}")
            continue
        body = memoryview(piece)[len(head):len(head) + p.content_size]
        if hashlib.sha256(body).hexdigest() != p.content_sha256:
            rs.mark_bad(p, "corrupt", f"{p.store_id}:{p.blob_key} content digest mismatch")
            continue
        return piece, p.content_size
    return None


def _part_pieces(ctx: WebContext, ref: InstanceRef, writer: PartWriter, size: list[int],
                 copies: _Copies | None = None) -> Generator[bytes | bytearray, None, None]:
    """The instance's part (delimiter, headers, the verified bytes, CRLF): one piece up to ``_ONE_PIECE`` bytes,
    else pieces of that size; the verified copy stays open until the generator ends. Appends the size to ``size``
    once verified; raises VnaError before the first piece. A local plain copy is read once and verified from
    that read (:func:`_read_local`)."""
    local = _read_local(ctx, ref, lambda size: writer.head(
        f"application/dicom; transfer-syntax={ref.transfer_syntax_uid}", size), b"\r\n", copies)
    if local is not None:
        size.append(local[1])
        yield local[0]
        return
    with ctx.archive.retrieve.open_verified(ref.sop_uid) as v:
        size.append(v.size)
        head = writer.head(f"application/dicom; transfer-syntax={ref.transfer_syntax_uid}", v.size)
        if v.size <= _ONE_PIECE:
            yield _read_piece(v.path, head, v.size, ref.sop_uid)
            return
        yield head
        yield from file_chunks(v.path, _ONE_PIECE)
        yield b"\r\n"


#: an instance ready to send: its first piece, its size, and (over ``_ONE_PIECE``) the generator of the rest
_Loaded = tuple[bytes | bytearray, int, Generator[bytes | bytearray, None, None] | None]


def _load(ctx: WebContext, ref: InstanceRef, writer: PartWriter, copies: _Copies | None = None) -> _Loaded | VnaError:
    """The instance verified and its first piece read; the error instead when it cannot be sent."""
    size: list[int] = []
    pieces = _part_pieces(ctx, ref, writer, size, copies)
    try:
        first = next(pieces)
    except VnaError as exc:
        return exc
    except OSError as exc:   # the verified copy went away before it was read
        return StorageError(f"instance {ref.sop_uid} could not be read after it was verified: {exc}")
    if size[0] <= _ONE_PIECE:
        pieces.close()
        return first, size[0], None
    return first, size[0], pieces


class _InstancesResponse(Response):
    """multipart/related application/dicom of verified instances, streamed.

    The next instances (up to ``_PREFETCH``) are read and verified on the
    context's read pool while the current one is sent, so verification
    overlaps sending and memory stays bounded (``_PREFETCH`` pieces of at most
    ``_ONE_PIECE`` bytes). The transfer is audited as one operation; an
    instance that cannot be sent once the status line is gone is left out,
    logged and counted as failed. A client that goes away stops the reads.
    """

    def __init__(self, ctx: WebContext, refs: list[InstanceRef], actor: Actor) -> None:
        self.ctx, self.refs, self.actor = ctx, refs, actor
        self.writer = PartWriter("application/dicom")
        self.status_code = 200
        self.media_type = self.writer.content_type
        self.background = None
        self.init_headers()   # no body attribute: no Content-Length (the length is known only once verified)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        loop = asyncio.get_running_loop()
        pool, rs = self.ctx.read_pool, self.ctx.archive.retrieve
        ahead: deque[tuple[InstanceRef, asyncio.Future[_Loaded | VnaError]]] = deque()
        todo = iter(self.refs)
        copies = _Copies(self.ctx, self.refs)   # one index read per batch of instances, not one per instance

        def read_ahead() -> None:
            while len(ahead) < _PREFETCH and (ref := next(todo, None)) is not None:
                ahead.append((ref, loop.run_in_executor(pool, _load, self.ctx, ref, self.writer, copies)))

        read_ahead()   # the first reads overlap the audit's start (nothing is sent before it)
        stack = ExitStack()
        try:   # audited before anything is sent: a refusal still gets its own status
            xfer = await loop.run_in_executor(
                pool, stack.enter_context, rs.transfer(self.refs, self.actor, op="wado-rs"))
        except Exception as exc:
            await self._drop(loop, ahead)
            await error_response(exc, "WADO-RS retrieve")(scope, receive, send)
            return
        gone = asyncio.Event()

        async def listen() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        listener = asyncio.create_task(listen())
        error: BaseException | None = None
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            while not gone.is_set():
                read_ahead()
                if not ahead:
                    break
                ref, job = ahead.popleft()
                got = await job
                if isinstance(got, VnaError):
                    log.warning("WADO-RS: instance %s not sent: %s", ref.sop_uid, got)
                    xfer.sent(False)
                    continue
                first, size, rest = got
                try:
                    await send({"type": "http.response.body", "body": first, "more_body": True})
                    while rest is not None and not gone.is_set() and (
                            piece := await loop.run_in_executor(pool, next, rest, None)) is not None:
                        await send({"type": "http.response.body", "body": piece, "more_body": True})
                finally:
                    if rest is not None:
                        await asyncio.shield(loop.run_in_executor(pool, rest.close))
                if not gone.is_set():
                    xfer.sent(True, size)
            if not gone.is_set():
                await send({"type": "http.response.body", "body": self.writer.end(), "more_body": False})
        except BaseException as exc:
            error = exc
            raise
        finally:
            listener.cancel()
            await self._drop(loop, ahead)
            exc_info = (type(error), error, error.__traceback__) if error is not None else (None, None, None)
            await asyncio.shield(loop.run_in_executor(pool, stack.__exit__, *exc_info))

    async def _drop(self, loop: asyncio.AbstractEventLoop,
                    ahead: deque[tuple[InstanceRef, asyncio.Future[_Loaded | VnaError]]]) -> None:
        """Cancel the reads not started; close the verified copies the finished ones hold open."""
        for _ref, job in ahead:
            if not job.cancel() and not job.cancelled() and job.exception() is None:
                got = job.result()
                if not isinstance(got, VnaError) and got[2] is not None:
                    await asyncio.shield(loop.run_in_executor(self.ctx.read_pool, got[2].close))
        ahead.clear()


async def retrieve(request: Request) -> Response:
    """``GET /studies/{s}[/series/{se}[/instances/{i}]]``: multipart/related application/dicom, bytes as stored."""
    if not _wants_dicom(parse_accept(request.headers.get("accept"))):
        raise NotAcceptable('this resource is sent as multipart/related; type="application/dicom"')
    ctx = ctx_of(request)
    study, series, sop = _path_uids(request)
    refs = await asyncio.get_running_loop().run_in_executor(ctx.read_pool, _select, ctx, study, series, sop)
    return _InstancesResponse(ctx, refs, actor_of(request))


# -- metadata -----------------------------------------------------------------------------------------------------

def _bulk_base(ctx: WebContext, ref: InstanceRef, series_uid: str) -> str:
    return f"{ctx.prefix}/studies/{ref.study_uid}/series/{series_uid}/instances/{ref.sop_uid}/bulkdata"


def _read_header(path: Path | BinaryIO) -> Dataset:
    """The data set with values over 1 KiB left on disk until used (elements after Pixel Data included)."""
    try:
        return dcmread(path, defer_size=1024)
    except (InvalidDicomError, ValueError, EOFError, OSError) as exc:
        raise InvalidDataset(f"stored instance cannot be parsed: {exc}") from exc


def _metadata_one(ctx: WebContext, ref: InstanceRef, path: Path | BinaryIO) -> dict[str, Any]:
    ds = _read_header(path)
    inst = ctx.archive.index.get_instance(ref.sop_uid)
    series_uid = inst.series_uid if inst is not None else str(ds.get("SeriesInstanceUID", ""))
    pixel_vr = None
    if "PixelData" in ds:  # listed by URI, never read
        ts = str(ds.file_meta.get("TransferSyntaxUID", EXPLICIT_LE))
        pixel_vr = "OW" if ts in NATIVE_SYNTAXES and int(ds.get("BitsAllocated", 16) or 16) > 8 else "OB"
        del ds.PixelData
    return dataset_json(ds, _bulk_base(ctx, ref, series_uid), pixel_vr=pixel_vr)


async def metadata(request: Request) -> Response:
    """``GET .../metadata``: every instance's attributes as DICOM JSON, bulk data by BulkDataURI."""
    if not _accepts_any(parse_accept(request.headers.get("accept")), "application/dicom+json", "application/json"):
        raise NotAcceptable("metadata is sent as application/dicom+json")
    ctx = ctx_of(request)
    study, series, sop = _path_uids(request)
    actor = actor_of(request)

    def run() -> list[dict[str, Any]]:
        refs = _select(ctx, study, series, sop)
        return _each_verified(ctx, refs, actor, "wado-rs metadata", lambda ref, p: _metadata_one(ctx, ref, p))

    out = await run_in_threadpool(run)
    return Response(json.dumps(out, ensure_ascii=False, separators=(",", ":")).encode("utf-8"),
                    media_type="application/dicom+json")


# -- one instance: bulk data, frames, rendered ---------------------------------------------------------------------

def _one(ctx: WebContext, study: str | None, series: str | None, sop: str | None) -> InstanceRef:
    refs = _select(ctx, study, series, sop)
    return refs[0]


def _read_full(path: Path | BinaryIO) -> Dataset:
    try:
        return dcmread(path)
    except (InvalidDicomError, ValueError, EOFError, OSError) as exc:
        raise InvalidDataset(f"stored instance cannot be parsed: {exc}") from exc


def _bulk_value(path: Path | BinaryIO, where: str) -> bytes:
    try:
        steps = tag_path(where)
    except ValueError as exc:
        raise InvalidInput(str(exc)) from None
    node: Any = _read_full(path)
    for i, step in enumerate(steps):
        try:
            node = node[step].value if i % 2 == 0 else node[step]
        except (KeyError, IndexError, TypeError):
            raise NotFound(f"no bulk data at {where}") from None
    if not isinstance(node, (bytes, bytearray)):
        raise NotFound(f"{where} is not bulk data")
    return bytes(node)


def _multipart(parts: list[tuple[str, bytes]], part_type: str) -> Response:
    writer = PartWriter(part_type)
    chunks: list[bytes] = []
    for content_type, data in parts:
        chunks += [writer.head(content_type, len(data)), data, b"\r\n"]
    chunks.append(writer.end())
    return Response(b"".join(chunks), media_type=writer.content_type)


async def bulkdata(request: Request) -> Response:
    """``GET .../instances/{i}/bulkdata/{tag path}``: one bulk value, multipart/related octet-stream."""
    ctx = ctx_of(request)
    study, series, sop = _path_uids(request)
    where = str(request.path_params["path"])
    actor = actor_of(request)

    def run() -> bytes:
        ref = _one(ctx, study, series, sop)
        return _each_verified(ctx, [ref], actor, "wado-rs bulkdata", lambda _r, p: _bulk_value(p, where))[0]

    data = await run_in_threadpool(run)
    return _multipart([(OCTET, data)], OCTET)


def _frame_numbers(raw: str) -> list[int]:
    try:
        nums = [int(x) for x in raw.split(",") if x.strip()]
    except ValueError:
        raise InvalidInput(f"frame list must be numbers separated by commas, not {raw!r}") from None
    if not nums or any(n < 1 for n in nums):
        raise InvalidInput("frame numbers start at 1")
    return nums


def _frame_plan(accept: list[MediaRange], ts: str) -> tuple[str, str, bool]:
    """(part media type, transfer syntax, decode needed) for frames stored in ``ts``; raises NotAcceptable."""
    native = ts in NATIVE_SYNTAXES
    stored_type = OCTET if native else TS_MEDIA_TYPES.get(ts, OCTET)
    label_ts = EXPLICIT_LE if ts in (IMPLICIT_LE, DEFLATED_LE) else ts
    for m in accept:
        if m.type == "multipart/related":
            t, want = m.params.get("type", OCTET).lower(), m.params.get("transfer-syntax")
        else:
            t, want = m.type, m.params.get("transfer-syntax")
        if want == "*" or t in ("*/*", "*"):
            if ts == BIG_ENDIAN:
                return OCTET, EXPLICIT_LE, True
            return stored_type, label_ts, False
        if native and t == OCTET and want in (None, EXPLICIT_LE, IMPLICIT_LE):
            return OCTET, EXPLICIT_LE, ts == BIG_ENDIAN
        if not native and t == stored_type and want in (None, ts):
            return stored_type, ts, False
        if not native and t == OCTET and want in (None, EXPLICIT_LE):
            return OCTET, EXPLICIT_LE, True
    raise NotAcceptable(f"frames are stored in transfer syntax {ts}: accept {stored_type} "
                        f"or transfer-syntax=* for them as stored")


def _frames_of(path: Path | BinaryIO, numbers: list[int], accept: list[MediaRange]) -> tuple[str, list[bytes]]:
    ds = _read_full(path)
    if "PixelData" not in ds:
        raise NotFound("the instance has no pixel data")
    ts = str(ds.file_meta.get("TransferSyntaxUID", IMPLICIT_LE))
    count = int(ds.get("NumberOfFrames", 1) or 1)
    if max(numbers) > count:
        raise NotFound(f"the instance has {count} frame(s)")
    part_type, out_ts, decode = _frame_plan(accept, ts)
    if decode:
        try:
            arr = ds.pixel_array
        except Exception as exc:  # a decoder plugin is missing or fails: the client must take them as stored
            raise NotAcceptable(f"frames in {ts} cannot be decoded here ({exc}); ask transfer-syntax=*") from None
        if count == 1:
            arr = arr[None]
        data = [arr[n - 1].astype(arr.dtype.newbyteorder("<")).tobytes() for n in numbers]
    elif ts in NATIVE_SYNTAXES:
        bits = int(ds.BitsAllocated)
        if bits % 8:
            raise NotAcceptable("frames of 1-bit pixel data are not sent separately; retrieve the instance")
        size = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) * bits // 8
        pixels = ds.PixelData
        data = [bytes(pixels[(n - 1) * size:n * size]) for n in numbers]
    else:
        from pydicom.encaps import generate_frames

        frames = list(generate_frames(ds.PixelData, number_of_frames=count))
        data = [frames[n - 1] for n in numbers]
    return f"{part_type}; transfer-syntax={out_ts}", data


async def frames(request: Request) -> Response:
    """``GET .../instances/{i}/frames/{list}``: the frames, multipart/related, native or as stored."""
    ctx = ctx_of(request)
    study, series, sop = _path_uids(request)
    numbers = _frame_numbers(str(request.path_params["frames"]))
    accept = parse_accept(request.headers.get("accept"))
    actor = actor_of(request)

    def run() -> tuple[str, list[bytes]]:
        ref = _one(ctx, study, series, sop)
        return _each_verified(ctx, [ref], actor, "wado-rs frames", lambda _r, p: _frames_of(p, numbers, accept))[0]

    content_type, data = await run_in_threadpool(run)
    return _multipart([(content_type, d) for d in data], content_type.split(";")[0])


# -- rendered -----------------------------------------------------------------------------------------------------

def _render_type(accept: list[MediaRange]) -> str:
    for m in accept:
        for t in ("image/jpeg", "image/png"):
            if m.matches(t):
                return t
    raise NotAcceptable("rendered images are sent as image/jpeg or image/png")


def _window(request: Request) -> tuple[float, float] | None:
    raw = request.query_params.get("window")
    if not raw:
        return None
    try:
        center, width, *_ = raw.split(",")
        return float(center), float(width)
    except ValueError:
        raise InvalidInput("window must be center,width[,function]") from None


def _viewport(request: Request, default: int | None) -> tuple[int, int] | None:
    raw = request.query_params.get("viewport")
    if not raw:
        return (default, default) if default else None
    try:
        w, h, *_ = raw.split(",")
        size = int(w), int(h)
    except ValueError:
        raise InvalidInput("viewport must be width,height") from None
    if not (0 < size[0] <= 8192 and 0 < size[1] <= 8192):
        raise InvalidInput("viewport sizes must be between 1 and 8192")
    return size


def _render(path: Path | BinaryIO, frame: int, media_type: str, window: tuple[float, float] | None,
            viewport: tuple[int, int] | None, quality: int) -> bytes:
    import numpy as np
    from PIL import Image
    from pydicom.pixels.processing import apply_modality_lut, convert_color_space

    ds = _read_full(path)
    if "PixelData" not in ds:
        raise NotFound("the instance has no pixel data to render")
    count = int(ds.get("NumberOfFrames", 1) or 1)
    if frame > count:
        raise NotFound(f"the instance has {count} frame(s)")
    try:
        arr = ds.pixel_array
    except Exception as exc:  # no decoder for the stored syntax
        raise NotAcceptable(f"the pixel data cannot be decoded for rendering: {exc}") from None
    if count > 1:
        arr = arr[frame - 1]
    pi = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if int(ds.get("SamplesPerPixel", 1)) == 1:
        values = apply_modality_lut(arr, ds).astype(np.float64)
        if window is None and "WindowCenter" in ds and "WindowWidth" in ds:
            c = ds.WindowCenter[0] if ds["WindowCenter"].VM > 1 else ds.WindowCenter
            w = ds.WindowWidth[0] if ds["WindowWidth"].VM > 1 else ds.WindowWidth
            window = float(c), float(w)
        if window is None or window[1] < 1:
            lo, hi = float(values.min()), float(values.max())
            window = (lo + hi) / 2, max(hi - lo, 1.0)
        c, w = window
        scaled = np.clip(((values - (c - 0.5)) / max(w - 1, 1) + 0.5), 0, 1) * 255
        if pi == "MONOCHROME1":
            scaled = 255 - scaled
        img = Image.fromarray(scaled.astype(np.uint8), mode="L")
    else:
        if pi.startswith("YBR") and not ds.file_meta.get("TransferSyntaxUID", "").startswith("1.2.840.10008.1.2.4.5"):
            arr = convert_color_space(arr, pi, "RGB")
        if arr.dtype != np.uint8:
            arr = (arr.astype(np.float64) / max(float(arr.max()), 1.0) * 255).astype(np.uint8)
        img = Image.fromarray(arr, mode="RGB")
    if viewport is not None:
        img.thumbnail(viewport)
    buf = io.BytesIO()
    if media_type == "image/png":
        img.save(buf, format="PNG")
    else:
        img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


async def _rendered(request: Request, default_viewport: int | None, op: str) -> Response:
    ctx = ctx_of(request)
    study, series, sop = _path_uids(request)
    media_type = _render_type(parse_accept(request.headers.get("accept")))
    frame = _frame_numbers(str(request.path_params["frames"]))[0] if "frames" in request.path_params else 1
    window, viewport = _window(request), _viewport(request, default_viewport)
    try:
        quality = int(request.query_params.get("quality", "90"))
    except ValueError:
        raise InvalidInput("quality must be 1-100") from None
    if not 1 <= quality <= 100:
        raise InvalidInput("quality must be 1-100")
    actor = actor_of(request)

    def run() -> bytes:
        refs = _select(ctx, study, series, sop)
        ref = refs[len(refs) // 2] if sop is None else refs[0]  # a series / study is shown by its middle image
        return _each_verified(ctx, [ref], actor, op,
                              lambda _r, p: _render(p, frame, media_type, window, viewport, quality))[0]

    return Response(await run_in_threadpool(run), media_type=media_type)


async def rendered(request: Request) -> Response:
    """``GET .../instances/{i}[/frames/{n}]/rendered``: the image windowed, as JPEG or PNG."""
    return await _rendered(request, None, "wado-rs rendered")


async def thumbnail(request: Request) -> Response:
    """``GET .../thumbnail`` of a study, series, instance or frame: a small rendered image."""
    return await _rendered(request, 128, "wado-rs thumbnail")
