"""The DIMSE server: one pynetdicom AE, handlers bound as data, each a thin translation.

Services: Verification, Storage (every storage SOP class pynetdicom knows and the
retired ones, unknown ones if configured -- see contexts.py; all transfer syntaxes
pynetdicom knows; received to a spool file and never decoded),
Patient/Study Root Query/Retrieve FIND/MOVE/GET, Storage Commitment Push Model.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, cast

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, UID
from pynetdicom import AE, _config, build_role, evt
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.transport import ThreadedAssociationServer
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from vna.archive import Archive
from vna.audit import INSTANCES_ACCESSED, LOGIN, USER_AUTHENTICATION, Actor, AuditScope
from vna.config import DicomConfig, RemoteAE
from vna.dicom import dimse_codec, reactor, status as st, uid_cache
from vna.dicom.assoc_log import AssociationLog, OncePerName
from vna.dicom.contexts import Contexts, UnknownStorage, register_retired_storage, storage_classes, storage_syntaxes
from vna.dicom.fast_store import FastStore, spooled_of
from vna.dicom.limits import ConnectionLimits
from vna.dicom.tls import client_context, server_context
from vna.domain import QueryLevel
from vna.errors import AuditUnavailable, InvalidInput, VnaError
from vna.services.retrieve import InstanceRef, Transfer
from vna.telemetry import SeriesKey, series_key

__all__ = ["DicomServer"]

log = logging.getLogger(__name__)

# Receive C-STORE datasets straight to a spool file (no decode), send retrieved
# files without decoding them.
_config.STORE_RECV_CHUNKED_DATASET = True
_config.STORE_SEND_CHUNKED_DATASET = True
# Block instead of polling in the per-association reactor threads (see reactor.py).
reactor.install()
# Validate each distinct UID string once (see uid_cache.py).
uid_cache.install()
# Encode command sets and spool headers without pydicom's generic writer (see dimse_codec.py).
dimse_codec.install()

# SOP classes (PS3.4); spelled out because pynetdicom.sop_class builds them dynamically
Verification = UID("1.2.840.10008.1.1")
StorageCommitmentPushModel = UID("1.2.840.10008.1.20.1")
StorageCommitmentPushModelInstance = UID("1.2.840.10008.1.20.1.1")
PatientRootQueryRetrieveInformationModelFind = UID("1.2.840.10008.5.1.4.1.2.1.1")
PatientRootQueryRetrieveInformationModelMove = UID("1.2.840.10008.5.1.4.1.2.1.2")
PatientRootQueryRetrieveInformationModelGet = UID("1.2.840.10008.5.1.4.1.2.1.3")
StudyRootQueryRetrieveInformationModelFind = UID("1.2.840.10008.5.1.4.1.2.2.1")
StudyRootQueryRetrieveInformationModelMove = UID("1.2.840.10008.5.1.4.1.2.2.2")
StudyRootQueryRetrieveInformationModelGet = UID("1.2.840.10008.5.1.4.1.2.2.3")

# pynetdicom converts between these two when a peer accepted the other one
_LITTLE_ENDIAN = {ImplicitVRLittleEndian, ExplicitVRLittleEndian}
IMPLEMENTATION_CLASS_UID = UID("1.2.826.0.1.3680043.10.1137.0.1")
IMPLEMENTATION_VERSION_NAME = "VNA_010"
_PATIENT_ROOT = {PatientRootQueryRetrieveInformationModelFind, PatientRootQueryRetrieveInformationModelMove,
                 PatientRootQueryRetrieveInformationModelGet}
_UNIQUE_KEYS = {"PatientID", "IssuerOfPatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"}
_SKIP_KEYS = {"QueryRetrieveLevel", "SpecificCharacterSet", "TimezoneOffsetFromUTC"}
_ECHOED_KEYS = ("TimezoneOffsetFromUTC",)
_THREAD_BACKSTOP = 1 << 16  # pynetdicom's maximum_associations: our limits are dicom.max_* (vna/dicom/limits.py)


class FileBackedDataset(Dataset):
    """A placeholder yielded to pynetdicom's C-GET/C-MOVE loops for a stored file.

    pynetdicom's retrieve loops accept only Datasets; :func:`_send_c_store`
    recognises this class and sends the verified file's bytes unchanged.
    """

    def __init__(self, path: Path | None, sop_class_uid: str, sop_uid: str, transfer_syntax_uid: str,
                 originator: str | None = None, xfer: Transfer | None = None, size: int = 0) -> None:
        super().__init__()
        self.SOPClassUID = sop_class_uid
        self.SOPInstanceUID = sop_uid
        object.__setattr__(self, "vna_path", path)
        object.__setattr__(self, "vna_ts", transfer_syntax_uid)
        object.__setattr__(self, "vna_originator", originator)
        object.__setattr__(self, "vna_xfer", xfer)       # counts the sub-operation's result
        object.__setattr__(self, "vna_size", size)


class _SubOperationFailed(Exception):
    """Raised instead of sending a sub-operation whose instance has no verified copy."""


_original_send_c_store = Association.send_c_store


def _send_c_store(self: Association, dataset: Any, *args: Any, **kwargs: Any) -> Dataset:
    """Send a FileBackedDataset as raw file bytes (uncompressed fallback if its syntax was not accepted)."""
    if isinstance(dataset, FileBackedDataset) and dataset.vna_xfer is not None:
        xfer: Transfer = dataset.vna_xfer
        try:
            rsp = _send_file(self, dataset, *args, **kwargs)
        except Exception:
            xfer.sent(False)
            raise
        status = int(rsp.Status) if rsp is not None and "Status" in rsp else -1
        xfer.sent(status == 0 or status >> 12 == 0xB, dataset.vna_size)   # success or warning
        return rsp
    return _send_file(self, dataset, *args, **kwargs)


def _send_file(self: Association, dataset: Any, *args: Any, **kwargs: Any) -> Dataset:
    if isinstance(dataset, FileBackedDataset):
        path: Path | None = dataset.vna_path
        if path is None:  # pynetdicom counts the exception as a failed sub-operation
            raise _SubOperationFailed(f"no verified copy of {dataset.SOPInstanceUID}")
        if dataset.vna_originator is not None:  # C-MOVE: the requester, not us (PS3.7 9.3.1.1)
            kwargs["originator_aet"] = dataset.vna_originator
        ts = dataset.vna_ts
        has_cx = any(
            cx.abstract_syntax == dataset.SOPClassUID and cx.transfer_syntax[0] == ts and cx.as_scu
            for cx in self.accepted_contexts)
        if has_cx or ts not in _LITTLE_ENDIAN:
            return _original_send_c_store(self, path, *args, **kwargs)
        return _original_send_c_store(self, dcmread(path), *args, **kwargs)
    return _original_send_c_store(self, dataset, *args, **kwargs)


Association.send_c_store = _send_c_store  # type: ignore[method-assign]


def _actor(event: evt.Event) -> Actor:
    """The peer of the event's association, for the audit trail."""
    r = event.assoc.requestor
    return Actor(str(r.ae_title).strip(), "ae", str(r.address))


def _status_of(rsp: Any) -> int:
    if isinstance(rsp, Dataset):
        return int(rsp.get("Status", st.UNABLE_TO_PROCESS))
    if isinstance(rsp, tuple):
        return int(rsp[0]) if rsp and isinstance(rsp[0], int) else st.SUCCESS
    return int(rsp) if isinstance(rsp, int) else st.SUCCESS


def _identifier_map(ds: Dataset) -> dict[str, str]:
    out: dict[str, str] = {}
    for elem in ds:
        kw = elem.keyword or keyword_for_tag(elem.tag)
        if not kw or kw in _SKIP_KEYS or elem.tag.group in (0x0000, 0x0002):
            continue
        if elem.VR == "SQ":
            out[kw] = ""
            continue
        value = elem.value
        if value is None:
            out[kw] = ""
        elif isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
            out[kw] = "\\".join(str(v) for v in value)
        else:
            out[kw] = str(value)
    return out


def _response(level: str, row: dict[str, str], requested: Dataset) -> Dataset:
    rsp = Dataset()
    rsp.QueryRetrieveLevel = level
    non_ascii = False
    for kw, value in row.items():
        tag = tag_for_keyword(kw)
        if tag is None:
            continue
        vr = requested[tag].VR if tag in requested else dictionary_VR(tag)
        if vr == "SQ":
            rsp.add_new(tag, "SQ", [])
            continue
        if vr in ("US", "SS", "UL", "SL", "FL", "FD"):
            try:
                rsp.add_new(tag, vr, int(value) if vr not in ("FL", "FD") else float(value))
            except ValueError:
                rsp.add_new(tag, vr, None)
            continue
        if vr in ("IS", "DS") and value == "":
            rsp.add_new(tag, vr, None)
            continue
        if not value.isascii():
            non_ascii = True
        rsp.add_new(tag, vr, value.split("\\") if "\\" in value and vr not in ("LT", "ST", "UT") else value)
    for kw in _ECHOED_KEYS:  # PS3.4 C.4.1.1.3.2: returned as sent
        if kw in requested:
            rsp.add(requested[kw])
    if non_ascii or "SpecificCharacterSet" in requested:
        rsp.SpecificCharacterSet = "ISO_IR 192"
    return rsp


class _Server(ThreadedAssociationServer):
    """The association server: optional SO_REUSEPORT, TLS handshakes in the association's thread, limits.

    pynetdicom wraps accepted sockets in the acceptor thread, where a client
    that never finishes its handshake would stall every other connection; here
    the handshake runs in the request thread, bounded by ``handshake_timeout``,
    and a failed one closes that connection only.

    With ``limits`` every accepted connection is counted there and closed at
    once when a limit refuses it; the association that takes it over claims
    it (``DicomServer._on_accepted_conn``) and its DUL thread releases it.
    """

    reuse_port = False
    handshake_timeout = 30.0
    limits: ConnectionLimits | None = None
    request_queue_size = 128  # listen backlog (socketserver's 5 makes a burst of connections wait for SYN retries)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.contexts = Contexts(self.contexts)

    def server_bind(self) -> None:
        if self.reuse_port:
            cast(socket.socket, self.socket).setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        client, address = cast(socket.socket, self.socket).accept()
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        return client, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """False (the connection is closed at once) when a connection limit refuses the peer."""
        return self.limits is None or self.limits.open(request, str(client_address[0])) is not None

    def process_request(self, request: Any, client_address: Any) -> None:
        """As socketserver's; a request whose thread cannot start gives its connection slot back."""
        try:
            super().process_request(request, client_address)
        except BaseException:
            conn = self.limits.claim(request) if self.limits is not None else None
            if conn is not None:
                conn.close()
            raise

    def finish_request(self, request: Any, client_address: Any) -> None:
        try:
            if isinstance(request, ssl.SSLSocket):
                try:
                    request.settimeout(self.handshake_timeout)
                    request.do_handshake()
                    request.settimeout(None)
                except (OSError, ValueError) as exc:
                    log.warning("TLS handshake with %s failed: %s", client_address[0], exc)
                    return
            super().finish_request(request, client_address)
        finally:
            conn = self.limits.claim(request) if self.limits is not None else None
            if conn is not None:  # no association took the connection over
                conn.close()


class _ReusePortServer(_Server):
    """An association server whose socket shares its port with sibling worker processes."""

    reuse_port = True


class DicomServer:
    """Runs the archive's DIMSE services on one port.

    With ``reuse_port`` several processes listen on the same port
    (SO_REUSEPORT) and the kernel spreads associations over them.
    """

    def __init__(self, archive: Archive, cfg: DicomConfig, *, reuse_port: bool = False) -> None:
        self.archive = archive
        self.cfg = cfg
        self.reuse_port = reuse_port
        self.ae = self._build_ae()
        # associations and half-open connections are counted by self.limits; pynetdicom's own count of
        # association threads (which includes half-open connections) is left as a far backstop only
        self.ae.maximum_associations = _THREAD_BACKSTOP
        self.limits = ConnectionLimits(cfg.max_associations, cfg.max_half_open_connections,
                                       cfg.max_connections_per_address)
        self._servers: list[ThreadedAssociationServer] = []
        self._client_tls: ssl.SSLContext | None = None   # for associations we request from tls = true remotes
        self._inflight = 0
        self._idle = threading.Condition()
        self._assocs: dict[int, tuple[Span | None, bool]] = {}   # id(assoc) -> (span, accepted)
        self._assocs_lock = threading.Lock()
        self._op_keys: dict[tuple[str, int], tuple[str, SeriesKey, SeriesKey]] = {}   # see _op_done
        self.assoc_log = AssociationLog()   # one INFO line per association
        self._unknown_dest = OncePerName()  # an unknown C-MOVE destination is logged once an hour per name
        self._storage_classes = frozenset(str(uid) for uid in storage_classes())
        self._spool_dir = archive.cfg.resolve("spool/incoming")
        self._spool_dir.mkdir(parents=True, exist_ok=True)

    def _build_ae(self) -> AE:
        cfg = self.cfg
        ae = AE(ae_title=cfg.ae_title)
        ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        ae.maximum_associations = cfg.max_associations
        ae.acse_timeout = cfg.acse_timeout
        ae.dimse_timeout = cfg.dimse_timeout
        ae.network_timeout = cfg.network_timeout
        ae.maximum_pdu_size = cfg.max_pdu
        if cfg.allowed_calling_aes:
            ae.require_calling_aet = list(cfg.allowed_calling_aes)
        ae.add_supported_context(Verification)
        # every storage class pynetdicom lists and the retired ones (registered with its Storage service);
        # unknown ones per association when dicom.accept_unknown_storage_classes (see handlers())
        register_retired_storage()
        syntaxes = storage_syntaxes()
        for uid in storage_classes():
            ae.add_supported_context(uid, syntaxes, scu_role=True, scp_role=True)
        for uid in (
            PatientRootQueryRetrieveInformationModelFind, PatientRootQueryRetrieveInformationModelMove,
            PatientRootQueryRetrieveInformationModelGet, StudyRootQueryRetrieveInformationModelFind,
            StudyRootQueryRetrieveInformationModelMove, StudyRootQueryRetrieveInformationModelGet,
            StorageCommitmentPushModel,
        ):
            ae.add_supported_context(uid)
        return ae

    def handlers(self) -> list[Any]:
        """The event bindings (data, not code paths); with telemetry each DIMSE handler runs in a span."""
        n = self.assoc_log.counted

        def t(op: str, handler: Callable[[evt.Event], Any], generator: bool = False) -> Callable[[evt.Event], Any]:
            return self._traced(op, n(op, handler, generator), generator)

        bindings: list[Any] = [
            (evt.EVT_CONN_OPEN, self._on_accepted_conn),
            (evt.EVT_CONN_CLOSE, self._on_conn_close),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_RELEASED, self._on_assoc_over),
            (evt.EVT_ABORTED, self._on_assoc_over),
            (evt.EVT_C_ECHO, t("c-echo", lambda event: st.SUCCESS)),
            (evt.EVT_C_STORE, t("c-store", self.on_store)),
            (evt.EVT_C_FIND, t("c-find", self.on_find, generator=True)),
            (evt.EVT_C_MOVE, t("c-move", self.on_move, generator=True)),
            (evt.EVT_C_GET, t("c-get", self.on_get, generator=True)),
            (evt.EVT_N_ACTION, t("n-action", self.on_n_action)),
            *self.assoc_log.handlers(),
        ]
        if self.archive.telemetry.enabled:
            bindings += [(evt.EVT_REQUESTED, self._assoc_begin), (evt.EVT_ACCEPTED, self._assoc_accepted),
                         (evt.EVT_CONN_CLOSE, self._assoc_end)]
        if self.cfg.accept_unknown_storage_classes:
            bindings.append((evt.EVT_REQUESTED, UnknownStorage(storage_syntaxes()).on_requested))
        return bindings

    def start(self) -> ThreadedAssociationServer:
        """Listen in background threads (the plain port, and ``tls_port`` when set); returns the plain server.

        Raises ConfigError when the TLS certificate or key cannot be loaded.
        """
        listeners: list[tuple[int, ssl.SSLContext | None]] = [(self.cfg.port, None)]
        if self.cfg.tls_port:
            listeners.append((self.cfg.tls_port, server_context(self.archive.cfg)))
        server_class = _ReusePortServer if self.reuse_port else _Server
        for port, ctx in listeners:
            server = cast(_Server, self.ae.make_server(
                (self.cfg.host, port), evt_handlers=self.handlers(), server_class=server_class, ssl_context=ctx))
            server.handshake_timeout = self.cfg.acse_timeout
            if reactor.installed():  # the DUL reactor releases a counted connection when it ends
                server.limits = self.limits
            self.ae._servers.append(server)  # noqa: SLF001 -- as AE.start_server does; shutdown() removes it
            threading.Thread(target=server.serve_forever, name=f"vna-acceptor-{port}", daemon=True).start()
            self._servers.append(server)
        self.archive.telemetry.gauge("vna.dicom.connections", "{connection}",
                                     "connections of the DICOM port now, by state (half_open, associated)",
                                     self._connection_counts)
        self.archive.telemetry.start_endpoint()
        return self._servers[0]

    def _connection_counts(self) -> list[tuple[float, dict[str, str]]]:
        half_open, associated = self.limits.counts()
        return [(half_open, {"state": "half_open"}), (associated, {"state": "associated"})]

    @property
    def listening(self) -> bool:
        """True while every listening socket (plain, and TLS if configured) is open (started and not stopped)."""
        socks = [server.socket for server in self._servers]
        return bool(socks) and all(sock is not None and sock.fileno() >= 0 for sock in socks)

    def stop(self, grace: float = 30.0) -> None:
        """Stop accepting, let running C-STOREs finish (up to ``grace`` s), abort the associations.

        An instance whose store finishes after its association was aborted is
        complete in the archive but unacknowledged; the sender's retry is
        idempotent.
        """
        for server in self._servers:
            server.shutdown()
        self._servers = []
        with self._idle:
            self._idle.wait_for(lambda: self._inflight == 0, timeout=grace)
        self.ae.shutdown()

    # -- telemetry and audit of associations ----------------------------------------
    def _traced(self, op: str, handler: Callable[[evt.Event], Any], generator: bool = False
                ) -> Callable[[evt.Event], Any]:
        """``handler`` inside a ``dimse.<op>`` span (child of its association's), counted and timed."""
        tel = self.archive.telemetry
        if not tel.enabled:
            return handler

        def run(event: evt.Event) -> Any:
            t0 = time.perf_counter()
            status = st.UNABLE_TO_PROCESS
            spooled = spooled_of(event.request)  # a C-STORE received on the fast path: it began then
            with tel.span(f"dimse.{op}", parent=self._assoc_span(event), kind=SpanKind.SERVER,
                          start_ns=spooled.started_ns if spooled is not None else None) as span:
                try:
                    rsp = handler(event)
                    status = _status_of(rsp)
                    return rsp
                finally:
                    self._op_done(span, op, status, t0)

        def run_generator(event: evt.Event) -> Iterator[Any]:
            t0 = time.perf_counter()
            status: int | None = None
            with tel.span(f"dimse.{op}", parent=self._assoc_span(event), kind=SpanKind.SERVER) as span:
                try:
                    for item in handler(event):
                        if isinstance(item, tuple) and len(item) == 2:
                            if item[0] is None:
                                status = st.MOVE_DESTINATION_UNKNOWN
                            elif isinstance(item[0], int) and item[0] not in (st.PENDING, 0xFF01):
                                status = item[0]
                        yield item
                except GeneratorExit:
                    # pynetdicom stops iterating after a final status: only a close before one is a cancel
                    status = st.CANCEL if status is None else status
                    raise
                except BaseException:
                    status = st.UNABLE_TO_PROCESS
                    raise
                finally:
                    self._op_done(span, op, st.SUCCESS if status is None else status, t0)

        return run_generator if generator else run

    def _op_done(self, span: Span | None, op: str, status: int, t0: float) -> None:
        tel = self.archive.telemetry
        keys = self._op_keys.get((op, status))
        if keys is None:   # status text and metric series of (op, status), built once
            text = f"0x{status:04X}"
            keys = self._op_keys.setdefault(
                (op, status), (text, series_key({"op": op, "status": text}), series_key({"op": op})))
        text, ops_key, duration_key = keys
        if span is not None:
            span.set_attribute("dicom.status", text)
            if status not in (st.SUCCESS, st.PENDING, st.CANCEL) and status >> 12 != 0xB:
                span.set_status(Status(StatusCode.ERROR, text))
        tel.dimse_operations.add_key(1, ops_key)
        tel.dimse_duration.record_key(time.perf_counter() - t0, duration_key)

    def _assoc_span(self, event: evt.Event) -> Span | None:
        with self._assocs_lock:
            entry = self._assocs.get(id(event.assoc))
        return entry[0] if entry else None

    def _assoc_begin(self, event: evt.Event) -> None:
        if event.assoc.is_aborted:  # the connection ended before its A-ASSOCIATE-RQ (see reactor)
            return
        r = event.assoc.requestor
        calling = getattr(r.primitive, "calling_ae_title", None) or r.ae_title   # not negotiated yet
        span = self.archive.telemetry.start_span("dimse.association", {
            "dicom.calling_ae": str(calling).strip(), "dicom.called_ae": self.cfg.ae_title,
            "net.peer.ip": str(r.address), "net.peer.port": int(r.port or 0)}, kind=SpanKind.SERVER)
        with self._assocs_lock:
            self._assocs[id(event.assoc)] = (span, False)

    def _assoc_accepted(self, event: evt.Event) -> None:
        tel = self.archive.telemetry
        with self._assocs_lock:
            span, _ = self._assocs.get(id(event.assoc), (None, False))
            self._assocs[id(event.assoc)] = (span, True)
        tel.dimse_associations.add(1, {"result": "accepted"})
        tel.dimse_associations_open.add(1)

    def _assoc_end(self, event: evt.Event) -> None:
        with self._assocs_lock:
            span, accepted = self._assocs.pop(id(event.assoc), (None, False))
        if accepted:
            self.archive.telemetry.dimse_associations_open.add(-1)
        if span is not None:
            span.end()

    def _on_rejected(self, event: evt.Event) -> None:
        """A rejected calling AE title is an authentication failure (audited); count every rejection."""
        actor = _actor(event)
        allowed = self.cfg.allowed_calling_aes
        reason = "calling AE title not recognised" if allowed and actor.id not in allowed else "resources"
        self.archive.telemetry.dimse_associations.add(1, {"result": "rejected"})
        span = self._assoc_span(event)
        if span is not None:
            span.set_status(Status(StatusCode.ERROR, f"association rejected: {reason}"))
        if reason == "resources":
            log.warning("association from %s (%s) rejected: too many associations", actor.id, actor.address)
            return
        log.warning("association from %s (%s) rejected: %s", actor.id, actor.address, reason)
        try:
            self.archive.audit.record(USER_AUTHENTICATION, "E", actor, outcome=4, event_type=LOGIN,
                                      details={"reason": reason, "called_ae": self.cfg.ae_title})
        except AuditUnavailable as exc:
            log.error("authentication failure of %s not audited: %s", actor.id, exc)

    # -- handlers ------------------------------------------------------------
    @staticmethod
    def _on_conn_open(event: evt.Event) -> None:
        try:
            sock = cast(Any, event.assoc.dul.socket).socket
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (AttributeError, OSError) as exc:
            log.debug("could not set TCP_NODELAY: %s", exc)

    def _on_accepted_conn(self, event: evt.Event) -> None:
        """A peer connected: Nagle off, and (``dicom.fast_store``) C-STOREs received on the fast path."""
        self._on_conn_open(event)
        sock = cast(Any, event.assoc.dul.socket).socket
        conn = self.limits.claim(sock) if sock is not None else None
        if conn is not None:  # released when the association's DUL thread ends (see reactor)
            event.assoc.dul._vna_conn = conn  # type: ignore[attr-defined]
        if self.cfg.fast_store and reactor.installed():
            event.assoc.dul._vna_fast_store = FastStore(  # type: ignore[attr-defined]
                self._storage_classes, self._spool_dir, on_close=self.archive.index.release_thread)

    def _on_requested(self, event: evt.Event) -> None:
        """An A-ASSOCIATE-RQ arrived: take an association slot, or reject (transient, local limit exceeded)."""
        assoc = event.assoc
        conn = getattr(assoc.dul, "_vna_conn", None)
        if conn is None or assoc.is_aborted or conn.associate():
            return
        conn.refused("association rejected: %d associations open (dicom.max_associations)", self.cfg.max_associations)
        self.archive.telemetry.dimse_associations.add(1, {"result": "rejected"})
        assoc.acse.send_reject(0x02, 0x03, 0x02)
        assoc.kill()  # as pynetdicom after its own rejections: the A-ASSOCIATE-RJ is sent before the close

    def _on_assoc_over(self, event: evt.Event) -> None:
        """Released or aborted (in the association's thread, after its last handler): close its index connection."""
        self.archive.index.release_thread()

    @staticmethod
    def _on_conn_close(event: evt.Event) -> None:
        """Remove the spool file of a C-STORE cut off mid-transfer (pynetdicom keeps it)."""
        message = getattr(getattr(event.assoc, "dimse", None), "message", None)
        spool = getattr(message, "_data_set_file", None)
        if spool is None:
            return
        try:
            spool.close()
            os.unlink(spool.name)
            log.info("removed the spool of an incomplete C-STORE from %s", event.assoc.requestor.ae_title)
        except OSError:
            pass

    def on_store(self, event: evt.Event) -> int | Dataset:
        """C-STORE: ingest the spooled file; Success only once durable and indexed.

        Returns the Success status, or a Dataset with the failure status and an ErrorComment.
        """
        req = cast(Any, event.request)
        calling = event.assoc.requestor.ae_title.strip()
        with self._idle:
            self._inflight += 1
        try:
            self.archive.ingest.ingest_file(
                Path(event.dataset_path), source_ae=calling,
                expected_sop_uid=str(req.AffectedSOPInstanceUID),
                expected_sop_class=str(req.AffectedSOPClassUID), actor=_actor(event), owned=True,
                spooled=spooled_of(req),  # received on the fast path: hashed while spooled
            )
            return st.SUCCESS
        except VnaError as exc:
            rsp = Dataset()
            rsp.Status = st.status_for(exc)
            rsp.ErrorComment = str(exc)[:64]
            log.warning("C-STORE from %s refused (0x%04X): %s", calling, rsp.Status, exc)
            return rsp
        finally:
            with self._idle:
                self._inflight -= 1
                self._idle.notify_all()

    def _level(self, event: evt.Event) -> tuple[QueryLevel, Dataset]:
        ds = event.identifier
        level = str(ds.get("QueryRetrieveLevel", "")).strip().upper()
        try:
            qlevel = QueryLevel(level)
        except ValueError:
            raise InvalidInput(f"QueryRetrieveLevel {level!r} is not PATIENT/STUDY/SERIES/IMAGE") from None
        model = cast(Any, event.request).AffectedSOPClassUID
        if qlevel is QueryLevel.PATIENT and model not in _PATIENT_ROOT:
            raise InvalidInput("PATIENT level needs the Patient Root information model")
        return qlevel, ds

    def on_find(self, event: evt.Event) -> Iterator[tuple[int, Dataset | None]]:
        """C-FIND: one pending response per match."""
        try:
            level, ds = self._level(event)
        except (InvalidInput, AttributeError, ValueError) as exc:
            log.warning("C-FIND refused: %s", exc)
            yield st.IDENTIFIER_MISMATCH, None
            return
        try:
            for row in self.archive.query.find(level, _identifier_map(ds), actor=_actor(event)):
                if event.is_cancelled:
                    yield st.CANCEL, None
                    return
                yield st.PENDING, _response(level.value, row, ds)
        except VnaError as exc:
            log.error("C-FIND failed: %s", exc)
            yield st.status_for(exc), None

    def _select(self, event: evt.Event) -> list[InstanceRef]:
        self.archive.audit.require()  # refuse before sending anything
        level, ds = self._level(event)
        ident = {k: v for k, v in _identifier_map(ds).items() if k in _UNIQUE_KEYS}
        conds = self.archive.query.conditions(level, ident)
        if not conds:
            raise InvalidInput("a retrieve needs at least one unique key")
        return self.archive.retrieve.select(level, conds)

    def _suboperations(self, event: evt.Event, refs: list[InstanceRef], originator: str | None,
                       xfer: Transfer) -> Iterator[tuple[int, Dataset | None]]:
        for ref in refs:
            if event.is_cancelled:
                yield st.CANCEL, None
                return
            with self.archive.telemetry.span("retrieve.instance"):
                try:
                    with self.archive.retrieve.open_verified(ref.sop_uid) as inst:
                        yield st.PENDING, FileBackedDataset(inst.path, ref.sop_class_uid, ref.sop_uid,
                                                            ref.transfer_syntax_uid, originator, xfer, inst.size)
                except VnaError as exc:
                    log.error("retrieve of %s failed: %s", ref.sop_uid, exc)
                    # no path: the send raises, pynetdicom counts a failed sub-operation and lists the UID
                    yield st.PENDING, FileBackedDataset(None, ref.sop_class_uid, ref.sop_uid,
                                                        ref.transfer_syntax_uid, xfer=xfer)

    def on_get(self, event: evt.Event) -> Iterator[Any]:
        """C-GET: C-STORE sub-operations on the same association."""
        try:
            refs = self._select(event)
        except (InvalidInput, AttributeError, ValueError) as exc:
            log.warning("C-GET refused: %s", exc)
            yield 1  # pynetdicom ends with Success after a count of 0: announce one, then fail
            yield st.IDENTIFIER_MISMATCH, None
            return
        except VnaError as exc:
            yield 1
            yield st.status_for(exc), None
            return
        with self.archive.retrieve.transfer(refs, _actor(event), op="c-get") as xfer:
            yield len(refs)
            try:
                yield from self._suboperations(event, refs, None, xfer)
            finally:
                self.assoc_log.sent(event, xfer.completed, xfer.failed)

    def on_move(self, event: evt.Event) -> Iterator[Any]:
        """C-MOVE: C-STORE sub-operations on a new association to a configured destination."""
        dest_ae = event.move_destination
        dest_name = (dest_ae.decode("ascii", "replace") if isinstance(dest_ae, bytes) else str(dest_ae)).strip()
        remote = self.cfg.find_remote(dest_name)
        if remote is None:
            if self._unknown_dest(dest_name):
                log.warning("C-MOVE to unknown destination %r refused (not in dicom.remote; logged once an hour "
                            "per name)", dest_name)
            yield None, None
            return
        try:
            refs = self._select(event)
        except (InvalidInput, AttributeError, ValueError) as exc:
            log.warning("C-MOVE refused: %s", exc)
            yield from self._refuse_move(remote, st.IDENTIFIER_MISMATCH)
            return
        except VnaError as exc:
            yield from self._refuse_move(remote, st.status_for(exc))
            return
        dest = Actor(dest_name, "ae", f"{remote.host}:{remote.port}")
        with self.archive.retrieve.transfer(refs, _actor(event), op="c-move", destination=dest) as xfer:
            yield remote.host, remote.port, {"contexts": _contexts_for(refs), **self._connect_args(remote),
                                             "evt_handlers": [(evt.EVT_CONN_OPEN, self._on_conn_open)]}
            yield len(refs)
            try:
                yield from self._suboperations(event, refs, event.assoc.requestor.ae_title.strip(), xfer)
            finally:
                self.assoc_log.sent(event, xfer.completed, xfer.failed)

    def _connect_args(self, remote: RemoteAE) -> dict[str, Any]:
        """``AE.associate`` keyword arguments for an association we request from ``remote`` (TLS if configured)."""
        if not remote.tls:
            return {}
        if self._client_tls is None:  # built once: it loads the CA bundle and our certificate from disk
            self._client_tls = client_context(self.archive.cfg)
        return {"tls_args": (self._client_tls, remote.host)}

    def _refuse_move(self, remote: RemoteAE, status: int) -> Iterator[Any]:
        """Make pynetdicom answer a C-MOVE with ``status``.

        pynetdicom answers Success when 0 sub-operations are announced, and
        associates with the destination before it asks for the first status:
        announce one sub-operation over a Verification-only association, then fail.
        """
        yield remote.host, remote.port, {"contexts": [build_context(Verification)], **self._connect_args(remote)}
        yield 1
        yield status, None

    def on_n_action(self, event: evt.Event) -> tuple[int, Dataset | None]:
        """Storage Commitment request: answer now, send the N-EVENT-REPORT on a new association."""
        req = cast(Any, event.request)
        if req.RequestedSOPClassUID != StorageCommitmentPushModel or req.ActionTypeID != 1:
            return 0x0123, None  # no such action
        calling = event.assoc.requestor.ae_title.strip()
        try:
            info = event.action_information
            transaction_uid = str(info.TransactionUID)
            items = [(str(i.ReferencedSOPClassUID), str(i.ReferencedSOPInstanceUID))
                     for i in info.ReferencedSOPSequence]
        except (AttributeError, ValueError, TypeError) as exc:
            log.warning("Storage Commitment request from %s is malformed: %s", calling, exc)
            return 0x0115, None  # invalid argument value
        remote = self.cfg.find_remote(calling)
        if remote is None:
            log.warning("Storage Commitment from %s: calling AE is not a configured remote", calling)
            return 0x0213, None  # resource limitation: nowhere to send the report
        try:
            self.archive.audit.require()
        except AuditUnavailable as exc:
            log.error("Storage Commitment from %s refused: %s", calling, exc)
            return 0x0213, None
        threading.Thread(
            target=self._commitment_report,
            args=(transaction_uid, items, remote, _actor(event)),
            name=f"vna-commit-{transaction_uid[-8:]}", daemon=True,
        ).start()
        return st.SUCCESS, None

    def _commitment_failure(self, sop_class: str, sop_uid: str, rec: AuditScope) -> int | None:
        """None if committed, else the Failure Reason (PS3.4 J.3.2.1.3)."""
        try:
            inst = self.archive.index.get_instance(sop_uid)
            if inst is None:
                return 0x0112  # no such object instance
            rec.study_uids.append(inst.study_uid)
            rec.patient_ids.append(inst.attrs.get("PatientID", ""))
            if inst.sop_class_uid != sop_class:
                return 0x0119  # class / instance conflict
            return None if self.archive.is_committed(sop_uid, sop_class) else 0x0110  # processing failure
        except VnaError as exc:
            log.error("commitment check of %s failed: %s", sop_uid, exc)
            return 0x0110

    def _commitment_report(self, transaction_uid: str, items: list[tuple[str, str]], remote: RemoteAE,
                           actor: Actor) -> None:
        """Check the items and send the N-EVENT-REPORT to ``remote``, retrying a failed delivery.

        Up to ``commitment_retries`` further attempts, ``commitment_retry_interval``
        seconds apart (doubling); the result is computed once. Not kept across a restart:
        the requester then times out and asks again (PS3.4 J.3.3).
        """
        ae_title = remote.ae_title
        ok: list[Dataset] = []
        failed: list[Dataset] = []
        try:
            with self.archive.audit.operation(INSTANCES_ACCESSED, "R", actor, details={
                    "purpose": "storage commitment", "transaction_uid": transaction_uid}) as rec:
                for cls, uid in items:
                    item = Dataset()
                    item.ReferencedSOPClassUID = cls
                    item.ReferencedSOPInstanceUID = uid
                    reason = self._commitment_failure(cls, uid, rec)
                    if reason is None:
                        ok.append(item)
                    else:
                        item.FailureReason = reason
                        failed.append(item)
                rec.details.update({"instances": len(items), "committed": len(ok), "failed": len(failed)})
                rec.outcome = 4 if failed else 0
        except AuditUnavailable as exc:  # the answer was promised: send it, the loss is logged
            log.error("Storage Commitment %s from %s not audited: %s", transaction_uid, ae_title, exc)
        report = Dataset()
        report.TransactionUID = transaction_uid
        report.RetrieveAETitle = self.cfg.ae_title
        if ok:
            report.ReferencedSOPSequence = ok
        if failed:
            report.FailedSOPSequence = failed
        event_type = 2 if failed else 1
        delay = self.cfg.commitment_retry_interval
        for attempt in range(self.cfg.commitment_retries + 1):
            if attempt:
                time.sleep(delay)
                delay *= 2
            status = self._send_report(report, event_type, remote)
            if status == 0:
                log.info("Storage Commitment report %s to %s: %d committed, %d failed", transaction_uid, ae_title,
                         len(ok), len(failed))
                return
            log.warning("Storage Commitment report %s to %s not delivered (%s), attempt %d of %d", transaction_uid,
                        ae_title, "no association" if status is None else f"status 0x{status:04X}", attempt + 1,
                        self.cfg.commitment_retries + 1)
        log.error("Storage Commitment report %s to %s given up after %d attempts", transaction_uid, ae_title,
                  self.cfg.commitment_retries + 1)

    def _send_report(self, report: Dataset, event_type: int, remote: RemoteAE) -> int | None:
        """One delivery of an N-EVENT-REPORT: the peer's status, or None without an association or answer."""
        ae = AE(ae_title=self.cfg.ae_title)
        ae.acse_timeout = self.cfg.acse_timeout
        ae.dimse_timeout = self.cfg.dimse_timeout
        ae.network_timeout = self.cfg.network_timeout
        ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        ae.add_requested_context(StorageCommitmentPushModel)
        try:
            # we act as SCP of the Push Model on an association we request (PS3.4 J.3.3)
            assoc = ae.associate(remote.host, remote.port, ae_title=remote.ae_title,
                                 ext_neg=[build_role(StorageCommitmentPushModel, scp_role=True)],
                                 evt_handlers=[(evt.EVT_CONN_OPEN, self._on_conn_open)],
                                 **self._connect_args(remote))
        except (OSError, VnaError) as exc:
            log.warning("Storage Commitment report to %s: %s", remote.ae_title, exc)
            return None
        if not assoc.is_established:
            return None
        try:
            status, _ = assoc.send_n_event_report(
                report, event_type, StorageCommitmentPushModel, StorageCommitmentPushModelInstance)
            return int(status.Status) if status and "Status" in status else None
        finally:
            assoc.release()


def _contexts_for(refs: list[InstanceRef]) -> list[PresentationContext]:
    """Storage contexts for a C-MOVE sub-association.

    One context per (SOP class, stored transfer syntax), so a compressed
    instance is never negotiated down to a syntax it cannot be sent in;
    uncompressed syntaxes also offer the other uncompressed ones.
    """
    seen: set[tuple[str, str]] = set()
    contexts = []
    for r in refs:
        if (r.sop_class_uid, r.transfer_syntax_uid) in seen:
            continue
        seen.add((r.sop_class_uid, r.transfer_syntax_uid))
        syntaxes = [r.transfer_syntax_uid]
        if r.transfer_syntax_uid in _LITTLE_ENDIAN:
            syntaxes += [ts for ts in (ExplicitVRLittleEndian, ImplicitVRLittleEndian) if ts not in syntaxes]
        contexts.append(build_context(r.sop_class_uid, syntaxes))
    return contexts[:128]
