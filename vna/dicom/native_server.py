"""The DIMSE port served by the native core (``dicom.receiver = "native"``): Rust owns the wire, Python decides.

The native listener (crates/vna-core) negotiates associations, answers C-ECHO,
and spools each C-STORE data set exactly as the Python receiver does
(preamble, File Meta, data set bytes as received), hashing it while spooling.
Python is called once per association (the calling AE allowlist) and once per
received instance (``ingest_file``, as ``DicomServer.on_store``); the native side
writes the C-STORE-RSP and removes the spool file unless ingest adopted it.

Slice 1: Verification and the storage SOP classes only. Query/Retrieve and
Storage Commitment contexts are rejected (abstract syntax not supported); the
TLS port is not served (use ``dicom.receiver = "python"`` for those).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pynetdicom
from pydicom.uid import UID
from pynetdicom import AE
from opentelemetry.trace import SpanKind, Status, StatusCode

from vna.archive import Archive
from vna.audit import LOGIN, USER_AUTHENTICATION, Actor
from vna.config import DicomConfig
from vna.dicom import native, status as st
from vna.dicom.contexts import storage_classes, storage_syntaxes
from vna.errors import AuditUnavailable, VnaError
from vna.services.ingest import Spooled

__all__ = ["NativeDicomServer", "supported_contexts"]

log = logging.getLogger(__name__)

Verification = UID("1.2.840.10008.1.1")
# as vna.dicom.server announces them (that module is not imported here: it configures pynetdicom)
IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.10.1137.0.1"
IMPLEMENTATION_VERSION_NAME = "VNA_010"
# A-ASSOCIATE-RJ (result, source, reason), PS3.8 9.3.4: rejected-permanent, service-user, calling AE not recognized
_CALLING_AE_NOT_RECOGNIZED = (1, 1, 3)

ContextSpec = tuple[str, list[str], "tuple[bool, bool] | None", bool]


def supported_contexts() -> list[ContextSpec]:
    """Verification and the storage SOP classes ``DicomServer`` accepts by name (pynetdicom's list and the
    retired ones), with its transfer syntaxes and roles, as (abstract syntax, our syntaxes in order of
    preference, roles or None, is storage) -- built with pynetdicom's public API."""
    ae = AE()
    ae.add_supported_context(Verification)
    syntaxes = storage_syntaxes()
    for uid in storage_classes():
        ae.add_supported_context(uid, syntaxes, scu_role=True, scp_role=True)
    out: list[ContextSpec] = []
    for cx in ae.supported_contexts:
        roles = None if cx.scu_role is None or cx.scp_role is None else (bool(cx.scu_role), bool(cx.scp_role))
        out.append((str(cx.abstract_syntax), [str(ts) for ts in cx.transfer_syntax], roles,
                    cx.abstract_syntax != Verification))
    return out


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
        self._spool_dir = archive.cfg.resolve("spool/incoming")
        self._spool_dir.mkdir(parents=True, exist_ok=True)
        self._listener: Any = None

    def start(self) -> None:
        """Bind and accept in native threads. Raises OSError when the port cannot be bound."""
        cfg = self.cfg
        self._listener = self._native.Listener(
            host=cfg.host, port=cfg.port, reuse_port=self.reuse_port, max_pdu=cfg.max_pdu,
            max_associations=cfg.max_associations, max_half_open=cfg.max_half_open_connections,
            max_per_address=cfg.max_connections_per_address, acse_timeout=cfg.acse_timeout,
            network_timeout=cfg.network_timeout, spool_dir=str(self._spool_dir),
            implementation_class_uid=IMPLEMENTATION_CLASS_UID, implementation_version=IMPLEMENTATION_VERSION_NAME,
            spool_implementation_uid=str(pynetdicom.PYNETDICOM_IMPLEMENTATION_UID),
            spool_implementation_version=str(pynetdicom.PYNETDICOM_IMPLEMENTATION_VERSION),
            contexts=self._contexts, on_associate=self.on_associate, on_store=self.on_store,
            on_log=self._on_log, on_thread_done=self.archive.index.release_thread)
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

    # -- callbacks from the native threads ---------------------------------------------
    def on_associate(self, calling_ae: str, called_ae: str, address: str, port: int) -> tuple[int, int, int] | None:
        """None to accept; (result, source, reason) to reject. A calling AE outside
        ``allowed_calling_aes`` is an authentication failure (audited)."""
        allowed = self.cfg.allowed_calling_aes
        if not allowed or calling_ae in allowed:
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
        with tel.span("dimse.c-store", kind=SpanKind.SERVER, start_ns=record.started_ns) as span:
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
        try:
            self.archive.ingest.ingest_file(
                Path(record.path), source_ae=record.calling_ae, expected_sop_uid=record.sop_instance_uid,
                expected_sop_class=record.sop_class_uid, actor=Actor(record.calling_ae, "ae", record.address),
                owned=True, spooled=Spooled(record.sha256, record.size, record.started_ns, record.ended_ns))
            return st.SUCCESS, None
        except VnaError as exc:
            status = st.status_for(exc)
            log.warning("C-STORE from %s refused (0x%04X): %s", record.calling_ae, status, exc)
            return status, str(exc)[:64]

    @staticmethod
    def _on_log(level: int, message: str) -> None:
        log.log(level, "%s", message)
