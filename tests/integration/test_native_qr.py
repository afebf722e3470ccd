"""dicom.receiver = "native" answers Query/Retrieve and Storage Commitment as the Python receiver does.

Differential: two real ``vna serve`` processes (one per receiver) given the same
instances; pynetdicom and DCMTK SCUs ask both the same things and compare the
answers, the retrieved bytes, the sub-operation counts and statuses.
"""

from __future__ import annotations

import socket
import struct
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import StorageCommitmentPushModel, StudyRootQueryRetrieveInformationModelGet

from tests.conftest import DCMTK_ENV, StoreScp, VnaServer, dataset_bytes, free_port
from tests.integration import scu
from tests.integration.receivers import NATIVE, native_built  # noqa: F401 -- autouse
from tests.integration.scu import EXPLICIT, IMPLICIT, STUDY_FIND, associate_rq, pdata

pytestmark = pytest.mark.dcmtk

Factory = Callable[..., VnaServer]


def _pair(make_server: Factory, corpus: list[Path], extra: str = "") -> tuple[VnaServer, VnaServer]:
    """A Python and a native receiver holding the same instances."""
    py = make_server(extra)
    nv = make_server(NATIVE + extra if "[dicom]" not in extra else extra.replace("[dicom]\n", NATIVE, 1))
    for srv in (py, nv):
        assert all(s.Status == 0 for s in scu.store(srv.port, corpus, ae_title="MODALITY"))
    return py, nv


def _plain(ds: Dataset) -> dict[str, str]:
    return {str(e.keyword or e.tag): str(e.value) for e in ds}


def _answers(port: int, identifier: dict[str, Any], patient_root: bool = False) -> tuple[list[dict[str, str]], int]:
    rows, final = scu.find(port, identifier, patient_root=patient_root)
    return sorted((_plain(r) for r in rows), key=repr), final


def _counts(rsp: Dataset) -> tuple[int, ...]:
    return (int(rsp.Status), int(rsp.get("NumberOfCompletedSuboperations", -1)),
            int(rsp.get("NumberOfFailedSuboperations", -1)), int(rsp.get("NumberOfWarningSuboperations", -1)))


def test_c_find_answers_are_the_python_receivers(make_server: Factory, corpus: list[Path]) -> None:
    py, nv = _pair(make_server, corpus)
    mr = dcmread([p for p in corpus if p.name.startswith("mr-")][0], stop_before_pixels=True)
    queries: list[tuple[dict[str, Any], bool]] = [
        ({"QueryRetrieveLevel": "STUDY", "PatientName": "test*", "StudyInstanceUID": "", "ModalitiesInStudy": "",
          "NumberOfStudyRelatedSeries": "", "NumberOfStudyRelatedInstances": "", "RetrieveAETitle": "",
          "InstanceAvailability": "", "OtherPatientIDs": "", "SpecificCharacterSet": "ISO_IR 100"}, False),
        ({"QueryRetrieveLevel": "STUDY", "ModalitiesInStudy": ["MR", "OT"], "StudyInstanceUID": ""}, False),
        ({"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": mr.StudyInstanceUID, "SeriesInstanceUID": "",
          "Modality": "", "NumberOfSeriesRelatedInstances": ""}, False),
        ({"QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": mr.StudyInstanceUID,
          "SeriesInstanceUID": mr.SeriesInstanceUID, "SOPInstanceUID": "", "InstanceNumber": ""}, False),
        ({"QueryRetrieveLevel": "PATIENT", "PatientID": "", "PatientName": "",
          "NumberOfPatientRelatedStudies": ""}, True),
        ({"QueryRetrieveLevel": "STUDY", "PatientID": "*", "StudyInstanceUID": ""}, True),
        ({"QueryRetrieveLevel": "PATIENT", "PatientID": ""}, False),   # not part of Study Root: 0xA900
        ({"QueryRetrieveLevel": "WARD", "PatientID": ""}, False),      # no such level: 0xA900
    ]
    for identifier, patient_root in queries:
        want = _answers(py.port, identifier, patient_root)
        got = _answers(nv.port, identifier, patient_root)
        assert got == want, identifier
    assert _answers(nv.port, queries[0][0])[0], "the differential compares matches, not two empty answers"
    assert _answers(nv.port, queries[-1][0])[1] == 0xA900


def test_c_get_bytes_counts_and_failures_are_the_python_receivers(make_server: Factory, corpus: list[Path]) -> None:
    py, nv = _pair(make_server, corpus)
    mr = dcmread([p for p in corpus if p.name.startswith("mr-")][0], stop_before_pixels=True)
    classes = sorted({str(dcmread(p, stop_before_pixels=True).SOPClassUID) for p in corpus})
    asks: list[tuple[dict[str, Any], list[str] | None]] = [
        ({"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": mr.StudyInstanceUID,
          "SeriesInstanceUID": mr.SeriesInstanceUID}, None),
        ({"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": mr.StudyInstanceUID}, [IMPLICIT]),   # converted
        ({"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "1.2.3.999"}, None),                 # no match
        ({"QueryRetrieveLevel": "STUDY", "PatientName": "test*"}, None),                          # no unique key
        ({"QueryRetrieveLevel": "STUDY", "PatientID": "x"}, None),                                # not Study Root's
    ]
    for identifier, syntaxes in asks:
        _, want, want_raw = scu.get(py.port, identifier, classes, syntaxes)
        _, got, got_raw = scu.get(nv.port, identifier, classes, syntaxes)
        assert _counts(got) == _counts(want), identifier
        assert got_raw == want_raw, identifier
    _, final, raw = scu.get(nv.port, asks[0][0], classes)
    mr_paths = [p for p in corpus if p.name.startswith("mr-")]
    assert _counts(final) == (0, len(mr_paths), 0, 0)
    assert raw == {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): dataset_bytes(p) for p in mr_paths}
    _, final, _ = scu.get(nv.port, asks[3][0], classes)
    assert _counts(final) == (0xA900, 0, 1, 0)


def test_getscu_roundtrip_is_byte_identical(make_server: Factory, corpus: list[Path], tmp_path: Path) -> None:
    srv = make_server(NATIVE)
    assert all(s.Status == 0 for s in scu.store(srv.port, corpus))
    assert scu.getscu_roundtrip(srv.port, corpus, tmp_path / "got") == 3


def _hot_copies(srv: VnaServer, uid: str) -> list[Path]:
    return sorted(p for p in (srv.data_dir / "hot").rglob("*.dcm") if p.name.startswith(uid))


def test_a_damaged_hot_copy_is_skipped_for_a_good_one(make_server: Factory, corpus: list[Path]) -> None:
    py, nv = _pair(make_server, corpus)
    path = [p for p in corpus if p.name.startswith("mr-")][0]
    ds = dcmread(path, stop_before_pixels=True)
    uid = str(ds.SOPInstanceUID)
    identifier = {"QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": ds.StudyInstanceUID,
                  "SeriesInstanceUID": ds.SeriesInstanceUID, "SOPInstanceUID": uid}
    for srv in (py, nv):
        copies = _hot_copies(srv, uid)
        assert len(copies) == 2
        damaged = bytearray(copies[0].read_bytes())
        damaged[-1] ^= 0xFF
        copies[0].write_bytes(bytes(damaged))
        _, final, raw = scu.get(srv.port, identifier, [str(ds.SOPClassUID)])
        assert _counts(final) == (0, 1, 0, 0)
        assert raw[uid] == dataset_bytes(path)
        r = srv.cli("index", "stats", "--json")
        assert r.returncode == 0, r.stderr
        assert '"CORRUPT": 1' in r.stdout, r.stdout   # the bad copy is marked as the Python path marks it
    # both copies bad: the sub-operation fails and names the instance
    copies = _hot_copies(nv, uid)
    for c in copies:
        c.write_bytes(b"\0" * 200)
    _, final, raw = scu.get(nv.port, identifier, [str(ds.SOPClassUID)])
    assert _counts(final) == (0xA702, 0, 1, 0)
    assert raw == {}


def _raw_association(port: int, contexts: list[tuple[int, str, list[str]]]) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(associate_rq(contexts))
    head = _recv(s, 6)
    assert head[0] == 2, head      # A-ASSOCIATE-AC
    _recv(s, struct.unpack(">I", head[2:6])[0])
    return s


def _recv(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        assert chunk, "connection closed"
        out += chunk
    return out


def _command(elements: list[tuple[int, bytes]]) -> bytes:
    body = b"".join(struct.pack("<HHI", 0, e, len(v)) + v for e, v in elements)
    return struct.pack("<HHI", 0, 0, 4) + struct.pack("<I", len(body)) + body


def _responses(s: socket.socket) -> Iterator[dict[int, bytes]]:
    """Command sets received (data sets skipped), until the connection closes."""
    buf = b""
    while True:
        head = _recv(s, 6)
        body = _recv(s, struct.unpack(">I", head[2:6])[0])
        pos = 0
        while pos < len(body):
            length, _cx, mch = struct.unpack(">IBB", body[pos:pos + 6])
            data = body[pos + 6:pos + 4 + length]
            pos += 4 + length
            if mch & 1:
                buf += data
                if mch & 2:
                    cmd, at = {}, 0
                    while at < len(buf):
                        _g, e, n = struct.unpack("<HHI", buf[at:at + 8])
                        cmd[e] = buf[at + 8:at + 8 + n]
                        at += 8 + n
                    buf = b""
                    yield cmd


def test_c_cancel_of_a_c_find_answers_cancel(make_server: Factory, corpus: list[Path]) -> None:
    srv = make_server(NATIVE)
    assert all(s.Status == 0 for s in scu.store(srv.port, corpus))
    s = _raw_association(srv.port, [(1, STUDY_FIND, [IMPLICIT])])
    ident = Dataset()
    ident.QueryRetrieveLevel = "IMAGE"
    ident.SOPInstanceUID = ""
    from pynetdicom.dsutils import encode
    data = encode(ident, True, True)
    assert data is not None
    find = _command([(0x0002, STUDY_FIND.encode() + b"\0"), (0x0100, struct.pack("<H", 0x0020)),
                     (0x0110, struct.pack("<H", 7)), (0x0700, struct.pack("<H", 0)),
                     (0x0800, struct.pack("<H", 1))])
    cancel = _command([(0x0100, struct.pack("<H", 0x0FFF)), (0x0120, struct.pack("<H", 7)),
                       (0x0800, struct.pack("<H", 0x0101))])
    # the request, its identifier and the cancel arrive together: nothing matches before the cancel is seen
    s.sendall(pdata((1, 3, find)) + pdata((1, 2, data)) + pdata((1, 3, cancel)))
    statuses = []
    for cmd in _responses(s):
        status = struct.unpack("<H", cmd[0x0900])[0]
        statuses.append(status)
        if status != 0xFF00:
            break
    s.close()
    assert statuses == [0xFE00]


def test_c_cancel_of_a_c_get_stops_its_sub_operations(make_server: Factory, corpus: list[Path]) -> None:
    py, nv = _pair(make_server, corpus)
    ct = [p for p in corpus if p.name.startswith("ct-")]
    ds = dcmread(ct[0], stop_before_pixels=True)
    for srv in (py, nv):
        ae = AE(ae_title="TESTSCU")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
        ae.add_requested_context(ds.SOPClassUID, [EXPLICIT, IMPLICIT])
        holder: dict[str, Any] = {}

        def on_store(event: Any) -> int:
            if "sent" not in holder:   # cancel at the first sub-operation, before answering it
                holder["sent"] = True
                holder["assoc"].send_c_cancel(holder["msg_id"], holder["cx"])
            return 0

        assoc = ae.associate("127.0.0.1", srv.port, ae_title="VNA", ext_neg=[build_role(ds.SOPClassUID, scp_role=True)],
                             evt_handlers=[(evt.EVT_C_STORE, on_store)])
        assert assoc.is_established
        holder["assoc"] = assoc
        holder["msg_id"] = 1
        holder["cx"] = [cx.context_id for cx in assoc.accepted_contexts
                        if cx.abstract_syntax == StudyRootQueryRetrieveInformationModelGet][0]
        ident = Dataset()
        ident.QueryRetrieveLevel = "STUDY"
        ident.StudyInstanceUID = ds.StudyInstanceUID
        final = None
        for status, _ in assoc.send_c_get(ident, StudyRootQueryRetrieveInformationModelGet, msg_id=1):
            if status is not None and "Status" in status and status.Status != 0xFF00:
                final = status
        assoc.release()
        assert final is not None
        assert (int(final.Status), int(final.NumberOfCompletedSuboperations),
                int(final.NumberOfRemainingSuboperations)) == (0xFE00, 1, 2), srv


def test_storage_commitment_report_reaches_a_pynetdicom_scp(make_server: Factory, corpus: list[Path]) -> None:
    port = free_port()
    with scu.commitment_scp(port) as reports:
        nv = make_server(NATIVE + f'[[dicom.remote]]\nae_title = "MODALITY"\nhost = "127.0.0.1"\nport = {port}\n')
        assert all(r.Status == 0 for r in scu.store(nv.port, corpus[:2], ae_title="MODALITY"))
        items = scu.commitment_items(corpus[:2])
        items.append((items[0][0], "1.2.3.4.5.404"))
        req = scu.commitment_request(items)
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(StorageCommitmentPushModel)
        assoc = ae.associate("127.0.0.1", nv.port, ae_title="VNA")
        assert assoc.is_established
        status, _ = assoc.send_n_action(req, 1, StorageCommitmentPushModel, scu.COMMITMENT_INSTANCE)
        # malformed action information: invalid argument value, as the Python receiver answers
        bad = Dataset()
        bad.PatientID = "no TransactionUID"
        status2, _ = assoc.send_n_action(bad, 1, StorageCommitmentPushModel, scu.COMMITMENT_INSTANCE)
        assoc.release()
        assert int(status.Status) == 0
        assert int(status2.Status) == 0x0115
        event_type, info = reports.get(timeout=30)
        assert event_type == 2
        assert str(info.TransactionUID) == str(req.TransactionUID)
        assert sorted(str(i.ReferencedSOPInstanceUID) for i in info.ReferencedSOPSequence) == sorted(
            u for _, u in items[:2])
        assert [(str(i.ReferencedSOPInstanceUID), int(i.FailureReason)) for i in info.FailedSOPSequence] == [
            ("1.2.3.4.5.404", 0x0112)]


def test_c_move_to_storescp_counts_bytes_and_refusals_are_the_python_receivers(
        make_server: Factory, corpus: list[Path], storescp: StoreScp) -> None:
    dest = f'[[dicom.remote]]\nae_title = "DEST"\nhost = "127.0.0.1"\nport = {storescp.port}\n'
    py, nv = _pair(make_server, corpus, dest)
    ct = [p for p in corpus if p.name.startswith("ct-7-0001")]
    ds = dcmread(ct[0], stop_before_pixels=True)
    study = {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": ds.StudyInstanceUID}
    results = []
    for srv in (py, nv):
        for f in storescp.files():
            f.unlink()
        responses, final = scu.move(srv.port, study, "DEST")
        pending = [int(r.NumberOfRemainingSuboperations) for r in responses if r.Status == 0xFF00]
        received = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID): dataset_bytes(f)
                    for f in storescp.files()}
        refusals = [_counts(scu.move(srv.port, study, "NOWHERE")[1]),
                    _counts(scu.move(srv.port, {"QueryRetrieveLevel": "STUDY", "PatientName": "x*"}, "DEST")[1]),
                    _counts(scu.move(srv.port, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "1.2.3.999"},
                                     "DEST")[1])]
        results.append((_counts(final), pending, received, refusals))
    assert results[1] == results[0]
    final, pending, received, refusals = results[1]
    assert final == (0, len(ct), 0, 0) and pending == [2, 1, 0]
    assert received == {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): dataset_bytes(p) for p in ct}
    assert [r[0] for r in refusals] == [0xA801, 0xA900, 0]


def test_movescu_through_the_native_receiver(make_server: Factory, corpus: list[Path], storescp: StoreScp) -> None:
    srv = make_server(NATIVE + f'[[dicom.remote]]\nae_title = "DEST"\nhost = "127.0.0.1"\nport = {storescp.port}\n')
    assert all(s.Status == 0 for s in scu.store(srv.port, corpus))
    mr = [p for p in corpus if p.name.startswith("mr-")]
    ds = dcmread(mr[0], stop_before_pixels=True)
    r = subprocess.run(["movescu", "-S", "-aec", "VNA", "-aem", "DEST", "-k", "QueryRetrieveLevel=SERIES",
                        "-k", f"StudyInstanceUID={ds.StudyInstanceUID}", "-k", f"SeriesInstanceUID={ds.SeriesInstanceUID}",
                        "127.0.0.1", str(srv.port)], env=DCMTK_ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    got = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID): dataset_bytes(f) for f in storescp.files()}
    assert got == {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): dataset_bytes(p) for p in mr}


def test_c_move_sub_operations_name_the_move_originator(make_server: Factory, corpus: list[Path]) -> None:
    """The destination sees the requester's AE title and the C-MOVE's message ID (PS3.7 9.3.1.1),
    and an uncompressed instance re-encoded in the one syntax the destination accepts."""
    seen: list[tuple[str, int, str, bytes]] = []

    def on_store(event: Any) -> int:
        rq = event.request
        seen.append((str(rq.MoveOriginatorApplicationEntityTitle).strip(), int(rq.MoveOriginatorMessageID),
                     str(event.context.transfer_syntax), rq.DataSet.getvalue()))
        return 0

    port = free_port()
    listener = AE(ae_title="DEST2")
    mr = [p for p in corpus if p.name.startswith("mr-")]
    ds = dcmread(mr[0], stop_before_pixels=True)
    listener.add_supported_context(ds.SOPClassUID, [IMPLICIT])
    server = listener.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        dest = f'[[dicom.remote]]\nae_title = "DEST2"\nhost = "127.0.0.1"\nport = {port}\n'
        py, nv = _pair(make_server, mr, dest)
        out = []
        for srv in (py, nv):
            seen.clear()
            ae = AE(ae_title="MOVER")
            ae.add_requested_context("1.2.840.10008.5.1.4.1.2.2.2")
            assoc = ae.associate("127.0.0.1", srv.port, ae_title="VNA")
            assert assoc.is_established
            ident = Dataset()
            ident.QueryRetrieveLevel = "STUDY"
            ident.StudyInstanceUID = ds.StudyInstanceUID
            statuses = [int(s.Status) for s, _ in assoc.send_c_move(ident, "DEST2", "1.2.840.10008.5.1.4.1.2.2.2",
                                                                    msg_id=41) if s is not None and "Status" in s]
            assoc.release()
            assert statuses[-1] == 0
            out.append(sorted(seen))
        assert out[1] == out[0]
        assert [(ae_title, msg_id, ts) for ae_title, msg_id, ts, _ in out[1]] == [("MOVER", 41, IMPLICIT)] * len(mr)
    finally:
        server.shutdown()


def test_q_r_operations_are_counted_as_the_python_receiver_counts_them(make_server: Factory,
                                                                       corpus: list[Path]) -> None:
    from tests.integration.test_telemetry import _sample, _scrape

    samples = []
    for receiver in ("python", "native"):
        port = free_port()
        srv = make_server(f'[dicom]\nreceiver = "{receiver}"\n[telemetry]\nenabled = true\nprometheus_port = {port}\n')
        mr = [p for p in corpus if p.name.startswith("mr-")]
        assert all(r.Status == 0 for r in scu.store(srv.port, mr))
        ds = dcmread(mr[0], stop_before_pixels=True)
        rows, final = scu.find(srv.port, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": ""})
        assert (len(rows), final) == (1, 0)
        assert scu.find(srv.port, {"QueryRetrieveLevel": "PATIENT", "PatientID": ""})[1] == 0xA900
        _, final, _ = scu.get(srv.port, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": ds.StudyInstanceUID},
                              [str(ds.SOPClassUID)])
        assert final.Status == 0
        body = ""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:   # the C-GET's sample is taken when its operation ends
            _, body = _scrape(port)
            if 'op="c-get"' in body:
                break
            time.sleep(0.1)
        samples.append([_sample(body, "vna_dimse_operations_total", labels) for labels in (
            '{op="c-find",status="0x0000"}', '{op="c-find",status="0xA900"}', '{op="c-get",status="0x0000"}')]
            + [_sample(body, "vna_retrieve_instances_total", '{op="c-get"}')])
    assert samples[1] == samples[0] == [1, 1, 1, len(mr)]


def test_a_destination_aborting_mid_move_fails_the_rest(make_server: Factory, corpus: list[Path]) -> None:
    """The destination aborts at the second C-STORE: one completed, the rest failed, on both receivers."""
    stores: list[str] = []

    def on_store(event: Any) -> int:
        stores.append(str(event.request.AffectedSOPInstanceUID))
        if len(stores) == 2:
            event.assoc.abort()
        return 0

    ct = [p for p in corpus if p.name.startswith("ct-7-0001")]
    ds = dcmread(ct[0], stop_before_pixels=True)
    port = free_port()
    listener = AE(ae_title="FLAKY")
    listener.add_supported_context(ds.SOPClassUID, [EXPLICIT, IMPLICIT])
    server = listener.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        py, nv = _pair(make_server, ct, f'[[dicom.remote]]\nae_title = "FLAKY"\nhost = "127.0.0.1"\nport = {port}\n')
        finals = []
        for srv in (py, nv):
            stores.clear()
            _, final = scu.move(srv.port, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": ds.StudyInstanceUID},
                                "FLAKY")
            finals.append(_counts(final))
        assert finals[1] == finals[0] == (0xB000, 1, len(ct) - 1, 0)
    finally:
        server.shutdown()
