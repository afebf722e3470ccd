"""Is a re-sent Part 10 file the same instance as a stored one? Identity follows the data set, not the File Meta.

Two files hold the same data set when, group 0002 (File Meta) and group
length elements ``(gggg,0000)`` aside, they have the same elements with the
same values:

- between the native syntaxes (implicit VR little endian, explicit VR little
  and big endian, deflated explicit VR little endian) values are compared as
  bytes, VR-independent; a multi-byte binary value (US, SS, UL, SL, FL, FD, AT,
  OW, OF, OL, OD, SV, UV, OV) read from a big-endian file is byte-swapped first;
- sequences are compared item by item, recursively;
- an encapsulated (compressed) syntax is only the same as itself: the same
  syntax with byte-equal fragments.

Anything that cannot be proven equal (a parse error, a private sequence one
file encodes as SQ and the other as UN, an undefined-length value that is not
an item sequence) counts as different: the caller then treats the re-send as
different content, never as a duplicate. Work is bounded: values over 1 MiB
are not loaded but compared by streaming both files in 1 MiB chunks (a
deflated file is inflated in memory by pydicom).
"""

from __future__ import annotations

import array
import logging
import struct
from pathlib import Path
from typing import BinaryIO, Iterator

from pydicom import dcmread
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.sequence import Sequence
from pydicom.uid import (DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ExplicitVRLittleEndian,
                         ImplicitVRLittleEndian)

__all__ = ["same_dataset", "NATIVE_SYNTAXES"]

log = logging.getLogger(__name__)

#: Transfer syntaxes whose data sets are compared value by value whatever the other's (native) syntax.
NATIVE_SYNTAXES = frozenset({ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian,
                             DeflatedExplicitVRLittleEndian})
_CHUNK = 1 << 20  # a multiple of 8: byte swapping never straddles two chunks
_DEFER = _CHUNK
_WIDTH = {"US": 2, "SS": 2, "OW": 2, "AT": 2, "UL": 4, "SL": 4, "FL": 4, "OF": 4, "OL": 4,
          "FD": 8, "OD": 8, "SV": 8, "UV": 8, "OV": 8}
_SWAP_CODE = {2: "H", 4: "I", 8: "Q"}
_ITEM, _SEQ_END = 0xFFFEE000, 0xFFFEE0DD
_ERRORS = (InvalidDicomError, ValueError, TypeError, KeyError, EOFError, OverflowError, struct.error,
           LookupError, AttributeError, OSError)


class _Different(Exception):
    """Raised inside the comparison at the first difference (or what cannot be proven equal)."""


def same_dataset(a: Path, b: Path) -> bool:
    """True when the Part 10 files ``a`` and ``b`` hold the same data set (see the module docstring).

    Never raises for bad input: an unreadable or unparsable file is "not the same".
    """
    try:
        ts_a, ts_b = _syntax(a), _syntax(b)
        if ts_a != ts_b and not (ts_a in NATIVE_SYNTAXES and ts_b in NATIVE_SYNTAXES):
            return False
        da = dcmread(a, defer_size=None if ts_a == DeflatedExplicitVRLittleEndian else _DEFER)
        db = dcmread(b, defer_size=None if ts_b == DeflatedExplicitVRLittleEndian else _DEFER)
        with open(a, "rb") as fa, open(b, "rb") as fb:
            _compare(da, db, fa, fb)
    except _Different as why:
        log.debug("data sets of %s and %s differ: %s", a.name, b.name, why)
        return False
    except _ERRORS as exc:
        log.info("data sets of %s and %s not comparable: %s", a.name, b.name, exc)
        return False
    return True


def _syntax(path: Path) -> str:
    return str(read_file_meta_info(path).get("TransferSyntaxUID", ""))


def _tags(ds: Dataset) -> list[int]:
    """The tags that make up the data set (File Meta and group lengths excluded)."""
    return sorted(int(t) for t in ds._dict if t.group != 0x0002 and t.element != 0x0000)


def _compare(da: Dataset, db: Dataset, fa: BinaryIO, fb: BinaryIO) -> None:
    tags = _tags(da)
    if tags != _tags(db):
        raise _Different("not the same elements")
    for tag in tags:
        ea, eb = da._dict[tag], db._dict[tag]  # type: ignore[index]
        vr_a, vr_b = _vr(ea, tag), _vr(eb, tag)
        if "SQ" in (vr_a, vr_b):
            _compare_sequences(da[tag].value, db[tag].value, fa, fb, tag)
        elif isinstance(ea, RawDataElement) and isinstance(eb, RawDataElement):
            _compare_values(ea, eb, vr_b if not eb.is_little_endian else vr_a, fa, fb)  # big endian: explicit VR
        elif da[tag].value != db[tag].value:
            raise _Different(f"{tag:08X} differs")


def _compare_sequences(sa: object, sb: object, fa: BinaryIO, fb: BinaryIO, tag: int) -> None:
    if not (isinstance(sa, Sequence) and isinstance(sb, Sequence)) or len(sa) != len(sb):
        raise _Different(f"sequence {tag:08X} differs")
    for ia, ib in zip(sa, sb):
        _compare(ia, ib, fa, fb)


def _vr(elem: RawDataElement | DataElement, tag: int) -> str | None:
    """The element's VR: as encoded (explicit VR) or as converted, else the dictionary's (None if unknown)."""
    if elem.VR is not None:
        return str(elem.VR)
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return None


def _compare_values(ea: RawDataElement, eb: RawDataElement, vr: str | None, fa: BinaryIO, fb: BinaryIO) -> None:
    width = _WIDTH.get(vr or "", 1) if ea.is_little_endian != eb.is_little_endian else 1
    if width > 1 and vr is None:
        raise _Different("VR unknown across byte orders")
    chunks_a = _little(_chunks(ea, fa), width if not ea.is_little_endian else 1)
    chunks_b = _little(_chunks(eb, fb), width if not eb.is_little_endian else 1)
    for ca in chunks_a:
        cb = next(chunks_b, None)
        if cb != ca:
            raise _Different(f"{int(ea.tag):08X} differs")
    if next(chunks_b, None) is not None:
        raise _Different(f"{int(ea.tag):08X} differs in length")


def _chunks(elem: RawDataElement, fh: BinaryIO) -> Iterator[bytes]:
    """The value's bytes in chunks of ``_CHUNK`` (the last shorter); a deferred value is read from the file."""
    if elem.length == 0:
        return  # an empty value is b"" or None depending on the VR and encoding
    if elem.value is not None:
        raw = bytes(elem.value)
        for i in range(0, len(raw), _CHUNK):
            yield raw[i:i + _CHUNK]
        return
    start, length = elem.value_tell, elem.length
    if length == 0xFFFFFFFF:
        length = _undefined_length(fh, start, elem.is_little_endian)
    fh.seek(start)
    left = length
    while left > 0:
        data = fh.read(min(_CHUNK, left))
        if not data:
            raise _Different("value runs past the end of the file")
        left -= len(data)
        yield data


def _undefined_length(fh: BinaryIO, start: int, little: bool) -> int:
    """The length of an undefined-length value made of defined-length items (encapsulated pixel data)."""
    fmt = "<HHL" if little else ">HHL"
    pos = start
    while True:
        fh.seek(pos)
        head = fh.read(8)
        if len(head) < 8:
            raise _Different("undefined-length value without its delimiter")
        group, element, length = struct.unpack(fmt, head)
        tag = group << 16 | element
        if tag == _SEQ_END:
            return pos - start
        if tag != _ITEM or length == 0xFFFFFFFF:
            raise _Different("undefined-length value that is not an item sequence")
        pos += 8 + length


def _little(chunks: Iterator[bytes], width: int) -> Iterator[bytes]:
    """The chunks with each ``width``-byte word byte-swapped (big -> little endian); unchanged for width 1."""
    if width == 1:
        yield from chunks
        return
    for chunk in chunks:
        if len(chunk) % width:
            raise _Different("value length is not a multiple of its word size")
        words = array.array(_SWAP_CODE[width])
        if words.itemsize != width:
            raise _Different("no native word of that size")
        words.frombytes(chunk)
        words.byteswap()
        yield words.tobytes()
