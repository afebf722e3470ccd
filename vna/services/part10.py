"""A minimal Part 10 header scanner: the ingest fast path in front of pydicom.

:func:`scan_part10` walks the structure of a Part 10 file (preamble, file
meta, dataset in Implicit or Explicit VR Little Endian, which covers every
encapsulated transfer syntax) reading element headers and only the values
asked for; every other value, pixel data above all, is seeked over. It
*declines* (returns ``None``) on anything it does not handle or finds odd, so
the caller can parse with pydicom instead and report pydicom's own errors.

Contract: when it returns a result, pydicom's ``dcmread(defer_size=1024)``
would have read the same top-level raw elements for the asked tags and the
same transfer syntax, and ``_check_complete`` would pass. It declines on:
no preamble/"DICM", missing or empty TransferSyntaxUID, Explicit VR Big
Endian, Deflated or private transfer syntaxes, a command group, any element,
item or fragment running past the end of the file, a truncated header,
top-level tags not strictly ascending (a repeated tag), item/delimiter tags
where they do not belong, an unknown explicit VR, an encoding switch that
pydicom would detect (implicit <-> explicit), undefined-length values other
than sequences and OB/OW encapsulated data, an asked element with an
undefined or over-1 KiB length or a VR other than its dictionary VR.

One known difference: pydicom finds the end of undefined-length pixel data
by searching the bytes for the sequence delimiter; this walks the fragment
items instead. Where the bytes are in memory anyway the two are checked to
agree; top-level pixel data outside the initial read is not read, so a
fragment that happens to contain the delimiter's bytes is accepted here
(pydicom would misparse that file).

:func:`scan_part10_file` runs the same scan natively (``vna_native.Part10Scanner``,
crates/vna-core/src/part10.rs, a port of this module) when the extension has it;
this module is the reference it is tested against.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from collections.abc import Mapping
from functools import lru_cache
from typing import TYPE_CHECKING, Any, BinaryIO, cast

from pydicom.dataelem import RawDataElement, convert_raw_data_element, empty_value_for_VR
from pydicom.datadict import dictionary_VR
from pydicom.tag import BaseTag
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    PrivateTransferSyntaxes,
)
from pydicom.valuerep import EXPLICIT_VR_LENGTH_16, EXPLICIT_VR_LENGTH_32

from vna.dicom import native as native_ext

if TYPE_CHECKING:
    from vna_native import Part10Scanner

__all__ = ["Part10Header", "PREFIX_SIZE", "native_scanner", "scan_part10", "scan_part10_file"]

#: Bytes read up front (the whole file if smaller); anything beyond is read per header.
PREFIX_SIZE = 64 * 1024
_WINDOW = 64 * 1024      # read-ahead when walking sequences outside the prefix
_DEFER_SIZE = 1024       # pydicom's defer_size on the ingest path

_UNDEFINED = 0xFFFFFFFF
_ITEM = 0xFFFEE000
_ITEM_DELIM = 0xFFFEE00D
_SEQ_DELIM = 0xFFFEE0DD
_SEQ_DELIM_BYTES = b"\xfe\xff\xdd\xe0"
_TS_TAG = 0x00020010
_LONG_VRS = frozenset(vr.encode() for vr in EXPLICIT_VR_LENGTH_32)
_SHORT_VRS = frozenset(vr.encode() for vr in EXPLICIT_VR_LENGTH_16)
_ENCAPSULATED_VRS = frozenset({b"OB", b"OW"})
_HEAD = struct.Struct("<HHL")     # tag + implicit 4-byte length
_SHORT = struct.Struct("<HH2sH")  # tag + explicit VR + 2-byte length
_U32 = struct.Struct("<L")


@dataclass(frozen=True)
class Part10Header:
    """What the scan found: the converted TransferSyntaxUID and the asked top-level elements.

    ``elements`` holds :class:`RawDataElement` s exactly as pydicom's reader
    would have produced them (VR ``None`` in Implicit VR, value bytes read).
    """

    transfer_syntax: Any
    implicit_vr: bool
    elements: dict[int, RawDataElement]


class _Decline(Exception):
    """The file is outside what the scanner handles; pydicom decides."""


class _Source:
    """Reads of exact byte ranges from a prefix buffer, the file for anything else."""

    def __init__(self, fp: BinaryIO, size: int) -> None:
        self.fp = fp
        self.size = size
        self.buf = fp.read(min(size, PREFIX_SIZE))
        self.base = 0
        if len(self.buf) != min(size, PREFIX_SIZE):
            raise _Decline

    def get(self, off: int, n: int, *, window: bool = False) -> bytes:
        end = off + n
        if end > self.size:
            raise _Decline
        base = self.base
        if base <= off and end <= base + len(self.buf):
            return self.buf[off - base:end - base]
        self.fp.seek(off)
        if window:
            self.buf = self.fp.read(max(n, min(_WINDOW, self.size - off)))
            self.base = off
            data = self.buf[:n]
        else:
            data = self.fp.read(n)
        if len(data) != n:
            raise _Decline
        return data

    def in_memory(self, off: int, end: int) -> bool:
        return self.base <= off and end <= self.base + len(self.buf)


class _Walker:
    def __init__(self, src: _Source, implicit: bool, wanted: Mapping[int, str]) -> None:
        self.src = src
        self.implicit = implicit
        self.wanted = wanted
        self.found: dict[int, RawDataElement] = {}

    def dataset(self, pos: int, end: int | None, *, top: bool = False, item_undefined: bool = False) -> int:
        """Walk elements from ``pos``; returns the offset after the dataset.

        Top level: to end of file. Defined-length item: exactly to ``end``.
        Undefined-length item: through its item delimiter.
        """
        src, size, implicit = self.src, self.src.size, self.implicit
        prev = -1
        while True:
            if top and pos == size:
                return pos
            if end is not None and pos >= end:
                if pos != end:
                    raise _Decline
                return pos
            head = src.get(pos, 8, window=not top)
            group, elem, length = _HEAD.unpack(head)
            tag = group << 16 | elem
            if group == 0xFFFE:
                if item_undefined and tag == _ITEM_DELIM and length == 0:
                    return pos + 8
                raise _Decline
            vr: bytes | None = None
            if implicit:
                vpos = pos + 8
            else:
                vr = head[4:6]
                if vr in _SHORT_VRS:
                    length = head[6] | head[7] << 8
                    vpos = pos + 8
                elif vr in _LONG_VRS:
                    (length,) = _U32.unpack(src.get(pos + 8, 4, window=not top))
                    vpos = pos + 12
                else:
                    raise _Decline
            if top:
                if tag <= prev:
                    raise _Decline
                prev = tag
            if length == _UNDEFINED:
                if top and tag in self.wanted:
                    raise _Decline
                pos = self._undefined(tag, vr, vpos, top)
                continue
            nxt = vpos + length
            if nxt > size:
                raise _Decline
            if top and tag in self.wanted:
                self._keep(tag, vr, length, vpos)
            pos = nxt

    def _keep(self, tag: int, vr: bytes | None, length: int, vpos: int) -> None:
        vr_s = None if vr is None else vr.decode("ascii")
        if length > _DEFER_SIZE or (vr_s is not None and vr_s != self.wanted[tag]):
            raise _Decline  # pydicom would defer (or reinterpret) it
        value = self.src.get(vpos, length) if length else cast("bytes | None", empty_value_for_VR(vr_s, raw=True))
        self.found[tag] = RawDataElement(BaseTag(tag), vr_s, length, value, vpos, self.implicit, True)

    def _undefined(self, tag: int, vr: bytes | None, vpos: int, top: bool) -> int:
        """Skip an undefined-length value starting at ``vpos``; returns the offset after it."""
        if vr is None:  # implicit VR: pydicom's dictionary lookup, else look ahead for an item
            try:
                is_sq = dictionary_VR(tag) == "SQ"
            except KeyError:
                is_sq = _HEAD.unpack(self.src.get(vpos, 8, window=True))[:2] == (0xFFFE, 0xE000)
            if not is_sq:
                raise _Decline
            return self.sequence(vpos)
        if vr == b"SQ":
            return self.sequence(vpos)
        if vr in _ENCAPSULATED_VRS:
            return self._fragments(vpos, top)
        raise _Decline

    def sequence(self, pos: int) -> int:
        """Skip the items of an undefined-length sequence; returns the offset after its delimiter."""
        src = self.src
        while True:
            group, elem, length = _HEAD.unpack(src.get(pos, 8, window=True))
            tag = group << 16 | elem
            if tag == _SEQ_DELIM and length == 0:
                return pos + 8
            if tag != _ITEM:
                raise _Decline
            if length == _UNDEFINED:
                pos = self.dataset(pos + 8, None, item_undefined=True)
            else:
                end = pos + 8 + length
                if end > src.size:
                    raise _Decline
                pos = self.dataset(pos + 8, end)

    def _fragments(self, vpos: int, top: bool) -> int:
        """Skip encapsulated fragments; returns the offset after the sequence delimiter."""
        src = self.src
        pos = vpos
        while True:
            group, elem, length = _HEAD.unpack(src.get(pos, 8))
            tag = group << 16 | elem
            if tag == _SEQ_DELIM and length == 0:
                break
            if tag != _ITEM or length == _UNDEFINED:
                raise _Decline
            pos += 8 + length
        # pydicom ends the value at the first delimiter byte pattern: check it is this one
        if src.in_memory(vpos, pos + 4):
            if src.buf.find(_SEQ_DELIM_BYTES, vpos - src.base, pos + 4 - src.base) != pos - src.base:
                raise _Decline
        elif not top:
            if src.get(vpos, pos + 4 - vpos).find(_SEQ_DELIM_BYTES) != pos - vpos:
                raise _Decline
        return pos + 8


def scan_part10(fp: BinaryIO, size: int, wanted: Mapping[int, str]) -> Part10Header | None:
    """Scan the Part 10 file open in ``fp`` (``size`` bytes) for the top-level elements ``wanted``.

    ``wanted`` maps each tag to its dictionary VR.
    Reads the first :data:`PREFIX_SIZE` bytes and then only element headers
    and the wanted values. Returns ``None`` when pydicom must decide (see the
    module docstring); raises only what ``fp`` raises (``OSError``) and what
    pydicom's own conversion of the TransferSyntaxUID raises.
    """
    try:
        src = _Source(fp, size)
        if size < 132 or src.get(128, 4) != b"DICM":
            return None
        # file meta: explicit VR little endian, every (0002,eeee) element
        pos, prev, ts_raw = 132, -1, None
        while True:
            head = src.get(pos, 8)
            group, elem, length = _HEAD.unpack(head)
            if group != 2:
                break
            tag = group << 16 | elem
            vr = head[4:6]
            if tag <= prev:
                return None
            prev = tag
            if vr in _SHORT_VRS:
                length, vpos = head[6] | head[7] << 8, pos + 8
            elif vr in _LONG_VRS:
                (length,) = _U32.unpack(src.get(pos + 8, 4))
                vpos = pos + 12
            else:
                return None
            if length == _UNDEFINED or vpos + length > size:
                return None
            if tag == _TS_TAG:
                if vr != b"UI" or not length:
                    return None
                ts_raw = RawDataElement(BaseTag(tag), "UI", length, src.get(vpos, length), vpos, False, True)
            pos = vpos + length
        if ts_raw is None or group < 8:  # (command group elements)
            return None
        ts = convert_raw_data_element(ts_raw).value
        if not isinstance(ts, str) or not ts:
            return None
        if ts in (ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian) or ts in PrivateTransferSyntaxes:
            return None
        implicit = ts == ImplicitVRLittleEndian
        # pydicom's check of the first element's encoding (it would switch, with a warning)
        vr_bytes = head[4:6]
        looks_implicit = not (0x40 < vr_bytes[0] < 0x5B and 0x40 < vr_bytes[1] < 0x5B)
        if looks_implicit != implicit:
            return None
        walker = _Walker(src, implicit, wanted)
        walker.dataset(pos, None, top=True)
        return Part10Header(ts, implicit, walker.found)
    except _Decline:
        return None



_SCANNERS: dict[int, tuple[dict[int, str], Part10Scanner | None]] = {}


def native_scanner(wanted: Mapping[int, str]) -> Part10Scanner | None:
    """The native scanner for ``wanted`` (built once per mapping, with pydicom's data dictionary as it is
    then); None without the extension or with one built before the scanner."""
    known = _SCANNERS.get(id(wanted))
    if known is not None and known[0] == wanted:
        return known[1]
    scanner: Part10Scanner | None = None
    cls = getattr(native_ext.load(), "Part10Scanner", None) if native_ext.available() else None
    if cls is not None:
        # the dictionaries dictionary_VR reads (pydicom.datadict's, documented with add_dict_entries)
        from pydicom.datadict import DicomDictionary, RepeatersDictionary, masks  # type: ignore[attr-defined]
        tags = {int(tag): entry[0] == "SQ" for tag, entry in DicomDictionary.items()}
        repeaters = [(m1, m2, RepeatersDictionary[mask][0] == "SQ") for mask, (m1, m2) in masks.items()]
        scanner = cls(dict(wanted), tags, repeaters)
    if len(_SCANNERS) >= 16:
        _SCANNERS.clear()
    _SCANNERS[id(wanted)] = (dict(wanted), scanner)
    return scanner


@lru_cache(maxsize=64)
def _transfer_syntax(raw: bytes) -> Any:
    """pydicom's conversion of a raw TransferSyntaxUID value (once per distinct value)."""
    return convert_raw_data_element(RawDataElement(BaseTag(_TS_TAG), "UI", len(raw), raw, 0, False, True)).value


def scan_part10_file(path: str | os.PathLike[str], wanted: Mapping[int, str], *,
                     native: bool | None = None) -> Part10Header | None:
    """:func:`scan_part10` of the file at ``path``: the same result, natively when the extension has the scanner.

    ``native``: None uses the native scanner when available, False the Python one,
    True requires the native one (ValueError without it). Raises OSError.
    """
    scanner = native_scanner(wanted) if native is not False else None
    if scanner is None:
        if native:
            raise ValueError("the installed vna_native has no Part10Scanner")
        with open(path, "rb", buffering=0) as fp:
            return scan_part10(fp, os.fstat(fp.fileno()).st_size, wanted)
    found = scanner.scan(os.fspath(path), list(PrivateTransferSyntaxes))
    if found is None:
        return None
    _, ts_bytes, _, implicit, elements = found
    ts = _transfer_syntax(ts_bytes)
    kept: dict[int, RawDataElement] = {}
    for tag, vr, length, value, vpos in elements:
        raw = value if length else cast("bytes | None", empty_value_for_VR(vr, raw=True))
        kept[tag] = RawDataElement(BaseTag(tag), vr, length, raw, vpos, implicit, True)
    return Part10Header(ts, implicit, kept)
