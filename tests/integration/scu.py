"""Small pynetdicom SCU helpers for the integration tests (the archive is the real server)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, StoragePresentationContexts, build_role, evt
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)


def _ae() -> AE:
    ae = AE(ae_title="TESTSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    return ae


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
    ds = Dataset()
    for k, v in identifier.items():
        setattr(ds, k, v)
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

    ds = Dataset()
    for k, v in identifier.items():
        setattr(ds, k, v)
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
    ds = Dataset()
    for k, v in identifier.items():
        setattr(ds, k, v)
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


__all__ = ["store", "store_dataset", "find", "get", "move", "echo", "StoragePresentationContexts"]
