"""The native listener's C-GET against the job interface its embedding program answers with
(``vna_native.Listener`` ``on_request``), driven by a pynetdicom C-GET SCU on loopback."""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.dsutils import encode

from vna.dicom import native

STUDY_GET = "1.2.840.10008.5.1.4.1.2.2.3"
CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
IMPLICIT = "1.2.840.10008.1.2"

pytestmark = pytest.mark.skipif(not native.available(), reason="vna_native is not installed")


class _Job:
    """Announces three instances, hands out one, then its next batch fails (an index read that raised)."""

    def __init__(self, path: Path) -> None:
        data = path.read_bytes()
        ds = dcmread(path, stop_before_pixels=True)
        self.spec = (str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.file_meta.TransferSyntaxUID),
                     [(str(path), hashlib.sha256(data).hexdigest(), len(data))])
        self.calls = 0
        self.results: list[tuple[bool, int, int | None]] = []
        self.closed = False

    def count(self) -> int:
        return 3

    def destination(self) -> None:
        return None

    def next_batch(self, n: int) -> list[Any]:
        self.calls += 1
        if self.calls > 1:
            raise RuntimeError("the index is unavailable")
        return [self.spec]

    def bad_copy(self, position: int, index: int, why: str, fault: str) -> None:
        raise AssertionError(why)

    def fallback(self, position: int) -> None:
        return None

    def convert(self, position: int, transfer_syntax: str) -> None:
        return None

    def sent(self, results: list[tuple[bool, int, int | None]]) -> None:
        self.results += results

    def failed_identifier(self, uids: list[str]) -> bytes:
        ds = Dataset()
        ds.FailedSOPInstanceUIDList = uids
        out = encode(ds, True, True)
        assert out is not None
        return out

    def close(self) -> None:
        self.closed = True


def test_a_job_that_fails_mid_retrieve_is_not_answered_success() -> None:
    path = Path(get_testdata_file("CT_small.dcm"))  # type: ignore[arg-type]
    job = _Job(path)
    mod = native.load()
    with tempfile.TemporaryDirectory() as spool:
        listener = mod.Listener(
            host="127.0.0.1", port=0, reuse_port=False, max_pdu=65536, max_associations=4, max_half_open=8,
            max_per_address=0, acse_timeout=10.0, network_timeout=10.0, dimse_timeout=10.0, spool_dir=spool,
            implementation_class_uid="1.2.3", implementation_version="TEST", spool_implementation_uid="1.2.3.4",
            spool_implementation_version="SPOOL", contexts=[(STUDY_GET, [IMPLICIT], None, False),
                                                            (CT, [EXPLICIT, IMPLICIT], (True, True), True)],
            on_associate=lambda *_a: None, on_store=lambda _r: (0xA700, None), on_request=lambda _req: job,
            on_log=lambda _level, _msg: None, on_thread_done=lambda: None)
        try:
            got: list[str] = []

            def on_store(event: evt.Event) -> int:
                got.append(str(event.dataset.SOPInstanceUID))
                return 0

            ae = AE(ae_title="GETSCU")
            ae.add_requested_context(STUDY_GET)
            ae.add_requested_context(CT, [EXPLICIT, IMPLICIT])
            assoc = ae.associate("127.0.0.1", listener.port, ae_title="VNA",
                                 ext_neg=[build_role(CT, scp_role=True)],
                                 evt_handlers=[(evt.EVT_C_STORE, on_store)])
            assert assoc.is_established
            query = Dataset()
            query.QueryRetrieveLevel = "STUDY"
            query.StudyInstanceUID = "1.2.3"
            answers = [(rsp, ident) for rsp, ident in assoc.send_c_get(query, STUDY_GET)]
            assoc.release()
        finally:
            listener.stop(5.0)
    final = answers[-1][0]
    assert got == [job.spec[1]]
    assert final.Status != 0x0000   # not Success: two of three were never sent
    assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (1, 2)
    assert job.closed and [ok for ok, _size, _st in job.results] == [True, False, False]
