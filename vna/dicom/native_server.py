"""The DIMSE port served by the native core (``dicom.receiver = "native"``): Rust owns the wire, Python decides.

The native listener (crates/vna-core) negotiates associations, answers C-ECHO,
and spools each C-STORE data set exactly as the Python receiver does
(preamble, File Meta, data set bytes as received), hashing it while spooling.
Python is called once per association (the calling AE allowlist) and once per
received instance (``ingest_file``, as ``DicomServer.on_store``); the native side
writes the C-STORE-RSP and removes the spool file unless ingest adopted it.

Query/Retrieve (Patient and Study Root FIND, GET, MOVE) and Storage Commitment:
the native side parses the request and hands Python its data set; Python decodes
it (pydicom), queries or selects, and answers -- C-FIND matches as encoded
identifiers, C-GET/C-MOVE as a job (:class:`_Retrieval`) that names each
instance's candidate copies; the native side verifies a copy's SHA-256 before its
last byte goes out, sends the sub-operations and counts them. The Storage
Commitment report goes out as with ``DicomServer`` (vna/dicom/commitment.py).
The TLS port is served next to it by ``DicomServer`` (pynetdicom; ``vna serve`` composes
both). A C-MOVE to a ``tls = true`` destination goes over TLS with the settings of
vna/dicom/tls.py (:func:`~vna.dicom.tls.client_files`).
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from contextlib import ExitStack
from io import BytesIO
from pathlib import Path
from typing import Any, Callable, Iterator

import pynetdicom
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import AE
from pynetdicom.dsutils import decode, encode
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from vna.archive import Archive
from vna.audit import LOGIN, USER_AUTHENTICATION, Actor
from vna.checksum import sha256_file
from vna.config import DicomConfig, RemoteAE
from vna.dicom import native, status as st
from vna.dicom.assoc_log import OncePerName
from vna.dicom.commitment import Connector, StorageCommitment, StorageCommitmentPushModel
from vna.dicom.contexts import other_service_classes, storage_classes, storage_syntaxes
from vna.dicom.qr import UNIQUE_KEYS, identifier_map, move_contexts, query_level, response
from vna.dicom.tls import client_files
from vna.domain import Placement
from vna.errors import AuditUnavailable, ConfigError, InvalidInput, VnaError
from vna.services.ingest import Spooled
from vna.services.retrieve import InstanceRef, Transfer
from vna.transfer_audit import AssociationAudit, TransferAudit, journal_dir

__all__ = ["NativeDicomServer", "supported_contexts", "unknown_storage"]

log = logging.getLogger(__name__)

Verification = UID("1.2.840.10008.1.1")
# as vna.dicom.server announces them (that module is not imported here: it configures pynetdicom)
IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.10.1137.0.1"
IMPLEMENTATION_VERSION_NAME = "VNA_010"
# A-ASSOCIATE-RJ (result, source, reason), PS3.8 9.3.4: rejected-permanent, service-user, calling AE not recognized
_CALLING_AE_NOT_RECOGNIZED = (1, 1, 3)

ContextSpec = tuple[str, list[str], "tuple[bool, bool] | None", bool]
UnknownSpec = tuple[list[str], "tuple[bool, bool] | None", list[str]]
# the Patient Root and Study Root FIND, MOVE and GET models, as DicomServer serves them
QR_MODELS = ("1.2.840.10008.5.1.4.1.2.1.1", "1.2.840.10008.5.1.4.1.2.1.2", "1.2.840.10008.5.1.4.1.2.1.3",
             "1.2.840.10008.5.1.4.1.2.2.1", "1.2.840.10008.5.1.4.1.2.2.2", "1.2.840.10008.5.1.4.1.2.2.3")
_LITTLE_ENDIAN = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")
# errors of a malformed identifier while pydicom decodes it
_DECODE_ERRORS = (InvalidInput, AttributeError, ValueError, TypeError, KeyError, EOFError, OverflowError)


def supported_contexts() -> list[ContextSpec]:
    """Verification, the storage SOP classes ``DicomServer`` accepts by name (pynetdicom's list and the
    retired ones), Query/Retrieve and Storage Commitment, with its transfer syntaxes and roles, as
    (abstract syntax, our syntaxes in order of preference, roles or None, is storage) -- built with
    pynetdicom's public API."""
    ae = AE()
    ae.add_supported_context(Verification)
    syntaxes = storage_syntaxes()
    for uid in storage_classes():
        ae.add_supported_context(uid, syntaxes, scu_role=True, scp_role=True)
    for uid in [*map(UID, QR_MODELS), StorageCommitmentPushModel]:
        ae.add_supported_context(uid)
    not_storage = {Verification, StorageCommitmentPushModel, *QR_MODELS}
    out: list[ContextSpec] = []
    for cx in ae.supported_contexts:
        roles = None if cx.scu_role is None or cx.scp_role is None else (bool(cx.scu_role), bool(cx.scp_role))
        out.append((str(cx.abstract_syntax), [str(ts) for ts in cx.transfer_syntax], roles,
                    cx.abstract_syntax not in not_storage))
    return out


def unknown_storage() -> UnknownSpec:
    """``dicom.accept_unknown_storage_classes`` for the native listener, the rule of
    :class:`vna.dicom.contexts.UnknownStorage`: a proposed abstract syntax that is a valid UID, not
    supported by name and not a SOP class pynetdicom knows for another service is accepted as storage,
    with the storage transfer syntaxes and both roles (C-STORE in, C-GET sub-operations out).

    Returns (our transfer syntaxes, (requestor may be SCU, requestor may be SCP), refused abstract syntaxes).
    Nothing is registered process-wide (the native side keeps such a context for its association only),
    so ``MAX_UNKNOWN_CLASSES`` does not apply.
    """
    return [str(ts) for ts in storage_syntaxes()], (True, True), other_service_classes()


def _decode(data: bytes, transfer_syntax: str) -> Dataset:
    ts = UID(transfer_syntax)
    return decode(BytesIO(data), ts.is_implicit_VR, ts.is_little_endian, ts.is_deflated)


def _encode(ds: Dataset, transfer_syntax: str) -> bytes:
    ts = UID(transfer_syntax)
    out = encode(ds, ts.is_implicit_VR, ts.is_little_endian, ts.is_deflated)
    if out is None:
        raise ValueError(f"the identifier cannot be encoded in {transfer_syntax}")
    return out


def _failed_list(uids: list[str], transfer_syntax: str) -> bytes:
    """An identifier with the Failed SOP Instance UID List, as pynetdicom ends a C-GET/C-MOVE."""
    ds = Dataset()
    ds.FailedSOPInstanceUIDList = uids
    return _encode(ds, transfer_syntax)


_Destination = tuple[str, int, str, str, list[tuple[str, list[str]]],
                     tuple[str | None, tuple[str, str] | None] | None]


class _Retrieval:
    """One C-GET or C-MOVE for the native sender: the selected instances, each with its candidate copies
    (this site's plain local files, verified by the native side), and the audit of the transfer."""

    def __init__(self, server: NativeDicomServer, req: Any, refs: list[InstanceRef], actor: Actor,
                 dest: tuple[RemoteAE, str] | None) -> None:
        self.retrieve = server.archive.retrieve
        self.refs = refs
        self.ts = str(req.transfer_syntax_uid)
        self.op = str(req.kind)
        self.dest = dest
        self.ae_title = server.cfg.ae_title
        self._archive_cfg = server.archive.cfg
        self._stack = ExitStack()   # the transfer (audit) until close()
        self._open = ExitStack()    # the current instance's fallback copy, until the next one
        dest_actor = Actor(dest[1], "ae", f"{dest[0].host}:{dest[0].port}") if dest is not None else None
        self.xfer: Transfer = self._stack.enter_context(
            self.retrieve.transfer(refs, actor, op=self.op, destination=dest_actor))
        self._i = 0                  # refs handed out so far
        self._copies: dict[int, list[tuple[Placement, Path]]] = {}   # the last batch's candidates, by position
        self._open_at = -1           # the position whose fallback or re-encoded copies _open holds
        self.on_close: Callable[[int], None] | None = None   # given the final status (as the native side answers)

    def count(self) -> int:
        return len(self.refs)

    def destination(self) -> _Destination | None:
        """(host, port, called AE, calling AE, contexts, TLS settings or None) of a C-MOVE (vna_native.pyi)."""
        if self.dest is None:
            return None
        remote, name = self.dest
        tls = client_files(self._archive_cfg) if remote.tls else None
        return remote.host, remote.port, name, self.ae_title, move_contexts(self.refs), tls

    def next_batch(self, n: int) -> list[tuple[str, str, str, list[tuple[str, str, int]]]]:
        """The next ``n`` (fewer at the end, none when done) instances with their candidate copies, read
        from the index at once; the native side sends them in order, at positions ``self._i`` onwards."""
        self._open.close()
        self._open_at = -1
        refs = self.refs[self._i:self._i + max(1, n)]
        first, self._i = self._i, self._i + len(refs)
        copies = self.retrieve.local_copies_many([r.sop_uid for r in refs])
        self._copies = {first + k: copies[r.sop_uid] for k, r in enumerate(refs)}
        return [(r.sop_class_uid, r.sop_uid, r.transfer_syntax_uid,
                 [(str(path), p.content_sha256, p.content_size) for p, path in self._copies[first + k]])
                for k, r in enumerate(refs)]

    def bad_copy(self, position: int, index: int, why: str, fault: str) -> None:
        self.retrieve.mark_bad(self._copies[position][index][0], fault, why)

    def _current(self, position: int) -> InstanceRef:
        """The instance at ``position``; what was opened for an earlier one is released."""
        if position != self._open_at:
            self._open.close()
            self._open_at = position
        return self.refs[position]

    def fallback(self, position: int) -> tuple[str, str, int] | None:
        """A copy verified by :meth:`RetrieveService.open_verified` (cold, remote, encoded ones)."""
        uid = self._current(position).sop_uid
        try:
            inst = self._open.enter_context(self.retrieve.open_verified(uid))
        except VnaError as exc:
            log.error("retrieve of %s failed: %s", uid, exc)
            return None
        return str(inst.path), inst.content_sha256, inst.size

    def convert(self, position: int, transfer_syntax: str) -> tuple[str, str, int] | None:
        """A verified copy of the instance at ``position`` re-encoded by pydicom (as pynetdicom sends a decoded
        Dataset): in another little-endian uncompressed syntax when the stored one was not accepted, or in
        its stored syntax when the native sender declines the stored bytes as they are (an odd-length
        deflated data set). A temporary Part 10 file, removed once another instance is worked on."""
        ref = self._current(position)
        uid = ref.sop_uid
        if transfer_syntax not in _LITTLE_ENDIAN and transfer_syntax != ref.transfer_syntax_uid:
            return None
        try:
            with self.retrieve.open_verified(uid) as inst:
                ds = dcmread(inst.path)
            ds.file_meta.TransferSyntaxUID = UID(transfer_syntax)
            fd, name = tempfile.mkstemp(dir=self.retrieve.spool_dir, suffix=".dcm")
            os.close(fd)
            self._open.callback(Path(name).unlink, missing_ok=True)
            if transfer_syntax in _LITTLE_ENDIAN:
                ds.save_as(name, implicit_vr=transfer_syntax == _LITTLE_ENDIAN[0], little_endian=True,
                           enforce_file_format=True)
            else:  # the stored syntax: pydicom encodes it (a deflated data set padded to even length)
                ds.save_as(name, enforce_file_format=True)
            sha, size = sha256_file(Path(name))
        except VnaError as exc:
            log.error("retrieve of %s failed: %s", uid, exc)
            return None
        except (OSError, ValueError) as exc:
            log.error("could not re-encode %s in %s: %s", uid, transfer_syntax, exc)
            return None
        return name, sha, size

    def sent(self, results: list[tuple[bool, int, int | None]]) -> None:
        """Sub-operations' results, in order: (Success or Warning, data set bytes sent, the peer's status)."""
        for ok, size, _status in results:
            self.xfer.sent(ok, size)

    def failed_identifier(self, uids: list[str]) -> bytes:
        return _failed_list(uids, self.ts)

    def close(self) -> None:
        try:
            self._open.close()
        finally:
            self._stack.close()
            if self.on_close is not None:
                x = self.xfer
                self.on_close(st.SUCCESS if not x.failed else st.SUBOPS_FAILED if not x.completed else 0xB000)


class NativeDicomServer:
    """The archive's C-ECHO and C-STORE SCP on the native listener; the interface ``DicomServer``
    offers ``vna serve`` (start, stop, listening).

    Raises ConfigError when the extension is not built. ``tls_port`` is not its own: ``vna serve``
    serves it with ``DicomServer(tls_only=True)`` next to this one.
    """

    def __init__(self, archive: Archive, cfg: DicomConfig, *, reuse_port: bool = False) -> None:
        self._native = native.load()
        self.archive = archive
        self.cfg = cfg
        self.reuse_port = reuse_port
        self._contexts = supported_contexts()
        self._unknown = unknown_storage() if cfg.accept_unknown_storage_classes else None
        self._unknown_dest = OncePerName()  # an unknown C-MOVE destination is logged once an hour per name
        self.commitment = StorageCommitment(archive, cfg, Connector(archive),
                                            implementation_class_uid=IMPLEMENTATION_CLASS_UID,
                                            implementation_version_name=IMPLEMENTATION_VERSION_NAME)
        self._spool_dir = archive.cfg.resolve("spool/incoming")
        self._spool_dir.mkdir(parents=True, exist_ok=True)
        self._listener: Any = None
        # the association's span and C-STORE audit while its native thread runs (one thread per association)
        self._assoc = threading.local()
        self.transfers = TransferAudit(archive.audit, journal_dir(archive.cfg.resolve("audit")),
                                       archive.cfg.audit.transfer_flush_interval)

    def start(self) -> None:
        """Bind and accept in native threads. Raises OSError when the port cannot be bound."""
        cfg = self.cfg
        self.transfers.start()
        self._listener = self._native.Listener(
            host=cfg.host, port=cfg.port, reuse_port=self.reuse_port, max_pdu=cfg.max_pdu,
            max_associations=cfg.max_associations, max_half_open=cfg.max_half_open_connections,
            max_per_address=cfg.max_connections_per_address, acse_timeout=cfg.acse_timeout,
            network_timeout=cfg.network_timeout, dimse_timeout=cfg.dimse_timeout, spool_dir=str(self._spool_dir),
            implementation_class_uid=IMPLEMENTATION_CLASS_UID, implementation_version=IMPLEMENTATION_VERSION_NAME,
            spool_implementation_uid=str(pynetdicom.PYNETDICOM_IMPLEMENTATION_UID),
            spool_implementation_version=str(pynetdicom.PYNETDICOM_IMPLEMENTATION_VERSION),
            contexts=self._contexts, on_associate=self.on_associate, on_store=self.on_store,
            on_request=self.on_request, on_log=self._on_log, on_thread_done=self._thread_done,
            unknown_storage=self._unknown)
        log.info("native DICOM receiver listening on %s:%d", cfg.host, self._listener.port)
        self.archive.telemetry.gauge("vna.dicom.connections", "{connection}",
                                     "connections of the DICOM port now, by state (half_open, associated)",
                                     self._connection_counts)
        self.archive.telemetry.start_endpoint()

    def _connection_counts(self) -> list[tuple[float, dict[str, str]]]:
        listener = self._listener
        half_open, associated = listener.connection_counts() if listener is not None else (0, 0)
        return [(float(half_open), {"state": "half_open"}), (float(associated), {"state": "associated"})]

    @property
    def listening(self) -> bool:
        """True while the listening socket is open (started and not stopped)."""
        return self._listener is not None and bool(self._listener.listening)

    def stop(self, grace: float = 30.0) -> None:
        """Stop accepting, let running C-STOREs finish (up to ``grace`` s), abort the associations."""
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.stop(grace)
        self.transfers.close()

    # -- callbacks from the native threads ---------------------------------------------
    def on_associate(self, calling_ae: str, called_ae: str, address: str, port: int) -> tuple[int, int, int] | None:
        """None to accept; (result, source, reason) to reject. A calling AE outside
        ``allowed_calling_aes`` is an authentication failure (audited)."""
        allowed = self.cfg.allowed_calling_aes
        if not allowed or calling_ae in allowed:
            tel = self.archive.telemetry
            tel.dimse_associations.add(1, {"result": "accepted"})
            tel.dimse_associations_open.add(1)
            self._assoc.span = tel.start_span("dimse.association", {
                "dicom.calling_ae": calling_ae.strip(), "dicom.called_ae": self.cfg.ae_title,
                "net.peer.ip": address, "net.peer.port": port}, kind=SpanKind.SERVER)
            self._assoc.open = True
            return None
        reason = "calling AE title not recognised"
        self.archive.telemetry.dimse_associations.add(1, {"result": "rejected"})
        log.warning("association from %s (%s) rejected: %s", calling_ae, address, reason)
        try:
            self.archive.audit.record(USER_AUTHENTICATION, "E", Actor(calling_ae, "ae", address), outcome=4,
                                      event_type=LOGIN, details={"reason": reason, "called_ae": self.cfg.ae_title})
        except AuditUnavailable as exc:
            log.error("authentication failure of %s not audited: %s", calling_ae, exc)
        return _CALLING_AE_NOT_RECOGNIZED

    def _thread_done(self) -> None:
        """An association's native thread ends: its C-STORE audit records are written, its span ends, it
        is no longer open; the index releases what the thread held."""
        transfer: AssociationAudit | None = getattr(self._assoc, "transfer", None)
        if transfer is not None:
            self._assoc.transfer = None
            transfer.close()
        if getattr(self._assoc, "open", False):
            self._assoc.open = False
            self.archive.telemetry.dimse_associations_open.add(-1)
            span, self._assoc.span = self._assoc.span, None
            if span is not None:
                span.end()
        self.archive.index.release_thread()

    def _assoc_span(self) -> Span | None:
        """The span of the association whose thread calls."""
        span: Span | None = getattr(self._assoc, "span", None)
        return span

    def on_store(self, record: Any) -> tuple[int, str | None]:
        """C-STORE: ingest the spooled file; Success only once durable and indexed. With telemetry, in a
        ``dimse.c-store`` span that starts when receiving began, counted and timed as ``DicomServer`` does.

        Returns (status, error comment) for the C-STORE-RSP.
        """
        tel = self.archive.telemetry
        if not tel.enabled:
            return self._store(record)
        t0 = time.perf_counter()
        status = st.UNABLE_TO_PROCESS
        with tel.span("dimse.c-store", kind=SpanKind.SERVER, start_ns=record.started_ns,
                      parent=self._assoc_span()) as span:
            try:
                status, comment = self._store(record)
                return status, comment
            finally:
                text = f"0x{status:04X}"
                if span is not None:
                    span.set_attribute("dicom.status", text)
                    if status != st.SUCCESS and status >> 12 != 0xB:
                        span.set_status(Status(StatusCode.ERROR, text))
                tel.dimse_operations.add(1, {"op": "c-store", "status": text})
                tel.dimse_duration.record(time.perf_counter() - t0, {"op": "c-store"})

    def _store(self, record: Any) -> tuple[int, str | None]:
        actor = Actor(record.calling_ae, "ae", record.address)
        transfer: AssociationAudit | None = getattr(self._assoc, "transfer", None)
        if transfer is None:   # the association's first C-STORE
            transfer = self._assoc.transfer = self.transfers.association(actor)
        try:
            self.archive.ingest.ingest_file(
                Path(record.path), source_ae=record.calling_ae, expected_sop_uid=record.sop_instance_uid,
                expected_sop_class=record.sop_class_uid, actor=actor, transfer=transfer,
                owned=True, spooled=Spooled(record.sha256, record.size, record.started_ns, record.ended_ns))
            return st.SUCCESS, None
        except VnaError as exc:
            status = st.status_for(exc)
            log.warning("C-STORE from %s refused (0x%04X): %s", record.calling_ae, status, exc)
            return status, str(exc)[:64]

    def on_request(self, req: Any) -> Any:
        """A C-FIND, C-GET, C-MOVE or N-ACTION (see ``vna_native.Listener``): in a ``dimse.<op>`` span,
        counted and timed as ``DicomServer`` does; a C-FIND's matches are an iterator, a retrieve a job
        (whose span ends when the native side closes it) or a final answer."""
        kind = str(req.kind)
        actor = Actor(str(req.calling_ae), "ae", str(req.address))
        t0 = time.perf_counter()
        if kind == "c-find":
            return self._timed_find(self._find(req, actor), t0)
        span = self.archive.telemetry.start_span(f"dimse.{kind}", {"dicom.calling_ae": actor.id},
                                                 kind=SpanKind.SERVER, parent=self._assoc_span())
        status = st.UNABLE_TO_PROCESS
        handed_over = False
        try:
            if kind == "n-action":
                status = self.commitment.request(str(req.requested_sop_class_uid), req.action_type_id,
                                                 lambda: _decode(req.data, req.transfer_syntax_uid), actor)
                return status, None
            answer = self._retrieve(req, actor)
            if isinstance(answer, _Retrieval):   # its span and sample are taken when it is closed
                answer.on_close = lambda status: self._op_done(kind, status, t0, span)
                handed_over = True
                return answer
            status = answer[0]
            return answer
        finally:
            if not handed_over:
                self._op_done(kind, status, t0, span)

    def _op_done(self, op: str, status: int, t0: float, span: Span | None = None) -> None:
        tel = self.archive.telemetry
        text = f"0x{status:04X}"
        if span is not None:
            span.set_attribute("dicom.status", text)
            if status not in (st.SUCCESS, st.PENDING, st.CANCEL) and status >> 12 != 0xB:
                span.set_status(Status(StatusCode.ERROR, text))
            span.end()
        if tel.enabled:
            tel.dimse_operations.add(1, {"op": op, "status": text})
            tel.dimse_duration.record(time.perf_counter() - t0, {"op": op})

    def _timed_find(self, answers: Iterator[tuple[int, bytes | None]], t0: float
                    ) -> Iterator[tuple[int, bytes | None]]:
        status = st.CANCEL   # closed before its final answer: cancelled or cut off
        span = self.archive.telemetry.start_span("dimse.c-find", kind=SpanKind.SERVER, parent=self._assoc_span())
        try:
            for status, identifier in answers:
                yield status, identifier
            if status == st.PENDING:
                status = st.SUCCESS
        finally:
            self._op_done("c-find", status, t0, span)

    def _find(self, req: Any, actor: Actor) -> Iterator[tuple[int, bytes | None]]:
        """C-FIND: one Pending answer (an identifier in the context's syntax) per match."""
        ts = str(req.transfer_syntax_uid)
        try:
            ds = _decode(req.data, ts)
            level = query_level(ds, str(req.sop_class_uid))
            keys = identifier_map(ds)
        except _DECODE_ERRORS as exc:
            log.warning("C-FIND refused: %s", exc)
            yield st.IDENTIFIER_MISMATCH, None
            return
        try:
            for row in self.archive.query.find(level, keys, actor=actor):
                yield st.PENDING, _encode(response(level.value, row, ds), ts)
        except VnaError as exc:
            log.error("C-FIND failed: %s", exc)
            yield st.status_for(exc), None

    def _retrieve(self, req: Any, actor: Actor) -> _Retrieval | tuple[int, tuple[int | None, int, int, int] | None,
                                                                      bytes | None]:
        """C-GET/C-MOVE: a job over the selected instances, or a final answer (a refusal as DicomServer
        answers it: the status with one failed sub-operation and an empty Failed SOP Instance UID List)."""
        kind = str(req.kind)
        ts = str(req.transfer_syntax_uid)
        dest: tuple[RemoteAE, str] | None = None
        if kind == "c-move":
            name = str(req.move_destination or "").strip()
            remote = self.cfg.find_remote(name)
            if remote is None:
                if self._unknown_dest(name):
                    log.warning("C-MOVE to unknown destination %r refused (not in dicom.remote; logged once an hour "
                                "per name)", name)
                return st.MOVE_DESTINATION_UNKNOWN, None, None
            dest = (remote, name)
        try:
            self.archive.audit.require()  # refuse before sending anything
            ds = _decode(req.data, ts)
            level = query_level(ds, str(req.sop_class_uid))
            conds = self.archive.query.conditions(
                level, {k: v for k, v in identifier_map(ds).items() if k in UNIQUE_KEYS})
            if not conds:
                raise InvalidInput("a retrieve needs at least one unique key")
            refs = self.archive.retrieve.select(level, conds)
            return _Retrieval(self, req, refs, actor, dest)
        except _DECODE_ERRORS as exc:
            log.warning("%s refused: %s", kind.upper(), exc)
            status = st.IDENTIFIER_MISMATCH
        except VnaError as exc:
            status = st.status_for(exc)
        return status, (None, 0, 1, 0), _failed_list([], ts)

    @staticmethod
    def _on_log(level: int, message: str) -> None:
        log.log(level, "%s", message)
