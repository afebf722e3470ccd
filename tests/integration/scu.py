"""Small SCU helpers for the integration tests (the archive is the real server): pynetdicom
requests, a Storage Commitment report listener, DCMTK getscu, and hand-built PDUs."""

from __future__ import annotations

import queue
import struct
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, StoragePresentationContexts, build_role, evt
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StorageCommitmentPushModel,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from tests.conftest import DCMTK_ENV, dataset_bytes

IMPLICIT = "1.2.840.10008.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
STUDY_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"


def _ae() -> AE:
    ae = AE(ae_title="TESTSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    return ae


def _identifier(keys: dict[str, Any]) -> Dataset:
    """A query/retrieve identifier holding ``keys`` (keyword -> value)."""
    ds = Dataset()
    for k, v in keys.items():
        setattr(ds, k, v)
    return ds


def store(port: int, paths: list[Path], ae_title: str = "TESTSCU") -> list[Dataset]:
    """C-STORE each file on one association; returns the response datasets (Status, ErrorComment)."""
    ae = _ae()
    ae.ae_title = ae_title
    datasets = [dcmread(p) for p in paths]
    for cls, ts in {(str(d.SOPClassUID), str(d.file_meta.TransferSyntaxUID)) for d in datasets}:
        ae.add_requested_context(cls, ts)
    assoc = ae.associate("127.0.0.1", port, ae_title="VNA")
    assert assoc.is_established, "association rejected"
    try:
        return [assoc.send_c_store(d) for d in datasets]
    finally:
        assoc.release()


def store_dataset(port: int, ds: Dataset | Path, ts: str | None = None) -> Dataset:
    """C-STORE one in-memory dataset, or a file's bytes exactly as they are (a Path)."""
    from pynetdicom import _config

    ae = _ae()
    head = dcmread(ds, stop_before_pixels=True) if isinstance(ds, Path) else ds
    ae.add_requested_context(head.SOPClassUID, ts or head.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="VNA")
    assert assoc.is_established
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = isinstance(ds, Path)
    try:
        return assoc.send_c_store(ds)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
        assoc.release()


def store_raw(port: int, path: Path, sop_class: str, ts: str) -> Dataset:
    """C-STORE a file's dataset bytes as they are, without parsing them on the client side."""
    from pynetdicom import _config

    ae = _ae()
    ae.add_requested_context(sop_class, ts)
    assoc = ae.associate("127.0.0.1", port, ae_title="VNA")
    assert assoc.is_established
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        return assoc.send_c_store(path)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
        assoc.release()


def find(port: int, identifier: dict[str, Any], patient_root: bool = False) -> tuple[list[Dataset], int]:
    """C-FIND; returns (pending identifiers, final status)."""
    model = PatientRootQueryRetrieveInformationModelFind if patient_root else StudyRootQueryRetrieveInformationModelFind
    ae = _ae()
    ae.add_requested_context(model)
    ds = _identifier(identifier)
    assoc = ae.associate("127.0.0.1", port, ae_title="VNA")
    assert assoc.is_established
    out: list[Dataset] = []
    final = -1
    try:
        for status, ident in assoc.send_c_find(ds, model):
            if status is None or "Status" not in status:
                break
            if status.Status in (0xFF00, 0xFF01):
                out.append(ident)
            else:
                final = int(status.Status)
    finally:
        assoc.release()
    return out, final


def get(port: int, identifier: dict[str, Any], sop_classes: list[str], syntaxes: list[str] | None = None
        ) -> tuple[list[Dataset], Dataset, dict[str, bytes]]:
    """C-GET; returns (received datasets, final response, sop uid -> raw dataset bytes received)."""
    ae = _ae()
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    roles = []
    for cls in sop_classes:
        ae.add_requested_context(cls, syntaxes or ALL_TRANSFER_SYNTAXES[:])
        roles.append(build_role(cls, scp_role=True))
    received: list[Dataset] = []
    raw: dict[str, bytes] = {}

    def on_store(event: Any) -> int:
        ds = event.dataset
        received.append(ds)
        raw[str(ds.SOPInstanceUID)] = event.request.DataSet.getvalue()
        return 0

    ds = _identifier(identifier)
    assoc = ae.associate("127.0.0.1", port, ae_title="VNA", ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    final = Dataset()
    try:
        for status, _ in assoc.send_c_get(ds, StudyRootQueryRetrieveInformationModelGet):
            if status is not None and "Status" in status and status.Status not in (0xFF00, 0xFF01):
                final = status
    finally:
        assoc.release()
    return received, final, raw


def move(port: int, identifier: dict[str, Any], destination: str) -> tuple[list[Dataset], Dataset]:
    """C-MOVE; returns (all responses, final response)."""
    ae = _ae()
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    ds = _identifier(identifier)
    assoc = ae.associate("127.0.0.1", port, ae_title="VNA")
    assert assoc.is_established
    responses: list[Dataset] = []
    try:
        for status, _ in assoc.send_c_move(ds, destination, StudyRootQueryRetrieveInformationModelMove):
            if status is not None and "Status" in status:
                responses.append(status)
    finally:
        assoc.release()
    return responses, responses[-1] if responses else Dataset()


def echo(port: int, calling: str = "TESTSCU") -> bool:
    """C-ECHO; True on Success."""
    ae = _ae()
    ae.ae_title = calling
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="VNA")
    if not assoc.is_established:
        return False
    try:
        status = assoc.send_c_echo()
        return bool(status and status.Status == 0)
    finally:
        assoc.release()


def getscu_roundtrip(port: int, corpus: list[Path], out: Path) -> int:
    """DCMTK getscu fetches the study of ``corpus[0]`` into the new directory ``out``; asserts that it
    received exactly that study's instances of ``corpus``, each data set byte for byte. Returns their number."""
    out.mkdir()
    first = dcmread(corpus[0], stop_before_pixels=True)
    r = subprocess.run(["getscu", "-S", "-aec", "VNA", "-od", str(out), "-k", "QueryRetrieveLevel=STUDY",
                        "-k", f"StudyInstanceUID={first.StudyInstanceUID}", "127.0.0.1", str(port)],
                       env=DCMTK_ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    got = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in out.iterdir()}
    sent = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in corpus
            if dcmread(p, stop_before_pixels=True).StudyInstanceUID == first.StudyInstanceUID}
    assert set(got) == set(sent)
    for uid, p in sent.items():
        assert dataset_bytes(got[uid]) == dataset_bytes(p)
    return len(sent)


# -- Storage Commitment ---------------------------------------------------------------------
def commitment_items(paths: list[Path]) -> list[tuple[str, str]]:
    """(SOP class, SOP instance) of each file, in order: what a commitment request references."""
    items = []
    for p in paths:
        d = dcmread(p, stop_before_pixels=True)
        items.append((str(d.SOPClassUID), str(d.SOPInstanceUID)))
    return items


def commitment_request(items: list[tuple[str, str]]) -> Dataset:
    """N-ACTION information asking to commit (SOP class, SOP instance) pairs, with a new TransactionUID."""
    req = Dataset()
    req.TransactionUID = generate_uid()
    refs = []
    for cls, uid in items:
        item = Dataset()
        item.ReferencedSOPClassUID = cls
        item.ReferencedSOPInstanceUID = uid
        refs.append(item)
    req.ReferencedSOPSequence = refs
    return req


def request_commitment(port: int, calling: str, items: list[tuple[str, str]]) -> tuple[Dataset, int]:
    """Send one N-ACTION (Request Storage Commitment) for (class, instance) pairs; the request and its status."""
    req = commitment_request(items)
    ae = AE(ae_title=calling)
    ae.add_requested_context(StorageCommitmentPushModel)
    assoc = ae.associate("127.0.0.1", port, ae_title="VNA")
    assert assoc.is_established
    status, _ = assoc.send_n_action(req, 1, StorageCommitmentPushModel, COMMITMENT_INSTANCE)
    assoc.release()
    return req, int(status.Status)


@contextmanager
def commitment_scp(port: int, ae_title: str = "MODALITY") -> Iterator["queue.Queue[tuple[int, Dataset]]"]:
    """A pynetdicom Storage Commitment SCU/SCP listening on ``port`` inside the block; yields the queue of
    the N-EVENT-REPORTs it received as (event type, event information), each answered Success."""
    reports: "queue.Queue[tuple[int, Dataset]]" = queue.Queue()

    def on_report(event: Any) -> tuple[int, None]:
        reports.put((int(event.event_type), event.event_information))
        return 0x0000, None

    listener = AE(ae_title=ae_title)
    listener.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=True)
    server = listener.start_server(("127.0.0.1", port), block=False,
                                   evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)])
    assert server is not None
    try:
        yield reports
    finally:
        server.shutdown()


# -- hand-built PDUs ------------------------------------------------------------------------
def _item(kind: int, value: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(value)) + value


def associate_rq(contexts: list[tuple[int, str, list[str]]], calling: str = "RAWSCU", max_pdu: int = 16384) -> bytes:
    """An A-ASSOCIATE-RQ PDU to "VNA" proposing (context ID, abstract syntax, transfer syntaxes)."""
    body = struct.pack(">HH", 1, 0) + b"VNA".ljust(16) + calling.encode().ljust(16) + bytes(32)
    body += _item(0x10, b"1.2.840.10008.3.1.1.1")
    for cx_id, abstract, syntaxes in contexts:
        sub = _item(0x30, abstract.encode()) + b"".join(_item(0x40, ts.encode()) for ts in syntaxes)
        body += _item(0x20, bytes([cx_id, 0, 0, 0]) + sub)
    body += _item(0x50, _item(0x51, struct.pack(">I", max_pdu)) + _item(0x52, b"1.2.3.4"))
    return struct.pack(">BBI", 1, 0, len(body)) + body


def pdata(*pdvs: tuple[int, int, bytes]) -> bytes:
    """A P-DATA-TF PDU of (context ID, message control header, data) PDVs."""
    body = b"".join(struct.pack(">IBB", len(d) + 2, cx, mch) + d for cx, mch, d in pdvs)
    return struct.pack(">BBI", 4, 0, len(body)) + body


__all__ = ["store", "store_dataset", "find", "get", "move", "echo", "getscu_roundtrip", "commitment_items", "commitment_request",
           "request_commitment", "commitment_scp", "associate_rq", "pdata", "StoragePresentationContexts"]
