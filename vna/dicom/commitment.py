"""Storage Commitment Push Model (PS3.4 J) as SCP, for both DIMSE receivers.

The N-ACTION is answered at once; the instances are checked and the
N-EVENT-REPORT is sent on a new association we request (pynetdicom's public
API as SCU), retried when the requester does not take it.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from typing import Any, Callable, cast

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import AE, build_role, evt

from vna.archive import Archive
from vna.audit import INSTANCES_ACCESSED, Actor, AuditScope
from vna.config import DicomConfig, RemoteAE
from vna.dicom import status as st
from vna.dicom.tls import client_context
from vna.errors import AuditUnavailable, VnaError

__all__ = ["Connector", "StorageCommitment", "StorageCommitmentPushModel", "StorageCommitmentPushModelInstance", "nodelay"]

log = logging.getLogger(__name__)

StorageCommitmentPushModel = UID("1.2.840.10008.1.20.1")
StorageCommitmentPushModelInstance = UID("1.2.840.10008.1.20.1.1")


def nodelay(event: evt.Event) -> None:
    """Nagle off on the socket of an association we request."""
    try:
        sock = cast(Any, event.assoc.dul.socket).socket
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError) as exc:
        log.debug("could not set TCP_NODELAY: %s", exc)


class Connector:
    """``AE.associate`` keyword arguments for associations we request from a configured remote:
    TCP_NODELAY, and TLS when the remote says ``tls = true`` (the client context is built once)."""

    def __init__(self, archive: Archive) -> None:
        self.archive = archive
        self._client_tls: ssl.SSLContext | None = None

    def tls_args(self, remote: RemoteAE) -> dict[str, Any]:
        """``tls_args`` for ``remote`` (empty without TLS). Raises ConfigError when the CA bundle or our
        certificate cannot be loaded."""
        if not remote.tls:
            return {}
        if self._client_tls is None:  # built once: it loads the CA bundle and our certificate from disk
            self._client_tls = client_context(self.archive.cfg)
        return {"tls_args": (self._client_tls, remote.host)}

    def args(self, remote: RemoteAE) -> dict[str, Any]:
        """Every keyword argument for an association with ``remote``."""
        return {"evt_handlers": [(evt.EVT_CONN_OPEN, nodelay)], **self.tls_args(remote)}


class StorageCommitment:
    """Answers Storage Commitment requests and delivers their reports."""

    def __init__(self, archive: Archive, cfg: DicomConfig, connector: Connector, *,
                 implementation_class_uid: str, implementation_version_name: str) -> None:
        self.archive = archive
        self.cfg = cfg
        self.connector = connector
        self.implementation_class_uid = implementation_class_uid
        self.implementation_version_name = implementation_version_name

    def request(self, requested_class: str, action_type_id: int | None, info: Callable[[], Dataset],
                actor: Actor) -> int:
        """Answer an N-ACTION from ``actor``: the status. On Success the report is checked and sent in a
        background thread. ``info`` decodes the Action Information (it may raise ValueError and the like)."""
        if requested_class != StorageCommitmentPushModel or action_type_id != 1:
            return 0x0123  # no such action
        calling = actor.id
        try:
            data = info()
            transaction_uid = str(data.TransactionUID)
            items = [(str(i.ReferencedSOPClassUID), str(i.ReferencedSOPInstanceUID))
                     for i in data.ReferencedSOPSequence]
        except (AttributeError, ValueError, TypeError, KeyError, EOFError) as exc:
            log.warning("Storage Commitment request from %s is malformed: %s", calling, exc)
            return 0x0115  # invalid argument value
        remote = self.cfg.find_remote(calling)
        if remote is None:
            log.warning("Storage Commitment from %s: calling AE is not a configured remote", calling)
            return 0x0213  # resource limitation: nowhere to send the report
        try:
            self.archive.audit.require()
        except AuditUnavailable as exc:
            log.error("Storage Commitment from %s refused: %s", calling, exc)
            return 0x0213
        threading.Thread(
            target=self.report, args=(transaction_uid, items, remote, actor),
            name=f"vna-commit-{transaction_uid[-8:]}", daemon=True,
        ).start()
        return st.SUCCESS

    def failure(self, sop_class: str, sop_uid: str, rec: AuditScope) -> int | None:
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

    def report(self, transaction_uid: str, items: list[tuple[str, str]], remote: RemoteAE, actor: Actor) -> None:
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
                    reason = self.failure(cls, uid, rec)
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
            status = self.send_report(report, event_type, remote)
            if status == 0:
                log.info("Storage Commitment report %s to %s: %d committed, %d failed", transaction_uid, ae_title,
                         len(ok), len(failed))
                return
            log.warning("Storage Commitment report %s to %s not delivered (%s), attempt %d of %d", transaction_uid,
                        ae_title, "no association" if status is None else f"status 0x{status:04X}", attempt + 1,
                        self.cfg.commitment_retries + 1)
        log.error("Storage Commitment report %s to %s given up after %d attempts", transaction_uid, ae_title,
                  self.cfg.commitment_retries + 1)

    def send_report(self, report: Dataset, event_type: int, remote: RemoteAE) -> int | None:
        """One delivery of an N-EVENT-REPORT: the peer's status, or None without an association or answer."""
        ae = AE(ae_title=self.cfg.ae_title)
        ae.acse_timeout = self.cfg.acse_timeout
        ae.dimse_timeout = self.cfg.dimse_timeout
        ae.network_timeout = self.cfg.network_timeout
        ae.implementation_class_uid = UID(self.implementation_class_uid)
        ae.implementation_version_name = self.implementation_version_name
        ae.add_requested_context(StorageCommitmentPushModel)
        try:
            # we act as SCP of the Push Model on an association we request (PS3.4 J.3.3)
            assoc = ae.associate(remote.host, remote.port, ae_title=remote.ae_title,
                                 ext_neg=[build_role(StorageCommitmentPushModel, scp_role=True)],
                                 **self.connector.args(remote))
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
