"""vna.dicom.dimse_codec: byte-identical to pydicom for every command set and spool header it handles."""

from __future__ import annotations

from io import BytesIO

import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom import dimse_primitives as prim
from pynetdicom.dimse_messages import (C_ECHO_RQ, C_FIND_RSP, C_GET_RSP, C_MOVE_RQ, C_STORE_RQ, C_STORE_RSP,
                                       N_ACTION_RQ, N_EVENT_REPORT_RQ)
from pynetdicom.dsutils import create_file_meta, encode

from vna.dicom.dimse_codec import encode_command_set, encode_spool_meta

CT = "1.2.840.10008.5.1.4.1.1.2"
SOP = "1.2.826.0.1.3680043.10.1137.1.2.3.4.5"


def _store_rq() -> prim.C_STORE:
    p = prim.C_STORE()
    p.MessageID, p.AffectedSOPClassUID, p.AffectedSOPInstanceUID, p.Priority = 7, CT, SOP, 2
    p.MoveOriginatorApplicationEntityTitle, p.MoveOriginatorMessageID = "MOVER", 3
    p.DataSet = BytesIO(b"\0\0")
    return p


def _store_rsp(status: int, comment: str | None = None) -> prim.C_STORE:
    p = prim.C_STORE()
    p.MessageIDBeingRespondedTo, p.AffectedSOPClassUID, p.AffectedSOPInstanceUID, p.Status = 7, CT, SOP + "1", status
    if comment is not None:
        p.ErrorComment = comment
    return p


def _find_rsp() -> prim.C_FIND:
    p = prim.C_FIND()
    p.MessageIDBeingRespondedTo, p.AffectedSOPClassUID, p.Status = 1, "1.2.840.10008.5.1.4.1.2.2.1", 0xFF00
    p.Identifier = BytesIO(b"\0\0")
    return p


def _get_rsp() -> prim.C_GET:
    p = prim.C_GET()
    p.MessageIDBeingRespondedTo, p.AffectedSOPClassUID, p.Status = 1, "1.2.840.10008.5.1.4.1.2.2.3", 0xB000
    p.NumberOfRemainingSuboperations, p.NumberOfCompletedSuboperations = 0, 65535
    p.NumberOfFailedSuboperations, p.NumberOfWarningSuboperations = 2, 1
    return p


def _move_rq() -> prim.C_MOVE:
    p = prim.C_MOVE()
    p.MessageID, p.AffectedSOPClassUID, p.Priority, p.MoveDestination = 5, "1.2.840.10008.5.1.4.1.2.2.2", 0, "DEST"
    p.Identifier = BytesIO(b"\0\0")
    return p


def _echo_rq() -> prim.C_ECHO:
    p = prim.C_ECHO()
    p.MessageID, p.AffectedSOPClassUID = 1, "1.2.840.10008.1.1"
    return p


def _action_rq() -> prim.N_ACTION:
    p = prim.N_ACTION()
    p.MessageID, p.RequestedSOPClassUID, p.RequestedSOPInstanceUID, p.ActionTypeID = 3, "1.2.840.10008.1.20.1", \
        "1.2.840.10008.1.20.1.1", 1
    p.ActionInformation = BytesIO(b"\0\0")
    return p


def _report_rq() -> prim.N_EVENT_REPORT:
    p = prim.N_EVENT_REPORT()
    p.MessageID, p.AffectedSOPClassUID, p.AffectedSOPInstanceUID, p.EventTypeID = 9, "1.2.840.10008.1.20.1", \
        "1.2.840.10008.1.20.1.1", 2
    p.EventInformation = BytesIO(b"\0\0")
    return p


CASES = {
    "c-store-rq": (C_STORE_RQ, _store_rq), "c-store-rsp": (C_STORE_RSP, lambda: _store_rsp(0)),
    "c-store-rsp-error": (C_STORE_RSP, lambda: _store_rsp(0xA700, "out of resources: disk")),
    "c-store-rsp-odd-comment": (C_STORE_RSP, lambda: _store_rsp(0xC000, "odd")),
    "c-find-rsp": (C_FIND_RSP, _find_rsp), "c-get-rsp": (C_GET_RSP, _get_rsp), "c-move-rq": (C_MOVE_RQ, _move_rq),
    "c-echo-rq": (C_ECHO_RQ, _echo_rq), "n-action-rq": (N_ACTION_RQ, _action_rq),
    "n-event-report-rq": (N_EVENT_REPORT_RQ, _report_rq),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_command_sets_encode_like_pydicom(name: str) -> None:
    cls, make = CASES[name]
    msg = cls()
    msg.primitive_to_message(make())  # what pynetdicom sends
    fast = encode_command_set(msg.command_set)
    assert fast is not None, "the fast path declined a standard command set"
    assert fast == encode(msg.command_set, True, True)


def test_command_sets_it_cannot_encode_exactly_are_declined() -> None:
    ds = Dataset()
    ds.ErrorComment = "Ærger"  # not ASCII: pydicom's character set handling decides
    assert encode_command_set(ds) is None
    ds = Dataset()
    ds.PatientName = "X"  # not a command element
    assert encode_command_set(ds) is None


@pytest.mark.parametrize("sop_class,sop,ts", [
    (CT, SOP, "1.2.840.10008.1.2.1"),                # odd/even lengths vary
    (CT + "0", SOP + "12", "1.2.840.10008.1.2"),
    ("1.2.840.10008.5.1.4.1.1.4", "1.2.3", "1.2.840.10008.1.2.4.80"),
])
def test_spool_meta_encodes_like_pydicom(sop_class: str, sop: str, ts: str) -> None:
    meta = create_file_meta(sop_class_uid=sop_class, sop_instance_uid=sop, transfer_syntax=ts)
    expected = DicomBytesIO()
    write_file_meta_info(expected, meta)
    fast = encode_spool_meta(sop_class, sop, ts, PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION)
    assert fast == expected.getvalue()
    assert encode_spool_meta(sop_class, "", ts, PYNETDICOM_IMPLEMENTATION_UID, "") is None
