"""A Python client for the vna gRPC API, verifying content end to end.

::

    with VnaClient("archive:50051", token="...", root_certificates=ca_pem) as c:
        r = c.store(Path("ct.dcm"))                 # digest sent, checked by the server and again here
        for inst in c.retrieve_to(Path("out"), study_uid=r.study_instance_uid):
            print(inst.path, inst.content_sha256)   # every file hashed while received
        for row in c.query("STUDY", {"PatientName": "DOE^*", "StudyDate": ""}):
            ...

Every failed call raises :class:`ApiError` (a ``VnaError``) carrying the gRPC
status code, the server's message and the server's error class name; bytes
that do not hash to the digest the server announced raise
``vna.errors.IntegrityError`` (a received file is then removed).
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator, Mapping, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from vna.api.codegen import ensure as _ensure_stubs

_ensure_stubs()  # before the generated modules are imported (fresh clone: generates them)

from vna.api._gen import archive_pb2 as pb  # noqa: E402
from vna.api._gen import archive_pb2_grpc as pb_grpc  # noqa: E402
from vna.api.observe import trace_metadata  # noqa: E402
from vna.checksum import sha256_file  # noqa: E402
from vna.errors import IntegrityError, InvalidInput, VnaError  # noqa: E402

__all__ = ["ApiError", "StoreResult", "RetrievedInstance", "VnaClient", "LEVELS", "pb"]

CHUNK_SIZE = 1 << 20
#: Query levels by name.
LEVELS: dict[str, pb.QueryLevel] = {"PATIENT": pb.PATIENT, "STUDY": pb.STUDY, "SERIES": pb.SERIES,
                          "INSTANCE": pb.INSTANCE, "IMAGE": pb.INSTANCE}

T = TypeVar("T")


class ApiError(VnaError):
    """A gRPC call failed: ``code`` (grpc.StatusCode), ``details`` (the server's message), ``error`` (its class)."""

    def __init__(self, code: Any, details: str, error: str = "") -> None:
        super().__init__(f"{getattr(code, 'name', code)}: {details}")
        self.code = code
        self.details = details
        self.error = error

    @classmethod
    def from_rpc(cls, exc: Any) -> "ApiError":
        """Wrap a ``grpc.RpcError``."""
        error = ""
        trailing = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
        for key, value in trailing or ():
            if key == "vna-error":
                error = str(value)
        return cls(exc.code(), str(exc.details() or ""), error)


@dataclass(frozen=True)
class StoreResult:
    """What the archive did with one upload (``duplicate``: identical bytes were already stored)."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    version: int
    content_sha256: str
    size: int
    duplicate: bool
    missing_replicas: tuple[str, ...]


@dataclass(frozen=True)
class RetrievedInstance:
    """One received instance, verified against the digest the server sent. ``path`` or ``data`` holds it."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    transfer_syntax_uid: str
    size: int
    content_sha256: str
    path: Path | None = None
    data: bytes | None = None


class _Sink:
    """Where the bytes of one instance go while they are hashed."""

    def __init__(self, header: pb.InstanceHeader, directory: Path | None) -> None:
        self.header = header
        self.digest = hashlib.sha256()
        self.size = 0
        self.directory = directory
        self.tmp: Path | None = None
        self.fh: IO[bytes]
        if directory is None:
            self.fh = io.BytesIO()
        else:
            fd, name = tempfile.mkstemp(dir=directory, prefix=".vna-", suffix=".part")
            self.tmp = Path(name)
            self.fh = os.fdopen(fd, "wb")

    def write(self, data: bytes) -> None:
        self.fh.write(data)
        self.digest.update(data)
        self.size += len(data)

    def finish(self) -> RetrievedInstance:
        h = self.header
        data = self.fh.getvalue() if isinstance(self.fh, io.BytesIO) else None
        self.fh.close()
        if self.size != h.size or self.digest.hexdigest() != h.content_sha256:
            self.discard()
            raise IntegrityError(f"instance {h.sop_instance_uid}: received {self.size} bytes hashing to "
                                 f"{self.digest.hexdigest()}, the server announced {h.size} bytes "
                                 f"{h.content_sha256}")
        path = None
        if self.tmp is not None and self.directory is not None:
            path = self.directory / f"{h.sop_instance_uid}.dcm"
            os.replace(self.tmp, path)
        return RetrievedInstance(h.sop_instance_uid, h.sop_class_uid, h.study_instance_uid, h.transfer_syntax_uid,
                                 h.size, h.content_sha256, path, data)

    def discard(self) -> None:
        self.fh.close()
        if self.tmp is not None:
            self.tmp.unlink(missing_ok=True)


class VnaClient:
    """A connection to a vna gRPC server. Thread-safe; close it (or use ``with``) when done.

    ``token`` is sent as ``authorization: Bearer <token>``. TLS is used when
    ``tls`` is true or any of ``root_certificates`` (PEM CA bundle; None: the
    system's roots), ``certificate_chain``/``private_key`` (mutual TLS) is
    given. ``timeout`` (seconds) bounds every call; None waits forever.
    """

    def __init__(self, target: str, token: str | None = None, *, tls: bool = False,
                 root_certificates: bytes | None = None, certificate_chain: bytes | None = None,
                 private_key: bytes | None = None, timeout: float | None = 300.0,
                 max_message_bytes: int = 4 * 1024 * 1024,
                 options: Iterable[tuple[str, Any]] = ()) -> None:
        opts = [("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes), *options]
        if tls or root_certificates or certificate_chain:
            creds = grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)
            self.channel = grpc.secure_channel(target, creds, options=opts)
        else:
            self.channel = grpc.insecure_channel(target, options=opts)
        self.timeout = timeout
        self._metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()
        self.archive = pb_grpc.ArchiveStub(self.channel)
        self.lifecycle = pb_grpc.LifecycleStub(self.channel)
        self.integrity = pb_grpc.IntegrityStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)

    def __enter__(self) -> "VnaClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel."""
        self.channel.close()

    def _call_metadata(self) -> tuple[tuple[str, str], ...]:
        """The token, and the current span's W3C trace context so the server's span continues our trace."""
        return self._metadata + tuple(trace_metadata())

    def _call(self, method: Callable[..., T], request: Any) -> T:
        try:
            return method(request, timeout=self.timeout, metadata=self._call_metadata())
        except grpc.RpcError as exc:
            raise ApiError.from_rpc(exc) from None

    # -- Store -----------------------------------------------------------------
    def store(self, source: Path | bytes, *, expected_sop_uid: str = "", source_name: str = "",
              chunk_size: int = CHUNK_SIZE) -> StoreResult:
        """Upload one Part 10 file (a path or its bytes); returns once it is durable and indexed.

        The file's SHA-256 is sent first, the server refuses bytes that do not
        match it, and the digest the server stored is compared again here.
        Raises ApiError (INVALID_ARGUMENT for bad DICOM, ALREADY_EXISTS,
        UNAVAILABLE...) or IntegrityError.
        """
        digest = hashlib.sha256(source).hexdigest() if isinstance(source, bytes) else sha256_file(Path(source))[0]

        def messages() -> Iterator[pb.StoreRequest]:
            yield pb.StoreRequest(header=pb.StoreHeader(
                expected_sop_instance_uid=expected_sop_uid, content_sha256=digest, source=source_name))
            if isinstance(source, bytes):
                for i in range(0, len(source), chunk_size):
                    yield pb.StoreRequest(chunk=source[i:i + chunk_size])
                return
            with open(source, "rb") as fh:
                while data := fh.read(chunk_size):
                    yield pb.StoreRequest(chunk=data)

        r: pb.StoreResponse = self._call(self.archive.Store, messages())
        if r.content_sha256 != digest:
            raise IntegrityError(f"the archive stored {r.sop_instance_uid} with digest {r.content_sha256}, "
                                 f"the file hashes to {digest}")
        return StoreResult(r.sop_instance_uid, r.sop_class_uid, r.study_instance_uid, r.version, r.content_sha256,
                           r.size, r.duplicate, tuple(r.missing_replicas))

    # -- Retrieve --------------------------------------------------------------
    @staticmethod
    def _retrieve_request(sop_uid: str, series_uid: str, study_uid: str, chunk_size: int,
                          local_only: bool = False) -> pb.RetrieveRequest:
        given = [(k, v) for k, v in (("sop_instance_uid", sop_uid), ("series_instance_uid", series_uid),
                                     ("study_instance_uid", study_uid)) if v]
        if len(given) != 1:
            raise InvalidInput("give exactly one of sop_uid, series_uid, study_uid")
        req = pb.RetrieveRequest(chunk_size=chunk_size, local_only=local_only)
        setattr(req, given[0][0], given[0][1])
        return req

    def _receive(self, request: pb.RetrieveRequest, directory: Path | None) -> Iterator[RetrievedInstance]:
        sink: _Sink | None = None
        try:
            for msg in self.archive.Retrieve(request, timeout=self.timeout, metadata=self._call_metadata()):
                part = msg.WhichOneof("part")
                if part == "header":
                    if sink is not None:
                        done, sink = sink, None
                        yield done.finish()
                    sink = _Sink(msg.header, directory)
                elif part == "chunk":
                    if sink is None:
                        raise IntegrityError("the server sent bytes before an instance header")
                    sink.write(msg.chunk)
            if sink is not None:
                done, sink = sink, None
                yield done.finish()
        except grpc.RpcError as exc:
            raise ApiError.from_rpc(exc) from None
        finally:
            if sink is not None:
                sink.discard()

    def retrieve(self, *, sop_uid: str = "", series_uid: str = "", study_uid: str = "",
                 chunk_size: int = 0) -> Iterator[RetrievedInstance]:
        """Yield each instance of the target in memory (``data``), verified. Give exactly one UID."""
        return self._receive(self._retrieve_request(sop_uid, series_uid, study_uid, chunk_size), None)

    def retrieve_to(self, directory: Path, *, sop_uid: str = "", series_uid: str = "", study_uid: str = "",
                    chunk_size: int = 0, local_only: bool = False) -> Iterator[RetrievedInstance]:
        """Write each instance of the target to ``directory/<SOPInstanceUID>.dcm`` (renamed into place
        only once verified) and yield it. Give exactly one UID. ``local_only``: only copies held at
        the server's own site (no cross-site fetch)."""
        directory.mkdir(parents=True, exist_ok=True)
        return self._receive(self._retrieve_request(sop_uid, series_uid, study_uid, chunk_size, local_only),
                             directory)

    # -- Query and metadata ------------------------------------------------------
    @staticmethod
    def _level(level: str) -> pb.QueryLevel:
        value = LEVELS.get(level.upper())
        if value is None:
            raise InvalidInput(f"query level must be one of {', '.join(LEVELS)}, not {level!r}")
        return value

    def query_page(self, level: str, keys: Mapping[str, str] | None = None, *, page_size: int = 100,
                   page_token: str = "") -> tuple[list[dict[str, str]], str]:
        """One page of matches and the token of the next page ("" on the last)."""
        req = pb.QueryRequest(level=self._level(level), keys=dict(keys or {}), page_size=page_size,
                              page_token=page_token)
        r: pb.QueryResponse = self._call(self.archive.Query, req)
        return [dict(m.attributes) for m in r.matches], r.next_page_token

    def query_response(self, level: str, keys: Mapping[str, str] | None = None, *, page_size: int = 100,
                       page_token: str = "") -> pb.QueryResponse:
        """One raw page: matches, next_page_token and the federation's ``unreachable_sites``."""
        req = pb.QueryRequest(level=self._level(level), keys=dict(keys or {}), page_size=page_size,
                              page_token=page_token)
        r: pb.QueryResponse = self._call(self.archive.Query, req)
        return r

    def query(self, level: str, keys: Mapping[str, str] | None = None, *, page_size: int = 100,
              limit: int | None = None) -> Iterator[dict[str, str]]:
        """Every match (C-FIND semantics), fetched page by page; at most ``limit``."""
        token = ""
        n = 0
        while True:
            rows, token = self.query_page(level, keys, page_size=page_size, page_token=token)
            for row in rows:
                if limit is not None and n >= limit:
                    return
                n += 1
                yield row
            if not token:
                return

    def study_metadata(self, study_uid: str) -> pb.StudyMetadata:
        """Series and instances of a study, with attributes, digests and availability."""
        r: pb.StudyMetadata = self._call(self.archive.GetStudyMetadata, pb.StudyRequest(study_instance_uid=study_uid))
        return r

    # -- Lifecycle -----------------------------------------------------------------
    def lifecycle_plan(self, limit: int = 0) -> pb.LifecyclePlan:
        """Studies a lifecycle run would move now."""
        r: pb.LifecyclePlan = self._call(self.lifecycle.Plan, pb.PlanRequest(limit=limit))
        return r

    def lifecycle_run(self, limit: int = 0, dry_run: bool = False) -> pb.JobReport:
        """One bounded migration run on the server."""
        r: pb.JobReport = self._call(self.lifecycle.Run, pb.JobRequest(limit=limit, dry_run=dry_run))
        return r

    def lifecycle_status(self, study_uid: str) -> pb.LifecycleStatus:
        """Where a study's instances are, and whether it is held."""
        r: pb.LifecycleStatus = self._call(self.lifecycle.GetStatus, pb.StudyRequest(study_instance_uid=study_uid))
        return r

    def set_hold(self, study_uid: str, held: bool = True, reason: str = "") -> pb.LifecycleStatus:
        """Place (or with ``held=False`` lift) a legal hold."""
        r: pb.LifecycleStatus = self._call(
            self.lifecycle.SetHold, pb.HoldRequest(study_instance_uid=study_uid, held=held, reason=reason))
        return r

    # -- Integrity -----------------------------------------------------------------
    def scrub(self, limit: int = 0, *, level: str = "", dry_run: bool = False, tier: str = "",
              store_id: str = "") -> pb.JobReport:
        """One bounded scrub run on the server (detection only)."""
        r: pb.JobReport = self._call(self.integrity.Scrub, pb.ScrubRequest(
            limit=limit, level=level, dry_run=dry_run, tier=tier, store_id=store_id))
        return r

    def integrity_report(self, max_items: int = 0) -> pb.IntegrityReport:
        """The archive-wide fixity summary."""
        r: pb.IntegrityReport = self._call(self.integrity.GetReport, pb.ReportRequest(max_items=max_items))
        return r

    # -- Health ----------------------------------------------------------------------
    def health(self, service: str = "") -> str:
        """The server's health status name (``SERVING``, ``NOT_SERVING``...) for ``service`` ("" overall)."""
        r = self._call(self.health_stub.Check, health_pb2.HealthCheckRequest(service=service))
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(r.status))
