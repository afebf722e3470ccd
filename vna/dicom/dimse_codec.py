"""Byte-identical fast paths for the two encodings pynetdicom does with pydicom per DIMSE message.

- Command sets (group 0000, always Implicit VR Little Endian): pynetdicom
  encodes each outgoing one twice with ``pydicom.filewriter.write_dataset`` (once
  to learn the group length). ``encode_command_set`` writes the few VRs a command
  set uses directly.
- The File Meta header pynetdicom writes at the head of every spooled C-STORE
  dataset (``STORE_RECV_CHUNKED_DATASET``): ``encode_spool_meta``.

Both return None for anything they do not handle exactly (a VR not listed, a
non-ASCII value, a negative number...); the caller then takes pydicom's path,
so the bytes on the wire and on disk are the same either way. ``install()``
wires them into ``pynetdicom.dimse_messages`` (pynetdicom 3.0.x only).
"""

from __future__ import annotations

import logging
import struct
from typing import Any, cast

import pynetdicom
import pynetdicom.dimse_messages as dimse_messages
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

log = logging.getLogger(__name__)

_TEXT_PAD = {"AE": b" ", "CS": b" ", "LO": b" ", "SH": b" ", "ST": b" ", "LT": b" ", "DA": b" ", "TM": b" ",
             "IS": b" ", "UI": b"\0"}
_INT_FMT = {"US": ("H", 0xFFFF), "UL": ("I", 0xFFFFFFFF)}
_installed = False


def _values(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]


def _encode_value(vr: str, value: Any) -> bytes | None:
    if value is None or value == "" or (isinstance(value, (list, MultiValue)) and not value):
        return b""
    if vr in _INT_FMT:
        fmt, top = _INT_FMT[vr]
        vals = _values(value)
        if not all(type(v) is int and 0 <= v <= top for v in vals):
            return None
        return struct.pack(f"<{len(vals)}{fmt}", *vals)
    if vr == "AT":
        tags = _values(value)
        if not all(isinstance(t, int) and 0 <= t <= 0xFFFFFFFF for t in tags):
            return None
        return b"".join(struct.pack("<HH", t >> 16, t & 0xFFFF) for t in tags)
    pad = _TEXT_PAD.get(vr)
    if pad is None:
        return None
    parts = _values(value)
    if not all(isinstance(p, str) for p in parts):
        return None
    text = "\\".join(parts)
    if not text.isascii():
        return None
    raw = text.encode("ascii")
    return raw + pad if len(raw) % 2 else raw


def encode_command_set(ds: Dataset) -> bytes | None:
    """Implicit VR Little Endian encoding of a command set (group 0000 only), or None."""
    out: list[bytes] = []
    elems = ds._dict  # noqa: SLF001
    for tag in sorted(elems):
        if tag >> 16:
            return None
        elem = elems[tag]
        if type(elem) is not DataElement:
            return None
        raw = _encode_value(elem.VR, elem.value)
        if raw is None:
            return None
        out.append(struct.pack("<HHI", 0, tag & 0xFFFF, len(raw)))
        out.append(raw)
    return b"".join(out)


def _ui(tag_elem: int, value: Any, pad: bytes = b"\0", vr: bytes = b"UI") -> bytes | None:
    if not isinstance(value, str) or not value.isascii() or not value:
        return None
    raw = value.encode("ascii")
    if len(raw) % 2:
        raw += pad
    if len(raw) > 0xFFFF:
        return None
    return struct.pack("<HH", 2, tag_elem) + vr + struct.pack("<H", len(raw)) + raw


def encode_spool_meta(sop_class_uid: Any, sop_instance_uid: Any, transfer_syntax: Any,
                      implementation_uid: Any, implementation_version: Any) -> bytes | None:
    """The File Meta group (after preamble and "DICM") as pydicom writes it for these values, or None."""
    parts = [
        struct.pack("<HH", 2, 1) + b"OB\0\0" + struct.pack("<I", 2) + b"\x00\x01",
        _ui(0x0002, sop_class_uid), _ui(0x0003, sop_instance_uid), _ui(0x0010, transfer_syntax),
        _ui(0x0012, implementation_uid),
    ]
    parts.append(_ui(0x0013, implementation_version, b" ", b"SH"))
    if any(p is None for p in parts):
        return None
    body = b"".join(p for p in parts if p is not None)
    return struct.pack("<HH", 2, 0) + b"UL" + struct.pack("<HI", 4, len(body)) + body


class _SpoolMeta:
    """What ``create_file_meta`` was asked for, kept until ``write_file_meta_info`` writes it."""

    def __init__(self, kwargs: dict[str, Any]) -> None:
        self.kwargs = kwargs


def install() -> bool:
    """Use the fast encoders in pynetdicom's DIMSE messages (idempotent; pynetdicom 3.0.x only)."""
    global _installed
    if _installed:
        return True
    if not pynetdicom.__version__.startswith("3.0."):
        log.warning("pynetdicom %s: DIMSE fast encoders not installed", pynetdicom.__version__)
        return False
    dm: Any = dimse_messages  # the names it imported from pydicom and dsutils are replaced
    original_encode = dm.encode
    original_create = dm.create_file_meta
    original_write_meta = dm.write_file_meta_info
    defaults = {"implementation_uid": pynetdicom.PYNETDICOM_IMPLEMENTATION_UID,
                "implementation_version": pynetdicom.PYNETDICOM_IMPLEMENTATION_VERSION}

    def encode(ds: Dataset, is_implicit_vr: bool, is_little_endian: bool, deflated: bool = False) -> bytes | None:
        if is_implicit_vr and is_little_endian and not deflated:
            fast = encode_command_set(ds)
            if fast is not None:
                return fast
        return cast("bytes | None", original_encode(ds, is_implicit_vr, is_little_endian, deflated))

    def create_file_meta(**kwargs: Any) -> Any:
        return _SpoolMeta(kwargs)

    def write_file_meta_info(fp: Any, file_meta: Any, enforce_standard: bool = True) -> None:
        if isinstance(file_meta, _SpoolMeta):
            args = defaults | file_meta.kwargs
            raw = encode_spool_meta(args["sop_class_uid"], args["sop_instance_uid"], args["transfer_syntax"],
                                    args["implementation_uid"], args["implementation_version"])
            if raw is not None:
                fp.write(raw)
                return
            file_meta = original_create(**file_meta.kwargs)
        original_write_meta(fp, file_meta, enforce_standard)

    dm.encode = encode
    dm.create_file_meta = create_file_meta
    dm.write_file_meta_info = write_file_meta_info
    _installed = True
    return True
