"""The DIMSE server of ``dicom.receiver = "python"``: one plain pynetdicom AE, handlers bound as data, each a
thin translation.

Services: Verification, Storage (every storage SOP class pynetdicom knows and the
retired ones, unknown ones if configured -- see contexts.py; all transfer syntaxes
pynetdicom knows; received to a spool file and never decoded),
Patient/Study Root Query/Retrieve FIND/MOVE/GET, Storage Commitment Push Model.

pynetdicom is used through its public API only (AE, events and handlers, the
association server subclassed through socketserver's hooks, the documented
``_config`` switch): this is the reference implementation. Properties of this
path that the native receiver (native_server.py) does not share:

- C-MOVE sub-operations carry our AE title as Move Originator (pynetdicom sets it),
  not the requester's.
- A retrieved instance is read by pydicom and encoded by pynetdicom: byte-exact in
  its stored syntax (pydicom keeps raw elements), except Deflated Explicit VR
  Little Endian (deflated anew); the encoded data set is held in memory while sent.
- Malformed PDUs, PDU lengths and timers are handled by pynetdicom as it does;
  only the connection limits (limits.py) are vna's.
- Every association copies the supported presentation contexts and runs
  pynetdicom's polling reactors: slower than the native receiver.
"""

from __future__ import annotations

import logging
import os
import socket
import socketserver
import ssl
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Callable, Iterator, cast

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, UID
from pynetdicom import AE, _config, evt
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.transport import ThreadedAssociationServer
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from vna.archive import Archive
from vna.audit import LOGIN, USER_AUTHENTICATION, Actor
from vna.config import DicomConfig, RemoteAE
from vna.dicom import status as st
from vna.dicom.assoc_log import AssociationLog, OncePerName
from vna.dicom.qr import UNIQUE_KEYS, identifier_map, move_contexts, query_level, response
from vna.dicom.commitment import Connector, StorageCommitment, StorageCommitmentPushModel, nodelay
from vna.dicom.contexts import UnknownStorage, register_retired_storage, storage_classes, storage_syntaxes
from vna.dicom.limits import Connection, ConnectionLimits
from vna.dicom.tls import client_context, server_context
from vna.domain import QueryLevel
from vna.errors import AuditUnavailable, InvalidInput, VnaError
from vna.services.retrieve import InstanceRef, Transfer
from vna.telemetry import SeriesKey, series_key
from vna.transfer_audit import AssociationAudit, TransferAudit, journal_dir

__all__ = ["DicomServer"]

log = logging.getLogger(__name__)

# Receive C-STORE datasets straight to a spool file (no decode) -- pynetdicom's documented switch.
_config.STORE_RECV_CHUNKED_DATASET = True

# SOP classes (PS3.4); spelled out because pynetdicom.sop_class builds them dynamically
Verification = UID("1.2.840.10008.1.1")
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
_C_STORE_RSP = 0x8001
_DEFER_SIZE = 1 << 20  # values larger than this are read from the verified copy when sent, not by dcmread
_THREAD_BACKSTOP = 1 << 16  # pynetdicom's maximum_associations: our limits are dicom.max_* (vna/dicom/limits.py)


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


class _Server(ThreadedAssociationServer):
    """The association server (pynetdicom's, subclassed through socketserver's hooks): optional SO_REUSEPORT,
    Nagle off, TLS handshakes in the connection's thread, connection limits.

    pynetdicom wraps accepted sockets in the acceptor thread, where a client
    that never finishes its handshake would stall every other connection; here
    the handshake runs in the request thread, bounded by ``handshake_timeout``,
    and a failed one closes that connection only.

    With ``limits`` every accepted connection is counted there and closed at
    once when a limit refuses it. The request thread that hands the connection
    to pynetdicom keeps it counted until the association's thread ends
    (``Association`` is a ``threading.Thread``: joined) or, sooner, until the
    connection closes (``DicomServer._release_conn``); ``accepting`` tells
    the EVT_CONN_OPEN handler (``DicomServer._on_accepted_conn``) which
    connection the new association took, and it tells back the association.
    """

    reuse_port = False
    handshake_timeout = 30.0
    limits: ConnectionLimits | None = None
    accepting: threading.local | None = None
    request_queue_size = 128  # listen backlog (socketserver's 5 makes a burst of connections wait for SYN retries)
    daemon_threads = True     # a request thread lives as long as its association: never joined at shutdown
    block_on_close = False

    def server_bind(self) -> None:
        if self.reuse_port:
            cast(socket.socket, self.socket).setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        client, address = cast(socket.socket, self.socket).accept()
        try:
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:
            log.debug("could not set TCP_NODELAY: %s", exc)
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
        """Hand the connection to pynetdicom, then wait for its association to end; the connection's
        slot is given back then (or at once when no association took it)."""
        conn = self.limits.claim(request) if self.limits is not None else None
        state = self.accepting
        if state is not None:
            state.conn, state.assoc = conn, None
        try:
            if isinstance(request, ssl.SSLSocket):
                try:
                    request.settimeout(self.handshake_timeout)
                    request.do_handshake()
                    request.settimeout(None)
                except (OSError, ValueError) as exc:
                    log.warning("TLS handshake with %s failed: %s", client_address[0], exc)
                    return
            super().finish_request(request, client_address)   # EVT_CONN_OPEN, then the association's thread starts
            assoc = state.assoc if state is not None else None
            if assoc is not None:
                assoc.join()
        finally:
            if state is not None:
                state.conn = state.assoc = None
            if conn is not None:
                conn.close()

    def shutdown(self) -> None:
        """Stop accepting and close the listening socket (the associations are left to ``DicomServer.stop``).

        pynetdicom's ``AssociationServer.shutdown`` also removes the server from the
        AE's list of servers started by ``AE.start_server``; this one was made by
        ``AE.make_server`` and is in no such list.
        """
        socketserver.BaseServer.shutdown(self)
        self.server_close()


class _ReusePortServer(_Server):
    """An association server whose socket shares its port with sibling worker processes."""

    reuse_port = True


class DicomServer:
    """Runs the archive's DIMSE services on ``dicom.port`` and, when set, ``dicom.tls_port``.

    With ``reuse_port`` several processes listen on the same ports
    (SO_REUSEPORT) and the kernel spreads associations over them. With
    ``tls_only`` it serves ``tls_port`` alone (next to the native receiver on
    the plain port, see ``vna serve``); the connection gauge is then the
    native listener's.
    """

    def __init__(self, archive: Archive, cfg: DicomConfig, *, reuse_port: bool = False,
                 tls_only: bool = False) -> None:
        if tls_only and not cfg.tls_port:
            raise ValueError("tls_only needs dicom.tls_port")
        self.archive = archive
        self.cfg = cfg
        self.reuse_port = reuse_port
        self.tls_only = tls_only
        self.ae = self._build_ae()
        # associations and half-open connections are counted by self.limits; pynetdicom's own count of
        # association threads (which includes half-open connections) is left as a far backstop only
        self.ae.maximum_associations = _THREAD_BACKSTOP
        self.limits = ConnectionLimits(cfg.max_associations, cfg.max_half_open_connections,
                                       cfg.max_connections_per_address)
        self._servers: list[ThreadedAssociationServer] = []
        self._connector = Connector(archive)   # for associations we request (tls = true remotes)
        self.commitment = StorageCommitment(archive, cfg, self._connector,
                                            implementation_class_uid=IMPLEMENTATION_CLASS_UID,
                                            implementation_version_name=IMPLEMENTATION_VERSION_NAME)
        self._inflight = 0
        self._idle = threading.Condition()
        self._assocs: dict[int, tuple[Span | None, bool]] = {}   # id(assoc) -> (span, accepted)
        self._assocs_lock = threading.Lock()
        self._op_keys: dict[tuple[str, int], tuple[str, SeriesKey, SeriesKey]] = {}   # see _op_done
        self.assoc_log = AssociationLog()   # one INFO line per association
        self._unknown_dest = OncePerName()  # an unknown C-MOVE destination is logged once an hour per name
        self._accepting = threading.local()  # shared with the _Server request threads (see _Server)
        self._conns: weakref.WeakKeyDictionary[Any, Connection] = weakref.WeakKeyDictionary()  # assoc -> its slot
        self._conns_lock = threading.Lock()
        # each association's C-STORE audit (one record per study, vna/transfer_audit.py), from its first C-STORE
        self.transfers = TransferAudit(archive.audit, journal_dir(archive.cfg.resolve("audit")),
                                       archive.cfg.audit.transfer_flush_interval)
        self._transfers: weakref.WeakKeyDictionary[Any, AssociationAudit] = weakref.WeakKeyDictionary()
        self._transfers_lock = threading.Lock()
        # pynetdicom spools received data sets with tempfile (vna serve points it at spool/incoming)
        archive.cfg.resolve("spool/incoming").mkdir(parents=True, exist_ok=True)

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
            (evt.EVT_CONN_CLOSE, self._release_conn),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_RELEASED, self._transfer_over),
            (evt.EVT_ABORTED, self._transfer_over),
            (evt.EVT_CONN_CLOSE, self._transfer_over),
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
        """Listen in background threads (the plain port unless ``tls_only``, and ``tls_port`` when set);
        returns the first server.

        Raises ConfigError when the TLS certificate or key cannot be loaded, OSError when a port cannot be bound.
        """
        listeners: list[tuple[int, ssl.SSLContext | None]] = [] if self.tls_only else [(self.cfg.port, None)]
        if self.cfg.tls_port:
            listeners.append((self.cfg.tls_port, server_context(self.archive.cfg)))
        server_class = _ReusePortServer if self.reuse_port else _Server
        self.transfers.start()
        for port, ctx in listeners:
            server = cast(_Server, self.ae.make_server(
                (self.cfg.host, port), evt_handlers=self.handlers(), server_class=server_class, ssl_context=ctx))
            server.handshake_timeout = self.cfg.acse_timeout
            server.limits = self.limits
            server.accepting = self._accepting
            threading.Thread(target=server.serve_forever, name=f"vna-acceptor-{port}", daemon=True).start()
            self._servers.append(server)
        if not self.tls_only:
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
        self.ae.shutdown()  # aborts every association of the AE (ours were never in its list of servers)
        self.transfers.close()

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
            with tel.span(f"dimse.{op}", parent=self._assoc_span(event), kind=SpanKind.SERVER) as span:
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
        if event.assoc.is_aborted:  # the connection ended before its A-ASSOCIATE-RQ
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
    _on_conn_open = staticmethod(nodelay)  # Nagle off on an association we request

    def _on_accepted_conn(self, event: evt.Event) -> None:
        """A peer connected (in the _Server request thread): note which counted connection it took."""
        state = self._accepting
        state.assoc = event.assoc
        conn = getattr(state, "conn", None)
        if conn is not None:
            with self._conns_lock:
                self._conns[event.assoc] = conn

    def _release_conn(self, event: evt.Event) -> None:
        """The connection closed: its slot is free now (pynetdicom may keep the association's thread until
        ``acse_timeout`` when a peer hangs up before its A-ASSOCIATE-RQ)."""
        with self._conns_lock:
            conn = self._conns.pop(event.assoc, None)
        if conn is not None:
            conn.close()

    def _on_requested(self, event: evt.Event) -> None:
        """An A-ASSOCIATE-RQ arrived: take an association slot, or reject (transient, local limit exceeded)."""
        assoc = event.assoc
        with self._conns_lock:
            conn = self._conns.get(assoc)
        if conn is None or assoc.is_aborted or conn.associate():
            return
        conn.refused("association rejected: %d associations open (dicom.max_associations)", self.cfg.max_associations)
        self.archive.telemetry.dimse_associations.add(1, {"result": "rejected"})
        assoc.acse.send_reject(0x02, 0x03, 0x02)
        assoc.kill()  # as pynetdicom after its own rejections: the A-ASSOCIATE-RJ is sent before the close

    def _transfer(self, event: evt.Event) -> AssociationAudit:
        """The C-STORE audit of the event's association (made at its first C-STORE). After the association
        ended (EVT_CONN_CLOSE comes from the connection's thread, maybe while a handler still stores) it is
        the closed one, which records each instance at once; an ended association gets no new one."""
        with self._transfers_lock:
            transfer = self._transfers.get(event.assoc)
            if transfer is None:
                transfer = self._transfers[event.assoc] = self.transfers.association(_actor(event))
        return transfer

    def _transfer_over(self, event: evt.Event) -> None:
        """Released, aborted or closed: the association's C-STORE audit records are written (once). Its
        closed audit stays in ``_transfers`` (weak keys: until the association object is gone)."""
        with self._transfers_lock:
            transfer = self._transfers.get(event.assoc)
            if transfer is None:
                transfer = self._transfers[event.assoc] = self.transfers.association(_actor(event))
            elif transfer.closed:
                return
        transfer.close()

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
                transfer=self._transfer(event))
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
        return query_level(ds, str(cast(Any, event.request).AffectedSOPClassUID)), ds

    def on_find(self, event: evt.Event) -> Iterator[tuple[int, Dataset | None]]:
        """C-FIND: one pending response per match."""
        try:
            level, ds = self._level(event)
        except (InvalidInput, AttributeError, ValueError) as exc:
            log.warning("C-FIND refused: %s", exc)
            yield st.IDENTIFIER_MISMATCH, None
            return
        try:
            for row in self.archive.query.find(level, identifier_map(ds), actor=_actor(event)):
                if event.is_cancelled:
                    yield st.CANCEL, None
                    return
                yield st.PENDING, response(level.value, row, ds)
        except VnaError as exc:
            log.error("C-FIND failed: %s", exc)
            yield st.status_for(exc), None

    def _select(self, event: evt.Event) -> list[InstanceRef]:
        self.archive.audit.require()  # refuse before sending anything
        level, ds = self._level(event)
        ident = {k: v for k, v in identifier_map(ds).items() if k in UNIQUE_KEYS}
        conds = self.archive.query.conditions(level, ident)
        if not conds:
            raise InvalidInput("a retrieve needs at least one unique key")
        return self.archive.retrieve.select(level, conds)

    def _suboperations(self, event: evt.Event, refs: list[InstanceRef], sent: "_SubOperations"
                       ) -> Iterator[tuple[int, Dataset | None]]:
        """One pending status and Dataset per instance, for pynetdicom to send as a C-STORE sub-operation.

        The Dataset is the verified copy read by pydicom (its elements stay raw, so a send in the stored
        transfer syntax is byte-exact); an instance with no verified copy yields one without File Meta,
        which pynetdicom refuses to send and counts as a failed sub-operation (its UID listed).
        """
        for ref in refs:
            sent.answered()
            if event.is_cancelled:
                yield st.CANCEL, None
                return
            with self.archive.telemetry.span("retrieve.instance"):
                try:
                    with self.archive.retrieve.open_verified(ref.sop_uid) as inst:
                        ds = dcmread(inst.path, defer_size=_DEFER_SIZE)
                        sent.sending(inst.size)
                        yield st.PENDING, ds   # sent while the verified copy is held
                        continue
                except VnaError as exc:
                    log.error("retrieve of %s failed: %s", ref.sop_uid, exc)
                except Exception as exc:  # noqa: BLE001 -- a verified file pydicom cannot read: this one fails
                    log.error("retrieve of %s failed: the verified copy does not parse: %s", ref.sop_uid, exc)
            unsendable = Dataset()
            unsendable.SOPClassUID = ref.sop_class_uid
            unsendable.SOPInstanceUID = ref.sop_uid
            sent.sending(0)
            yield st.PENDING, unsendable
        sent.answered()

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
            sent = _SubOperations(xfer)
            event.assoc.bind(evt.EVT_DIMSE_RECV, sent.on_dimse_recv)   # the C-STORE-RSPs come back on it
            yield len(refs)
            try:
                yield from self._suboperations(event, refs, sent)
            finally:
                sent.answered()
                event.assoc.unbind(evt.EVT_DIMSE_RECV, sent.on_dimse_recv)
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
            sent = _SubOperations(xfer)
            yield remote.host, remote.port, {"contexts": _contexts_for(refs), **self._connect_args(remote),
                                             "evt_handlers": [(evt.EVT_CONN_OPEN, self._on_conn_open),
                                                              (evt.EVT_DIMSE_RECV, sent.on_dimse_recv)]}
            yield len(refs)
            try:
                yield from self._suboperations(event, refs, sent)
            finally:
                sent.answered()
                self.assoc_log.sent(event, xfer.completed, xfer.failed)

    def _connect_args(self, remote: RemoteAE) -> dict[str, Any]:
        """``AE.associate`` keyword arguments for an association we request from ``remote`` (TLS if configured)."""
        return self._connector.tls_args(remote)

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
        return self.commitment.request(str(req.RequestedSOPClassUID), req.ActionTypeID,
                                       lambda: event.action_information, _actor(event)), None


class _SubOperations:
    """Counts the C-STORE sub-operations of one C-GET or C-MOVE into its ``Transfer``.

    pynetdicom sends each yielded Dataset and reads its C-STORE-RSP before it asks
    the handler for the next one; ``on_dimse_recv`` (EVT_DIMSE_RECV of the
    association that carries the sub-operations) sees that response. A
    sub-operation still unanswered when the handler resumes (the send raised, or
    the association ended) counts as failed.
    """

    def __init__(self, xfer: Transfer) -> None:
        self.xfer = xfer
        self._lock = threading.Lock()
        self._size: int | None = None   # size of the instance being sent; None: nothing outstanding

    def sending(self, size: int) -> None:
        with self._lock:
            self._size = size

    def answered(self) -> None:
        """The outstanding sub-operation, if no response counted it, failed."""
        with self._lock:
            size, self._size = self._size, None
        if size is not None:
            self.xfer.sent(False)

    def on_dimse_recv(self, event: evt.Event) -> None:
        cs = getattr(event.message, "command_set", None)
        if cs is None or cs.get("CommandField") != _C_STORE_RSP:
            return
        status = int(cs.get("Status", st.UNABLE_TO_PROCESS))
        with self._lock:
            size, self._size = self._size, None
        if size is not None:
            self.xfer.sent(status == st.SUCCESS or status >> 12 == 0xB, size)   # success or warning


def _contexts_for(refs: list[InstanceRef]) -> list[PresentationContext]:
    """Storage contexts for a C-MOVE sub-association (see :func:`vna.dicom.qr.move_contexts`)."""
    return [build_context(cls, syntaxes) for cls, syntaxes in move_contexts(refs)]
