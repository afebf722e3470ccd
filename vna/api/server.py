"""The gRPC front-end: thin servicers translating protobuf <-> the archive's services, and the server.

Rule 5 of the architecture holds: nothing here decides anything the DIMSE
front-end decides differently. Store spools the upload to
``<data_dir>/spool/grpc`` and hands the file to ``IngestService.ingest_file``
(the one ingest path); Retrieve streams copies verified by
``RetrieveService.open_verified``; Query runs ``QueryService.find`` (the one
C-FIND matching implementation); the jobs are the CLI's jobs. Errors become
gRPC statuses through ``vna/api/status.py`` only; authentication and roles are
checked by ``vna/api/auth.py`` before a servicer runs.

Limits: RPCs run in a pool of ``grpc.max_workers`` threads (more calls queue,
up to four times that, then RESOURCE_EXHAUSTED); at most one lifecycle run and
one scrub run at a time per process (another gets ABORTED); messages are at
most ``grpc.max_message_bytes``.

Query paging is offset based for now: the opaque page token holds the offset
into the index's natural order and a fingerprint of the query (a token is
refused for another query). Rows stored or deleted between pages can shift
the pages; a keyset cursor needs an ordered ``Index.find``.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from pydicom.datadict import tag_for_keyword

from vna.api.codegen import ensure as _ensure_stubs

_ensure_stubs()  # before the generated modules are imported (fresh clone: generates them)

from vna.api import auth  # noqa: E402
from vna.api._gen import archive_pb2 as pb  # noqa: E402
from vna.api._gen import archive_pb2_grpc as pb_grpc  # noqa: E402
from vna.api.observe import ObservingInterceptor  # noqa: E402
from vna.api.status import abort  # noqa: E402
from vna.archive import Archive  # noqa: E402
from vna.config import Config, GrpcConfig, is_loopback  # noqa: E402
from vna.domain import InstanceRecord, PlacementState, QueryLevel, Tier, validate_uid  # noqa: E402
from vna.audit import INSTANCES_ACCESSED, Actor  # noqa: E402
from vna.errors import ConfigError, InvalidInput, LeaseHeld, NotFound, VnaError  # noqa: E402
from vna.index.query import COMPUTED_KEYS, LEVEL_KEYS, UNIQUE_KEY  # noqa: E402
from vna.jobs import JobReport  # noqa: E402

__all__ = ["GrpcServer", "ArchiveServicer", "LifecycleServicer", "IntegrityServicer", "IndexHealth",
           "SERVICE_NAMES", "CHUNK_SIZE"]

log = logging.getLogger(__name__)

#: The services registered (and reported by the health service).
SERVICE_NAMES: tuple[str, ...] = ("vna.v1.Archive", "vna.v1.Lifecycle", "vna.v1.Integrity")
#: Default bytes per Retrieve chunk.
CHUNK_SIZE = 1 << 20
_MIN_CHUNK = 4096
_PAGE_SIZE = 100
_MAX_PAGE_SIZE = 1000

_LEVELS: dict[int, QueryLevel] = {
    pb.PATIENT: QueryLevel.PATIENT, pb.STUDY: QueryLevel.STUDY,
    pb.SERIES: QueryLevel.SERIES, pb.INSTANCE: QueryLevel.IMAGE,
}
_LEVEL_ORDER = [QueryLevel.PATIENT, QueryLevel.STUDY, QueryLevel.SERIES, QueryLevel.IMAGE]
_RETRIEVE_TARGETS: dict[str, tuple[QueryLevel, str]] = {
    "sop_instance_uid": (QueryLevel.IMAGE, "SOPInstanceUID"),
    "series_instance_uid": (QueryLevel.SERIES, "SeriesInstanceUID"),
    "study_instance_uid": (QueryLevel.STUDY, "StudyInstanceUID"),
}

F = TypeVar("F", bound=Callable[..., Any])


def _unary(fn: F) -> F:
    """Map any error raised by a unary-response RPC to its status (``vna/api/status.py``)."""
    @functools.wraps(fn)
    def wrapper(self: Any, request: Any, context: Any) -> Any:
        try:
            return fn(self, request, context)
        except Exception as exc:  # every error leaves through the status table
            abort(context, exc, fn.__name__)
    return wrapper  # type: ignore[return-value]


def _streaming(fn: F) -> F:
    """As :func:`_unary`, for RPCs that stream their responses."""
    @functools.wraps(fn)
    def wrapper(self: Any, request: Any, context: Any) -> Iterator[Any]:
        try:
            yield from fn(self, request, context)
        except Exception as exc:  # every error leaves through the status table
            abort(context, exc, fn.__name__)
    return wrapper  # type: ignore[return-value]


def _actor(context: Any) -> Actor:
    """Who is calling: the bearer token's name (or "anonymous") and the peer's address, for the audit trail."""
    principal = auth.current_principal()
    peer = str(context.peer() or "")
    return Actor(principal.name if principal else "anonymous", "token", peer)


def _uid(value: str, what: str) -> str:
    if not value:
        raise InvalidInput(f"{what} is required")
    return validate_uid(value, what)


def _availability(states: list[tuple[Tier, PlacementState]]) -> str:
    ok = {tier for tier, state in states if state is PlacementState.OK}
    if ok & {Tier.HOT, Tier.CACHE}:
        return "ONLINE"
    return "NEARLINE" if Tier.COLD in ok else "UNAVAILABLE"


def _worst(values: list[str]) -> str:
    for v in ("UNAVAILABLE", "NEARLINE"):
        if v in values:
            return v
    return "ONLINE"


def _job_report(report: JobReport) -> pb.JobReport:
    msg = pb.JobReport(job=report.job, examined=report.examined, done=report.done, findings=report.findings,
                       failures=report.failures, bytes=report.bytes, dry_run=report.dry_run)
    for d in report.details:
        msg.details.add().fields.update({str(k): "" if v is None else str(v) for k, v in d.items()})
    extra = report.as_dict()
    if "level" in extra:
        msg.level = str(extra["level"])
        msg.elapsed_seconds = float(extra.get("elapsed", 0.0))
    return msg


class _Gate:
    """At most one run of a job per process at a time; a second caller is refused (ABORTED)."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._lock = threading.Lock()

    def __enter__(self) -> None:
        if not self._lock.acquire(blocking=False):
            raise LeaseHeld(f"a {self.what} is already running on this server; retry when it is done")

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


class ArchiveServicer:
    """``vna.v1.Archive``: Store, Retrieve, Query, GetStudyMetadata."""

    def __init__(self, archive: Archive, cfg: GrpcConfig, spool: Path) -> None:
        self.archive = archive
        self.cfg = cfg
        self.spool = spool

    # -- Store -----------------------------------------------------------------
    @_unary
    def Store(self, request_iterator: Iterator[pb.StoreRequest], context: Any) -> pb.StoreResponse:
        header = pb.StoreHeader()
        digest = hashlib.sha256()
        size = 0
        self.spool.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=self.spool, suffix=".dcm")
        path = Path(name)
        try:
            with os.fdopen(fd, "wb") as fh:
                for i, msg in enumerate(request_iterator):
                    part = msg.WhichOneof("part")
                    if part == "header":
                        if i != 0:
                            raise InvalidInput("the Store header must be the first message")
                        header = msg.header
                    elif part == "chunk":
                        fh.write(msg.chunk)
                        digest.update(msg.chunk)
                        size += len(msg.chunk)
            if size == 0:
                raise InvalidInput("no file bytes were sent")
            declared = header.content_sha256.strip().lower()
            if declared and declared != digest.hexdigest():
                raise InvalidInput(f"the received bytes ({size}) do not hash to the declared content_sha256: "
                                   "corrupted in transit or a wrong digest; nothing stored")
            principal = auth.current_principal()
            source = header.source or (principal.name if principal else "")
            if len(source) > 64 or not source.isprintable():
                raise InvalidInput("source must be at most 64 printable characters")
            result = self.archive.ingest.ingest_file(
                path, source_ae=source, expected_sop_uid=header.expected_sop_instance_uid or None,
                actor=_actor(context), owned=True)
        finally:
            path.unlink(missing_ok=True)
        log.debug("gRPC Store by %s: %s (%d bytes, duplicate=%s)", source, result.sop_uid, size, result.duplicate)
        return pb.StoreResponse(
            sop_instance_uid=result.sop_uid, sop_class_uid=result.sop_class_uid, study_instance_uid=result.study_uid,
            version=result.version, content_sha256=result.content_sha256, size=result.size,
            duplicate=result.duplicate, missing_replicas=list(result.missing_replicas))

    # -- Retrieve --------------------------------------------------------------
    @_streaming
    def Retrieve(self, request: pb.RetrieveRequest, context: Any) -> Iterator[pb.RetrieveResponse]:
        target = request.WhichOneof("target")
        if target is None:
            raise InvalidInput("set one of sop_instance_uid, series_instance_uid, study_instance_uid")
        level, keyword = _RETRIEVE_TARGETS[target]
        uid = _uid(getattr(request, target), keyword)
        retrieve = self.archive.retrieve
        refs = retrieve.select(level, self.archive.query.conditions(level, {keyword: uid}))
        if not refs:
            raise NotFound(f"no instance with {keyword} {uid} is in the archive")
        chunk = max(_MIN_CHUNK, min(request.chunk_size or CHUNK_SIZE, self.cfg.max_message_bytes - 1024))
        op = "grpc-retrieve-peer" if request.local_only else "grpc-retrieve"
        with retrieve.transfer(refs, _actor(context), op=op) as xfer:
            for i, ref in enumerate(refs):
                if not context.is_active():
                    log.info("gRPC Retrieve of %s %s cancelled by the client after %d of %d", keyword, uid, i,
                             len(refs))
                    return
                try:
                    with retrieve.open_verified(ref.sop_uid, local_only=request.local_only) as inst:
                        yield pb.RetrieveResponse(header=pb.InstanceHeader(
                            sop_instance_uid=ref.sop_uid, sop_class_uid=ref.sop_class_uid,
                            study_instance_uid=ref.study_uid, transfer_syntax_uid=ref.transfer_syntax_uid,
                            size=inst.size, content_sha256=inst.content_sha256, index=i, count=len(refs)))
                        with open(inst.path, "rb") as fh:
                            while data := fh.read(chunk):
                                yield pb.RetrieveResponse(chunk=data)
                except VnaError:
                    xfer.sent(False)
                    raise
                xfer.sent(True, inst.size)

    # -- Query -----------------------------------------------------------------
    @staticmethod
    def _identifier(level: QueryLevel, keys: Mapping[str, str]) -> dict[str, str]:
        for kw in keys:
            if kw not in ("ModalitiesInStudy",) and tag_for_keyword(kw) is None:
                raise InvalidInput(f"{kw!r} is not a DICOM keyword")
        ident = dict(keys) if keys else {k: "" for k in (*_own_keys(level), *COMPUTED_KEYS[level])}
        for lv in _LEVEL_ORDER[: _LEVEL_ORDER.index(level) + 1]:
            if level is not QueryLevel.PATIENT and lv is QueryLevel.PATIENT:
                continue  # study root: the patient is not a level above
            ident.setdefault(UNIQUE_KEY[lv], "")
        return ident

    @staticmethod
    def _fingerprint(level: QueryLevel, ident: Mapping[str, str]) -> str:
        text = json.dumps([level.value, sorted(ident.items())])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @_unary
    def Query(self, request: pb.QueryRequest, context: Any) -> pb.QueryResponse:
        level = _LEVELS.get(request.level)
        if level is None:
            raise InvalidInput("level must be PATIENT, STUDY, SERIES or INSTANCE")
        ident = self._identifier(level, dict(request.keys))
        size = min(request.page_size or _PAGE_SIZE, _MAX_PAGE_SIZE)
        fingerprint = self._fingerprint(level, ident)
        offset = 0
        if request.page_token:
            try:
                token = json.loads(base64.urlsafe_b64decode(request.page_token.encode("ascii")))
                offset, fp = int(token["o"]), str(token["q"])
            except (ValueError, KeyError, TypeError, UnicodeError) as exc:
                raise InvalidInput(f"page_token is not one this server issued: {exc}") from None
            if fp != fingerprint or offset < 0:
                raise InvalidInput("page_token belongs to another query")
        rows = list(islice(self.archive.query.find(level, ident, limit=offset + size + 1, actor=_actor(context)),
                           offset, None))
        out = pb.QueryResponse(unreachable_sites=self.archive.query.unreachable_sites())
        for row in rows[:size]:
            out.matches.add().attributes.update(row)
        if len(rows) > size:
            out.next_page_token = base64.urlsafe_b64encode(
                json.dumps({"o": offset + size, "q": fingerprint}).encode()).decode("ascii")
        return out

    # -- GetStudyMetadata -------------------------------------------------------
    @_unary
    def GetStudyMetadata(self, request: pb.StudyRequest, context: Any) -> pb.StudyMetadata:
        uid = _uid(request.study_instance_uid, "StudyInstanceUID")
        index = self.archive.index
        records = index.study_instances(uid)
        if not records:
            raise NotFound(f"study {uid} is not in the archive")
        self.archive.audit.record(INSTANCES_ACCESSED, "R", _actor(context), study_uids=[uid],
                                  patient_ids=sorted({r.attrs.get("PatientID", "") for r in records}),
                                  details={"op": "grpc-metadata", "instances": len(records)})
        out = pb.StudyMetadata(study_instance_uid=uid, held=index.is_held(uid))
        out.attributes.update(_pick(records[0], (*LEVEL_KEYS[QueryLevel.PATIENT], *LEVEL_KEYS[QueryLevel.STUDY])))
        series: dict[str, pb.SeriesMetadata] = {}
        availability = []
        for rec in records:
            s = series.get(rec.series_uid)
            if s is None:
                s = series[rec.series_uid] = out.series.add(series_instance_uid=rec.series_uid)
                s.attributes.update(_pick(rec, LEVEL_KEYS[QueryLevel.SERIES]))
            avail = _availability([(p.tier, p.state) for p in index.placements(rec.sop_uid, rec.version)])
            availability.append(avail)
            inst = s.instances.add(
                sop_instance_uid=rec.sop_uid, sop_class_uid=rec.sop_class_uid,
                transfer_syntax_uid=rec.transfer_syntax_uid, version=rec.version, size=rec.content_size,
                content_sha256=rec.content_sha256, received_at=rec.received_at, availability=avail)
            inst.attributes.update(_pick(rec, LEVEL_KEYS[QueryLevel.IMAGE]))
        out.availability = _worst(availability)
        return out


def _own_keys(level: QueryLevel) -> tuple[str, ...]:
    """The stored keys of ``level`` and the levels above (patient keys at every level)."""
    keys: list[str] = []
    for lv in _LEVEL_ORDER[: _LEVEL_ORDER.index(level) + 1]:
        keys.extend(LEVEL_KEYS[lv])
    return tuple(keys)


def _pick(rec: InstanceRecord, keys: tuple[str, ...]) -> dict[str, str]:
    out = {k: rec.attrs.get(k, "") for k in keys}
    out.update({k: v for k, v in (("StudyInstanceUID", rec.study_uid), ("SeriesInstanceUID", rec.series_uid),
                                  ("SOPInstanceUID", rec.sop_uid), ("SOPClassUID", rec.sop_class_uid)) if k in keys})
    return out


class LifecycleServicer:
    """``vna.v1.Lifecycle``: Plan, Run, GetStatus, SetHold (the ``vna lifecycle`` jobs)."""

    def __init__(self, archive: Archive, cfg: Config) -> None:
        self.archive = archive
        self.cfg = cfg
        self._gate = _Gate("lifecycle run")

    @_unary
    def Plan(self, request: pb.PlanRequest, context: Any) -> pb.LifecyclePlan:
        plans = self.archive.migrator().plan(request.limit or None)
        out = pb.LifecyclePlan(instances=sum(p.instances for p in plans), hot_bytes=sum(p.hot_bytes for p in plans))
        for p in plans:
            out.studies.add(study_instance_uid=p.study_uid, instances=p.instances, hot_bytes=p.hot_bytes)
        return out

    @_unary
    def Run(self, request: pb.JobRequest, context: Any) -> pb.JobReport:
        with self._gate:
            principal = auth.current_principal()
            log.info("lifecycle run requested over gRPC by %s (limit %s, dry run %s)",
                     principal.name if principal else "?", request.limit or self.cfg.lifecycle.batch_limit,
                     request.dry_run)
            report = self.archive.migrator().run_once(
                limit=request.limit or self.cfg.lifecycle.batch_limit, dry_run=request.dry_run)
        return _job_report(report)

    def _status(self, uid: str) -> pb.LifecycleStatus:
        index = self.archive.index
        records = index.study_instances(uid)
        if not records:
            raise NotFound(f"study {uid} is not in the archive")
        hot = cold = 0
        availability = []
        for rec in records:
            states = [(p.tier, p.state) for p in index.placements(rec.sop_uid, rec.version)]
            ok = {tier for tier, state in states if state is PlacementState.OK}
            hot += Tier.HOT in ok
            cold += Tier.COLD in ok
            availability.append(_availability(states))
        return pb.LifecycleStatus(
            study_instance_uid=uid, held=index.is_held(uid), instances=len(records), hot_instances=hot,
            cold_instances=cold, availability=_worst(availability),
            last_received=max(r.received_at for r in records))

    @_unary
    def GetStatus(self, request: pb.StudyRequest, context: Any) -> pb.LifecycleStatus:
        return self._status(_uid(request.study_instance_uid, "StudyInstanceUID"))

    @_unary
    def SetHold(self, request: pb.HoldRequest, context: Any) -> pb.LifecycleStatus:
        uid = _uid(request.study_instance_uid, "StudyInstanceUID")
        self.archive.set_hold(uid, request.held, request.reason, _actor(context))
        principal = auth.current_principal()
        log.info("legal hold on study %s %s over gRPC by %s", uid, "placed" if request.held else "lifted",
                 principal.name if principal else "?")
        return self._status(uid)


class IntegrityServicer:
    """``vna.v1.Integrity``: Scrub (detection only) and GetReport."""

    def __init__(self, archive: Archive, cfg: Config) -> None:
        self.archive = archive
        self.cfg = cfg
        self._gate = _Gate("scrub")

    @_unary
    def Scrub(self, request: pb.ScrubRequest, context: Any) -> pb.JobReport:
        from vna.integrity.scrubber import Scrubber, VerifyLevel

        ic = self.cfg.integrity
        try:
            level = VerifyLevel(request.level or ic.verify_level)
            tier = Tier(request.tier) if request.tier else None
        except ValueError as exc:
            raise InvalidInput(f"bad scrub request: {exc}") from None
        if request.store_id and not any(s.store_id == request.store_id
                                        for acc in self.archive.tiers.values() for s in acc.stores):
            raise InvalidInput(f"no store {request.store_id!r} is configured")
        with self._gate:
            job = Scrubber(self.archive.index, self.archive.tiers, level=level,
                           objects_per_second=ic.objects_per_second, bytes_per_second=ic.bytes_per_second,
                           tier=tier, store_id=request.store_id or None)
            report = job.run_once(limit=request.limit or ic.batch_limit, dry_run=request.dry_run)
        log.info("%s", report.summary())  # the job logs no summary of its own (the caller does, once)
        return _job_report(report)

    @_unary
    def GetReport(self, request: pb.ReportRequest, context: Any) -> pb.IntegrityReport:
        from vna.integrity.report import integrity_report

        rep = integrity_report(self.archive.index, self.archive.tiers, max_items=request.max_items or 100,
                               copies=self.archive.copies)
        out = pb.IntegrityReport(generated_at=rep["generated_at"], instance_versions=rep["instance_versions"],
                                 findings=rep["findings"], single_copy=rep["single_copy"]["count"],
                                 report_json=json.dumps(rep))
        for target, section in ((out.tiers, rep["tiers"]), (out.stores, rep["stores"])):
            for name, c in sorted(section.items()):
                counts = target.add(name=name, tier=c.get("tier", name), placements=c["placements"],
                                    stored_bytes_ok=c["stored_bytes_ok"])
                counts.by_state.update(c["by_state"])
                counts.verified.update(c["verified"])
                if c["oldest_verified_at"] is not None:
                    counts.oldest_verified_at = c["oldest_verified_at"]
                if c["newest_verified_at"] is not None:
                    counts.newest_verified_at = c["newest_verified_at"]
        for problems, key in ((out.damaged, "damaged"), (out.lost, "lost"), (out.under_replicated, "under_replicated")):
            problems.count = rep[key]["count"]
            for item in rep[key]["items"]:
                p = problems.items.add(sop_instance_uid=item["sop_uid"], version=item["version"])
                p.fields.update({k: json.dumps(v) if isinstance(v, dict) else ("" if v is None else str(v))
                                 for k, v in item.items() if k not in ("sop_uid", "version")})
        return out


class IndexHealth:
    """``grpc.health.v1.Health``: SERVING while the index answers, NOT_SERVING otherwise.

    ``Check`` probes the index (at most every ``probe_interval`` seconds); a
    background thread probes too, so that ``Watch`` streams follow.
    """

    def __init__(self, archive: Archive, probe_interval: float = 1.0, watch_interval: float = 5.0) -> None:
        self.archive = archive
        self.servicer = health.HealthServicer()
        self.probe_interval = probe_interval
        self.watch_interval = watch_interval
        self._last = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="vna-grpc-health", daemon=True)

    def probe(self) -> bool:
        """Ask the index something cheap; set every service's status from the answer."""
        try:
            self.archive.index.get_instance("0")
            ok = True
        except VnaError as exc:
            log.warning("gRPC health: the index does not answer: %s", exc)
            ok = False
        status = health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *SERVICE_NAMES):
            self.servicer.set(name, status)
        self._last = time.monotonic()
        return ok

    def Check(self, request: Any, context: Any) -> Any:
        with self._lock:
            if time.monotonic() - self._last >= self.probe_interval and not self._stop.is_set():
                self.probe()
        return self.servicer.Check(request, context)

    def Watch(self, request: Any, context: Any, **kwargs: Any) -> Any:
        return self.servicer.Watch(request, context, **kwargs)

    def List(self, request: Any, context: Any) -> Any:
        with self._lock:
            if time.monotonic() - self._last >= self.probe_interval and not self._stop.is_set():
                self.probe()
        return self.servicer.List(request, context)

    def start(self) -> None:
        self.probe()
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.watch_interval):
            with self._lock:
                self.probe()

    def stop(self) -> None:
        """NOT_SERVING from now on (load balancers drain), then stop probing."""
        self._stop.set()
        with self._lock:
            self.servicer.enter_graceful_shutdown()
        self._thread.join(5)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from exc


class GrpcServer:
    """The archive's gRPC API on ``grpc.host:grpc.port`` (TLS / mutual TLS from config).

    With ``reuse_port`` several processes serve the same port (SO_REUSEPORT,
    the kernel spreads connections); without it a port already in use is an
    error. ``start`` raises ConfigError if the port cannot be bound or a
    certificate cannot be read.
    """

    def __init__(self, archive: Archive, cfg: Config, *, reuse_port: bool = False) -> None:
        self.archive = archive
        self.cfg = cfg
        self.gcfg = cfg.grpc
        self.reuse_port = reuse_port
        self.port = 0
        self.health = IndexHealth(archive)
        self._server: Any = None
        self._pool: ThreadPoolExecutor | None = None

    def _credentials(self) -> Any:
        g = self.gcfg
        if not g.tls_cert:
            return None
        cert = _read(self.cfg.resolve(g.tls_cert), "grpc.tls_cert")
        key = _read(self.cfg.resolve(g.tls_key), "grpc.tls_key")
        ca = _read(self.cfg.resolve(g.client_ca), "grpc.client_ca") if g.client_ca else None
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)

    @property
    def address(self) -> str:
        host = self.gcfg.host
        return f"[{host}]:{self.gcfg.port}" if ":" in host else f"{host}:{self.gcfg.port}"

    def start(self) -> int:
        """Bind and serve in background threads; returns the bound port."""
        g = self.gcfg
        credentials = self._credentials()
        self._pool = ThreadPoolExecutor(max_workers=g.max_workers, thread_name_prefix="vna-grpc")
        options = [
            ("grpc.max_receive_message_length", g.max_message_bytes),
            ("grpc.max_send_message_length", g.max_message_bytes),
            ("grpc.so_reuseport", 1 if self.reuse_port else 0),
        ]
        interceptors = [ObservingInterceptor(self.archive.telemetry),
                        auth.AuthInterceptor(auth.TokenAuthenticator(g.token), self.archive.audit)]
        server = grpc.server(self._pool, interceptors=interceptors,
                             options=options, maximum_concurrent_rpcs=g.max_workers * 4)
        spool = self.cfg.resolve("spool/grpc")
        pb_grpc.add_ArchiveServicer_to_server(ArchiveServicer(self.archive, g, spool), server)
        pb_grpc.add_LifecycleServicer_to_server(LifecycleServicer(self.archive, self.cfg), server)
        pb_grpc.add_IntegrityServicer_to_server(IntegrityServicer(self.archive, self.cfg), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        try:
            port = server.add_secure_port(self.address, credentials) if credentials is not None \
                else server.add_insecure_port(self.address)
        except RuntimeError as exc:
            port = 0
            reason = str(exc)
        else:
            reason = "in use or not allowed"
        if not port:
            self._pool.shutdown(wait=False)
            raise ConfigError(f"gRPC cannot listen on {self.address}: {reason}")
        self.health.start()
        server.start()
        self._server = server
        self.port = int(port)
        mode = "off" if credentials is None else "mutual" if g.client_ca else "on"
        log.info("gRPC API listening on %s (TLS %s, %d tokens, %d workers)", self.address, mode, len(g.token),
                 g.max_workers)
        if credentials is None and not is_loopback(g.host):
            log.warning("gRPC on %s without TLS: bearer tokens cross the network in clear text "
                        "(set grpc.tls_cert and grpc.tls_key)", self.address)
        return self.port

    @property
    def serving(self) -> bool:
        """True between ``start`` and ``stop``."""
        return self._server is not None

    def stop(self, grace: float = 30.0) -> None:
        """Report NOT_SERVING, refuse new calls, let running ones finish for up to ``grace`` seconds."""
        if self._server is None:
            return
        self.health.stop()
        self._server.stop(grace).wait(grace + 5)
        self._server = None
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
