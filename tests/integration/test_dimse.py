"""The archive over the network: pynetdicom SCUs and DCMTK tools against a real `vna serve`."""

from __future__ import annotations

import json
import subprocess
import zlib
from pathlib import Path
from typing import Callable

import pytest
from pydicom import dcmread
from pydicom.uid import DeflatedExplicitVRLittleEndian

from tests.conftest import DCMTK_ENV, StoreScp, VnaServer, dataset_bytes
from tests.integration import scu

Factory = Callable[..., VnaServer]


def _stats(server: VnaServer) -> dict:  # type: ignore[type-arg]
    r = server.cli("index", "stats", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def test_echo_with_pynetdicom_and_dcmtk(make_server: Factory) -> None:
    srv = make_server()
    assert scu.echo(srv.port)
    r = subprocess.run(["echoscu", "-aec", "VNA", "127.0.0.1", str(srv.port)], env=DCMTK_ENV,
                       capture_output=True, timeout=30)
    assert r.returncode == 0, r.stderr


def test_storescu_then_getscu_roundtrip_is_byte_identical(make_server: Factory, corpus: list[Path],
                                                          tmp_path: Path) -> None:
    srv = make_server()
    r = subprocess.run(["storescu", "-aec", "VNA", "127.0.0.1", str(srv.port), *map(str, corpus)],
                       env=DCMTK_ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    stats = _stats(srv)
    assert stats["instances"] == len(corpus)
    assert stats["tiers"]["hot"]["by_state"] == {"OK": 2 * len(corpus)}

    assert scu.getscu_roundtrip(srv.port, corpus, tmp_path / "got") == 3


def test_c_get_pynetdicom_counts_and_bytes(make_server: Factory, corpus: list[Path]) -> None:
    srv = make_server()
    assert all(s.Status == 0 for s in scu.store(srv.port, corpus))
    mr = [p for p in corpus if p.name.startswith("mr-")]
    ds = dcmread(mr[0], stop_before_pixels=True)
    received, final, raw = scu.get(srv.port, {"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": ds.StudyInstanceUID,
                                              "SeriesInstanceUID": ds.SeriesInstanceUID}, [str(ds.SOPClassUID)])
    assert final.Status == 0
    assert final.NumberOfCompletedSuboperations == len(mr)
    assert final.NumberOfFailedSuboperations == 0
    for p in mr:
        assert raw[str(dcmread(p, stop_before_pixels=True).SOPInstanceUID)] == dataset_bytes(p)


def test_movescu_to_dcmtk_storescp(make_server: Factory, corpus: list[Path], storescp: StoreScp) -> None:
    srv = make_server(f'[[dicom.remote]]\nae_title = "DEST"\nhost = "127.0.0.1"\nport = {storescp.port}\n')
    assert all(s.Status == 0 for s in scu.store(srv.port, corpus))
    ct = [p for p in corpus if p.name.startswith("ct-7-0001")]
    ds = dcmread(ct[0], stop_before_pixels=True)
    r = subprocess.run(["movescu", "-S", "-aec", "VNA", "-aem", "DEST", "-k", "QueryRetrieveLevel=STUDY",
                        "-k", f"StudyInstanceUID={ds.StudyInstanceUID}", "127.0.0.1", str(srv.port)],
                       env=DCMTK_ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    files = storescp.files()
    assert len(files) == len(ct)
    sent = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in ct}
    for f in files:
        uid = str(dcmread(f, stop_before_pixels=True).SOPInstanceUID)
        assert dataset_bytes(f) == dataset_bytes(sent[uid])


def test_c_move_counts_and_unknown_destination(make_server: Factory, corpus: list[Path], storescp: StoreScp) -> None:
    srv = make_server(f'[[dicom.remote]]\nae_title = "DEST"\nhost = "127.0.0.1"\nport = {storescp.port}\n')
    assert all(s.Status == 0 for s in scu.store(srv.port, corpus))
    ds = dcmread(corpus[0], stop_before_pixels=True)
    responses, final = scu.move(srv.port, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": ds.StudyInstanceUID}, "DEST")
    assert final.Status == 0
    assert final.NumberOfCompletedSuboperations == 3
    assert final.NumberOfFailedSuboperations == 0
    pending = [r for r in responses if r.Status == 0xFF00]
    assert [r.NumberOfRemainingSuboperations for r in pending] == [2, 1, 0][: len(pending)]
    _, final = scu.move(srv.port, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": ds.StudyInstanceUID}, "NOWHERE")
    assert final.Status == 0xA801


def test_findscu_and_query_matching(make_server: Factory, corpus: list[Path]) -> None:
    srv = make_server()
    assert all(s.Status == 0 for s in scu.store(srv.port, corpus))
    # DCMTK findscu, study level with return keys
    r = subprocess.run(["findscu", "-S", "-aec", "VNA", "-k", "QueryRetrieveLevel=STUDY", "-k", "PatientName=test*",
                        "-k", "StudyInstanceUID", "-k", "ModalitiesInStudy", "-k", "NumberOfStudyRelatedInstances",
                        "127.0.0.1", str(srv.port)], env=DCMTK_ENV, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("Find Response:") == 4 or r.stdout.count("Find Response:") == 4, r.stderr

    rows, final = scu.find(srv.port, {"QueryRetrieveLevel": "STUDY", "PatientName": "test^patient000?",
                                      "StudyInstanceUID": "", "ModalitiesInStudy": "", "NumberOfStudyRelatedSeries": "",
                                      "NumberOfStudyRelatedInstances": "", "RetrieveAETitle": "",
                                      "InstanceAvailability": "", "IssuerOfPatientID": "", "OtherPatientIDs": ""})
    assert final == 0
    assert len(rows) == 4  # CT x2, MR, small (study numbers 0000 / 0001)
    by_mod = {str(r.ModalitiesInStudy): r for r in rows}
    assert set(by_mod) == {"CT", "MR", "OT"}
    assert all(r.RetrieveAETitle == "VNA" and r.InstanceAvailability == "ONLINE" for r in rows)
    assert by_mod["MR"].NumberOfStudyRelatedInstances == 2
    assert by_mod["MR"].NumberOfStudyRelatedSeries == 1
    assert by_mod["MR"].OtherPatientIDs == ""  # unsupported key: returned empty

    rows, _ = scu.find(srv.port, {"QueryRetrieveLevel": "STUDY", "ModalitiesInStudy": ["MR", "OT"], "StudyInstanceUID": ""})
    assert len(rows) == 2
    mr = dcmread([p for p in corpus if p.name.startswith("mr-")][0], stop_before_pixels=True)
    rows, _ = scu.find(srv.port, {"QueryRetrieveLevel": "STUDY", "StudyDate": f"{mr.StudyDate}-{mr.StudyDate}",
                                  "StudyInstanceUID": ""})
    assert str(mr.StudyInstanceUID) in {str(r.StudyInstanceUID) for r in rows}
    rows, _ = scu.find(srv.port, {"QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": mr.StudyInstanceUID,
                                  "SeriesInstanceUID": mr.SeriesInstanceUID, "SOPInstanceUID": "", "InstanceNumber": ""})
    assert sorted(int(r.InstanceNumber) for r in rows) == [1, 2]
    rows, _ = scu.find(srv.port, {"QueryRetrieveLevel": "PATIENT", "PatientID": "", "PatientName": "",
                                  "NumberOfPatientRelatedStudies": ""}, patient_root=True)
    # the generator gives study 0 of every kind to one patient
    assert sorted(int(r.NumberOfPatientRelatedStudies) for r in rows) == [1, 3]
    # PATIENT level is not part of Study Root
    _, final = scu.find(srv.port, {"QueryRetrieveLevel": "PATIENT", "PatientID": ""})
    assert final == 0xA900


def test_duplicates_idempotent_and_conflicting_bytes_rejected(make_server: Factory, corpus: list[Path]) -> None:
    srv = make_server()
    first = corpus[0]
    assert scu.store(srv.port, [first])[0].Status == 0
    assert scu.store(srv.port, [first])[0].Status == 0  # same bytes again: idempotent
    assert _stats(srv)["instances"] == 1
    changed = dcmread(first)
    changed.StudyDescription = "tampered"
    rsp = scu.store_dataset(srv.port, changed)
    assert rsp.Status == 0x0111
    assert "different content" in str(rsp.get("ErrorComment", ""))
    assert _stats(srv)["instances"] == 1
    _, _, raw = scu.get(srv.port, {"QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": changed.StudyInstanceUID,
                                   "SeriesInstanceUID": changed.SeriesInstanceUID,
                                   "SOPInstanceUID": changed.SOPInstanceUID}, [str(changed.SOPClassUID)])
    assert raw[str(changed.SOPInstanceUID)] == dataset_bytes(first)


def test_duplicate_policy_version_serves_newest(make_server: Factory, corpus: list[Path]) -> None:
    srv = make_server('[archive]\nduplicate_policy = "version"\n')
    first = corpus[0]
    assert scu.store(srv.port, [first])[0].Status == 0
    changed = dcmread(first)
    changed.StudyDescription = "corrected"
    assert scu.store_dataset(srv.port, changed).Status == 0
    received, final, _ = scu.get(srv.port, {"QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": changed.StudyInstanceUID,
                                            "SeriesInstanceUID": changed.SeriesInstanceUID,
                                            "SOPInstanceUID": changed.SOPInstanceUID}, [str(changed.SOPClassUID)])
    assert final.Status == 0 and len(received) == 1
    assert received[0].StudyDescription == "corrected"
    assert _stats(srv)["tiers"]["hot"]["by_state"] == {"OK": 4}  # both versions kept, 2 replicas each


def test_compressed_transfer_syntaxes_stored_as_received(make_server: Factory) -> None:
    from pydicom.data import get_testdata_file

    # several of pydicom's files are one MR image in different syntaxes (same SOP Instance UID)
    srv = make_server('[archive]\nduplicate_policy = "version"\n')
    names = ["JPEG2000.dcm", "MR_small_RLE.dcm", "SC_rgb_jpeg_dcmtk.dcm", "JPEG-lossy.dcm", "examples_jpeg2k.dcm", "image_dfl.dcm",
             "MR_small_jpeg_ls_lossless.dcm", "CT_small.dcm", "MR_small_bigendian.dcm"]
    files = [Path(p) for n in names if (p := get_testdata_file(n))]
    assert len(files) == len(names)
    for f in files:
        ds = dcmread(f, stop_before_pixels=True)
        rsp = scu.store_dataset(srv.port, f)  # the file's bytes, unchanged, on the wire
        assert rsp.Status == 0, (f.name, rsp)
        received, final, raw = scu.get(
            srv.port, {"QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": ds.StudyInstanceUID,
                       "SeriesInstanceUID": ds.SeriesInstanceUID, "SOPInstanceUID": ds.SOPInstanceUID},
            [str(ds.SOPClassUID)], [str(ds.file_meta.TransferSyntaxUID)])
        assert final.Status == 0 and len(received) == 1, f.name
        sent, stored = raw[str(ds.SOPInstanceUID)], dataset_bytes(f)
        if ds.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian:
            # the python receiver sends what pydicom re-deflates: the same data set, another deflate stream
            # (docs/conformance.md)
            assert zlib.decompress(sent, -15) == zlib.decompress(stored, -15), f.name
        else:
            assert sent == stored, f.name


def test_sigterm_shuts_down_cleanly(make_server: Factory, corpus: list[Path]) -> None:
    srv = make_server()
    assert scu.store(srv.port, corpus[:2])[0].Status == 0
    assert srv.stop() == 0
    assert "vna stopped" in srv.log.read_text()
    assert not list((srv.data_dir / "hot" / "r1" / ".tmp").iterdir())


def test_associations_do_not_leak_index_connections(make_server: Factory, corpus: list[Path]) -> None:
    """Each association runs in its own thread with its own SQLite connection; it is closed with the thread.

    (They used to accumulate: two open files per association served, until the process ran out.)
    """
    srv = make_server()
    assert srv.proc is not None

    def index_files() -> int:
        fd_dir = Path(f"/proc/{srv.proc.pid}/fd")  # type: ignore[union-attr]
        return sum(1 for fd in fd_dir.iterdir() if "index.sqlite" in str(fd.resolve(strict=False)))

    for p in corpus * 2:  # one association per store
        assert [s.Status for s in scu.store(srv.port, [p])] == [0]
    assert _stats(srv)["instances"] == len(corpus)
    assert index_files() <= 8, index_files()


def test_idle_and_silent_connections_are_closed_by_their_timers(make_server: Factory, corpus: list[Path]) -> None:
    """An established association that goes quiet is closed after dicom.network_timeout;
    a TCP connection that never sends an A-ASSOCIATE-RQ after dicom.acse_timeout.
    Meanwhile the server keeps serving other associations.
    """
    import socket
    import time

    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    srv = make_server("[dicom]\nnetwork_timeout = 1.0\nacse_timeout = 1.0\n")
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(Verification)
    idle = ae.associate("127.0.0.1", srv.port, ae_title="VNA")
    assert idle.is_established
    silent = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    try:
        assert scu.store(srv.port, corpus[:1])[0].Status == 0  # others are served meanwhile
        deadline = time.monotonic() + 10
        while idle.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not idle.is_alive() and not idle.is_established  # closed by the server's network timeout
        assert idle.is_released or idle.is_aborted
        silent.settimeout(10)
        assert silent.recv(1024) == b""  # the server closed the silent connection (ARTIM)
    finally:
        silent.close()
        if idle.is_alive():
            idle.abort()
    assert scu.echo(srv.port)
