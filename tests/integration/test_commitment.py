"""Storage Commitment Push Model: N-ACTION answered, N-EVENT-REPORT lists only instances with W verified copies."""

from __future__ import annotations

import queue
import time
from pathlib import Path
from typing import Any, Callable

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import StorageCommitmentPushModel

from tests.conftest import VnaServer, free_port
from tests.integration import scu
from tests.integration.receivers import make_server  # noqa: F401 -- on both receivers

Factory = Callable[..., VnaServer]
INSTANCE = "1.2.840.10008.1.20.1.1"


def _request_commitment(port: int, calling: str, items: list[tuple[str, str]]) -> tuple[Dataset, int]:
    """Send one N-ACTION (Request Storage Commitment) for (class, instance) pairs; the request and its status."""
    req = Dataset()
    req.TransactionUID = generate_uid()
    refs = []
    for cls, uid in items:
        item = Dataset()
        item.ReferencedSOPClassUID = cls
        item.ReferencedSOPInstanceUID = uid
        refs.append(item)
    req.ReferencedSOPSequence = refs
    ae = AE(ae_title=calling)
    ae.add_requested_context(StorageCommitmentPushModel)
    assoc = ae.associate("127.0.0.1", port, ae_title="VNA")
    assert assoc.is_established
    status, _ = assoc.send_n_action(req, 1, StorageCommitmentPushModel, INSTANCE)
    assoc.release()
    return req, int(status.Status)


def test_storage_commitment_reports_committed_and_failed(make_server: Factory, corpus: list[Path]) -> None:
    reports: "queue.Queue[tuple[int, Dataset]]" = queue.Queue()

    def on_report(event: Any) -> tuple[int, None]:
        reports.put((int(event.event_type), event.event_information))
        return 0x0000, None

    port = free_port()
    listener = AE(ae_title="MODALITY")
    listener.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=True)
    server = listener.start_server(("127.0.0.1", port), block=False,
                                   evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)])
    try:
        srv = make_server(f'[[dicom.remote]]\nae_title = "MODALITY"\nhost = "127.0.0.1"\nport = {port}\n')
        assert all(r.Status == 0 for r in scu.store(srv.port, corpus[:2], ae_title="MODALITY"))
        req = Dataset()
        req.TransactionUID = generate_uid()
        items = []
        for p in corpus[:2]:
            d = dcmread(p, stop_before_pixels=True)
            item = Dataset()
            item.ReferencedSOPClassUID = d.SOPClassUID
            item.ReferencedSOPInstanceUID = d.SOPInstanceUID
            items.append(item)
        ghost = Dataset()
        ghost.ReferencedSOPClassUID = items[0].ReferencedSOPClassUID
        ghost.ReferencedSOPInstanceUID = "1.2.3.999"
        items.append(ghost)
        req.ReferencedSOPSequence = items

        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(StorageCommitmentPushModel)
        assoc = ae.associate("127.0.0.1", srv.port, ae_title="VNA")
        assert assoc.is_established
        status, _ = assoc.send_n_action(req, 1, StorageCommitmentPushModel, INSTANCE)
        assoc.release()
        assert status.Status == 0

        event_type, info = reports.get(timeout=30)
        assert event_type == 2  # some failed
        assert info.TransactionUID == req.TransactionUID
        ok = {str(i.ReferencedSOPInstanceUID) for i in info.ReferencedSOPSequence}
        failed = {str(i.ReferencedSOPInstanceUID): int(i.FailureReason) for i in info.FailedSOPSequence}
        assert ok == {str(i.ReferencedSOPInstanceUID) for i in items[:2]}
        assert failed == {"1.2.3.999": 0x0112}
    finally:
        server.shutdown()


def test_storage_commitment_from_unknown_ae_is_refused(make_server: Factory, corpus: list[Path]) -> None:
    srv = make_server()
    _, status = _request_commitment(srv.port, "STRANGER", [("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4")])
    assert status == 0x0213
    assert scu.echo(srv.port)


def test_storage_commitment_report_is_retried_until_the_requester_listens(make_server: Factory,
                                                                        corpus: list[Path]) -> None:
    """The requester's report port is down when the N-ACTION is answered; the report arrives on a retry."""
    reports: "queue.Queue[tuple[int, Dataset]]" = queue.Queue()

    def on_report(event: Any) -> tuple[int, None]:
        reports.put((int(event.event_type), event.event_information))
        return 0x0000, None

    port = free_port()
    srv = make_server(f'[dicom]\ncommitment_retry_interval = 0.5\ncommitment_retries = 6\n'
                      f'[[dicom.remote]]\nae_title = "MODALITY"\nhost = "127.0.0.1"\nport = {port}\n')
    assert all(r.Status == 0 for r in scu.store(srv.port, corpus[:1], ae_title="MODALITY"))
    d = dcmread(corpus[0], stop_before_pixels=True)
    req, status = _request_commitment(srv.port, "MODALITY", [(str(d.SOPClassUID), str(d.SOPInstanceUID))])
    assert status == 0
    deadline = time.monotonic() + 30
    while "not delivered" not in srv.log.read_text():  # the first attempt failed: nobody listens yet
        assert time.monotonic() < deadline, srv.log.read_text()[-2000:]
        time.sleep(0.1)
    listener = AE(ae_title="MODALITY")
    listener.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=True)
    server = listener.start_server(("127.0.0.1", port), block=False,
                                   evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)])
    try:
        event_type, info = reports.get(timeout=60)
        assert event_type == 1 and info.TransactionUID == req.TransactionUID
        assert [str(i.ReferencedSOPInstanceUID) for i in info.ReferencedSOPSequence] == [str(d.SOPInstanceUID)]
    finally:
        server.shutdown()
