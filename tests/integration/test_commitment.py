"""Storage Commitment Push Model: N-ACTION answered, N-EVENT-REPORT lists only instances with W verified copies."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from pydicom import dcmread

from tests.conftest import VnaServer, free_port
from tests.integration import scu
from tests.integration.receivers import make_server  # noqa: F401 -- on both receivers

Factory = Callable[..., VnaServer]


def test_storage_commitment_reports_committed_and_failed(make_server: Factory, corpus: list[Path]) -> None:
    port = free_port()
    with scu.commitment_scp(port) as reports:
        srv = make_server(f'[[dicom.remote]]\nae_title = "MODALITY"\nhost = "127.0.0.1"\nport = {port}\n')
        assert all(r.Status == 0 for r in scu.store(srv.port, corpus[:2], ae_title="MODALITY"))
        items = scu.commitment_items(corpus[:2])
        items.append((items[0][0], "1.2.3.999"))
        req, status = scu.request_commitment(srv.port, "MODALITY", items)
        assert status == 0

        event_type, info = reports.get(timeout=30)
        assert event_type == 2  # some failed
        assert info.TransactionUID == req.TransactionUID
        ok = {str(i.ReferencedSOPInstanceUID) for i in info.ReferencedSOPSequence}
        failed = {str(i.ReferencedSOPInstanceUID): int(i.FailureReason) for i in info.FailedSOPSequence}
        assert ok == {uid for _, uid in items[:2]}
        assert failed == {"1.2.3.999": 0x0112}


def test_storage_commitment_from_unknown_ae_is_refused(make_server: Factory, corpus: list[Path]) -> None:
    srv = make_server()
    _, status = scu.request_commitment(srv.port, "STRANGER", [("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4")])
    assert status == 0x0213
    assert scu.echo(srv.port)


def test_storage_commitment_report_is_retried_until_the_requester_listens(make_server: Factory,
                                                                        corpus: list[Path]) -> None:
    """The requester's report port is down when the N-ACTION is answered; the report arrives on a retry."""
    port = free_port()
    srv = make_server(f'[dicom]\ncommitment_retry_interval = 0.5\ncommitment_retries = 6\n'
                      f'[[dicom.remote]]\nae_title = "MODALITY"\nhost = "127.0.0.1"\nport = {port}\n')
    assert all(r.Status == 0 for r in scu.store(srv.port, corpus[:1], ae_title="MODALITY"))
    d = dcmread(corpus[0], stop_before_pixels=True)
    req, status = scu.request_commitment(srv.port, "MODALITY", [(str(d.SOPClassUID), str(d.SOPInstanceUID))])
    assert status == 0
    deadline = time.monotonic() + 30
    while "not delivered" not in srv.log.read_text():  # the first attempt failed: nobody listens yet
        assert time.monotonic() < deadline, srv.log.read_text()[-2000:]
        time.sleep(0.1)
    with scu.commitment_scp(port) as reports:
        event_type, info = reports.get(timeout=60)
        assert event_type == 1 and info.TransactionUID == req.TransactionUID
        assert [str(i.ReferencedSOPInstanceUID) for i in info.ReferencedSOPSequence] == [str(d.SOPInstanceUID)]
