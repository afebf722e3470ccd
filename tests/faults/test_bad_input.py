"""Bad input over DIMSE: a clear failure status or abort, the server keeps serving, nothing partial stays."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Callable

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import P_DATA_TF

from tests.conftest import VnaServer, dataset_bytes
from tests.integration import scu

Factory = Callable[..., VnaServer]


def _instances(srv: VnaServer) -> int:
    r = srv.cli("index", "stats", "--json")
    assert r.returncode == 0, r.stderr
    return int(json.loads(r.stdout)["instances"])


def _blobs(srv: VnaServer) -> list[Path]:
    return [p for p in (srv.data_dir / "hot").rglob("*") if p.is_file()]


def _nothing_left(srv: VnaServer) -> None:
    """No blob, no temp file, no spool file, no index row."""
    assert _instances(srv) == 0
    assert _blobs(srv) == []
    spool = srv.data_dir / "spool" / "incoming"
    assert not spool.exists() or list(spool.iterdir()) == []


def _still_serving(srv: VnaServer, good: Path) -> None:
    assert scu.echo(srv.port)
    assert scu.store(srv.port, [good])[0].Status == 0


def test_invalid_uids_are_refused(make_server: Factory, corpus: list[Path]) -> None:
    srv = make_server()
    base = dcmread(corpus[0])
    cases = {
        "SOPInstanceUID": "../../etc/passwd",
        "StudyInstanceUID": "1.2." + "3" * 70,
        "SeriesInstanceUID": "1.2.abc",
    }
    for kw, bad in cases.items():
        ds = dcmread(corpus[0])
        setattr(ds, kw, bad)
        if kw == "SOPInstanceUID":
            ds.file_meta.MediaStorageSOPInstanceUID = bad
        rsp = scu.store_dataset(srv.port, ds)
        assert rsp.Status == 0xC0E1, (kw, rsp)
        assert kw in str(rsp.ErrorComment)
    ds = dcmread(corpus[0])
    del ds.SeriesInstanceUID
    rsp = scu.store_dataset(srv.port, ds)
    assert rsp.Status == 0xC0E1 and "SeriesInstanceUID is missing" in str(rsp.ErrorComment)
    _nothing_left(srv)
    assert not Path("/etc/passwd.v1").exists()
    _still_serving(srv, corpus[1])
    assert str(base.SOPInstanceUID) != ""


def _with_body(src: Path, body: bytes, dst: Path) -> Path:
    """A copy of ``src`` keeping its preamble and file meta, with ``body`` as the dataset."""
    raw = src.read_bytes()
    dst.write_bytes(raw[: len(raw) - len(dataset_bytes(src))] + body)
    return dst


def test_dataset_contradicting_its_command_is_refused(make_server: Factory, corpus: list[Path],
                                                      tmp_path: Path) -> None:
    srv = make_server()
    ds = dcmread(corpus[0])
    meta = ds.file_meta
    ds.SOPInstanceUID = "1.2.3.4.5.6.7.8"  # the command (from file meta) names the original UID
    changed = tmp_path / "changed.dcm"
    ds.save_as(changed, enforce_file_format=True)
    rsp = scu.store_raw(srv.port, _with_body(corpus[0], dataset_bytes(changed), tmp_path / "x.dcm"),
                        str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID))
    assert rsp.Status == 0xC000 and "SOPInstanceUID differs from the request" in str(rsp.ErrorComment)
    _nothing_left(srv)
    _still_serving(srv, corpus[2])


def test_garbage_and_truncated_datasets_are_refused(make_server: Factory, corpus: list[Path], tmp_path: Path) -> None:
    srv = make_server()
    meta = dcmread(corpus[0], stop_before_pixels=True).file_meta
    body = dataset_bytes(corpus[0])
    bodies = {
        "garbage": b"\x08\x00\x16\x00UI\xff\xff" + b"\xde\xad\xbe\xef" * 64,
        "random": bytes(range(256)) * 8,
        "truncated header": body[:300],
        "truncated pixel data": body[: len(body) - 1000],
        "empty": b"",
    }
    for name, b in bodies.items():
        bad = _with_body(corpus[0], b, tmp_path / "bad.dcm")
        rsp = scu.store_raw(srv.port, bad, str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID))
        assert rsp.Status in (0xC000, 0xC0E1), (name, rsp)
    _nothing_left(srv)
    _still_serving(srv, corpus[1])


def test_unknown_sop_class_or_transfer_syntax_is_not_negotiated(make_server: Factory, corpus: list[Path]) -> None:
    srv = make_server()
    ct = dcmread(corpus[0], stop_before_pixels=True)
    for sop_class, syntax in (("1.2.3.4.5.6.7.8.9", ExplicitVRLittleEndian), (str(ct.SOPClassUID), "1.2.3.4.99")):
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(sop_class, syntax)
        assoc = ae.associate("127.0.0.1", srv.port, ae_title="VNA")
        assert not assoc.is_established or assoc.accepted_contexts == []
        if assoc.is_established:
            assoc.release()
    _still_serving(srv, corpus[0])


def _store_pdus(assoc: object, ds: Dataset, body: bytes) -> list[bytes]:
    """Encoded P-DATA-TF PDUs of a C-STORE-RQ for ``ds`` (dataset bytes ``body``) on the first context."""
    from io import BytesIO

    cx = assoc.accepted_contexts[0]  # type: ignore[attr-defined]
    prim = C_STORE()
    prim.MessageID = 1
    prim.AffectedSOPClassUID = ds.SOPClassUID
    prim.AffectedSOPInstanceUID = ds.SOPInstanceUID
    prim.Priority = 2
    prim.DataSet = BytesIO(body)
    msg = C_STORE_RQ()
    msg.primitive_to_message(prim)
    out = []
    for prim_pdata in msg.encode_msg(cx.context_id, 16384):
        pdu = P_DATA_TF()
        pdu.from_primitive(prim_pdata)
        out.append(pdu.encode())
    return out


def test_peer_disconnecting_mid_transfer_leaves_nothing(make_server: Factory, corpus: list[Path]) -> None:
    srv = make_server()
    ds = dcmread(corpus[0])
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(ds.SOPClassUID, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", srv.port, ae_title="VNA")
    assert assoc.is_established
    pdus = _store_pdus(assoc, ds, dataset_bytes(corpus[0]))
    assert len(pdus) > 4
    sock = assoc.dul.socket.socket
    for pdu in pdus[: len(pdus) // 2]:
        sock.sendall(pdu)
    sock.sendall(pdus[len(pdus) // 2][:100])  # a truncated PDU
    sock.shutdown(socket.SHUT_RDWR)
    sock.close()
    assoc.abort()
    _still_serving(srv, corpus[1])
    assert _instances(srv) == 1  # only the good one
    spool = srv.data_dir / "spool" / "incoming"
    assert list(spool.iterdir()) == []


def test_absurd_pdu_length_and_garbage_connections(make_server: Factory, corpus: list[Path]) -> None:
    srv = make_server()
    # an A-ASSOCIATE-RQ claiming 4 GiB, then hang up
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
        s.sendall(b"\x01\x00\xff\xff\xff\xff" + b"\x00" * 64)
    # an unknown PDU type
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
        s.sendall(b"\x99\x00\x00\x00\x00\x04abcd")
        try:
            s.recv(100)
        except OSError:
            pass
    # HTTP on the DICOM port
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            s.recv(100)
        except OSError:
            pass
    _still_serving(srv, corpus[0])


def test_calling_ae_allowlist(make_server: Factory, corpus: list[Path]) -> None:
    srv = make_server('[dicom]\nallowed_calling_aes = ["GOODPACS"]\n')
    assert not scu.echo(srv.port, calling="EVILPACS")
    assert scu.echo(srv.port, calling="GOODPACS")


def test_truncated_compressed_datasets_are_refused(make_server: Factory, tmp_path: Path) -> None:
    from pydicom.data import get_testdata_file

    srv = make_server()
    for name in ("image_dfl.dcm", "JPEG2000.dcm", "MR_small_RLE.dcm"):
        src = Path(str(get_testdata_file(name)))
        meta = dcmread(src, stop_before_pixels=True).file_meta
        body = dataset_bytes(src)
        bad = _with_body(src, body[: len(body) - 200], tmp_path / f"cut-{name}")
        rsp = scu.store_raw(srv.port, bad, str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID))
        assert rsp.Status in (0xC000, 0xC0E1), (name, rsp)
    _nothing_left(srv)
