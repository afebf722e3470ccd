"""The Part 10 header scanner (ingest fast path) against the pydicom path, on real files."""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
    UID,
)

from benchmarks.corpus import write_corpus
from vna.errors import InvalidDataset, InvalidInput
from vna.services.ingest import _WANTED, read_header, read_header_fast, read_header_pydicom
from vna.services.part10 import PREFIX_SIZE, scan_part10


def _outcome(fn: Callable[[Path], object], path: Path) -> object:
    try:
        return fn(path)
    except InvalidInput as exc:
        return (type(exc), str(exc))


def _same(path: Path, *, fast: bool | None = True) -> None:
    """Both paths agree on ``path``: the same header or the same error.

    ``fast``: the fast path must handle the file (True), must decline it
    (False), or may do either (None).
    """
    want = _outcome(read_header_pydicom, path)
    got = _outcome(read_header_fast, path)
    if fast is True:
        assert got is not None, f"{path.name}: the fast path declined a common file"
    elif fast is False:
        assert got is None, f"{path.name}: the fast path did not decline"
    assert got is None or got == want
    assert _outcome(read_header, path) == want


@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
@pytest.mark.parametrize("kind,count", [("small", 12), ("mr", 4), ("ct", 3)])
def test_corpus_files_take_the_fast_path_with_the_same_result(tmp_path: Path, kind: str, count: int, ts: str) -> None:
    for path in write_corpus(tmp_path, kind, 2, count, transfer_syntax=ts):
        _same(path)


def _dataset(**attrs: object) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.5"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = "1.2.3.4.5"
    ds.StudyInstanceUID = "1.2.3.4"
    ds.SeriesInstanceUID = "1.2.3.4.1"
    ds.PatientID = "PID1"
    ds.Modality = "OT"
    for kw, value in attrs.items():
        setattr(ds, kw, value)
    return ds


def _item(**attrs: object) -> Dataset:
    item = Dataset()
    for kw, value in attrs.items():
        setattr(item, kw, value)
    return item


def _undefined(seq: list[Dataset]) -> Sequence:
    for item in seq:
        item.is_undefined_length_sequence_item = True
    return Sequence(seq)


def _write(ds: Dataset, path: Path, ts: str, undefined_sq: tuple[str, ...] = ()) -> Path:
    ds.file_meta.TransferSyntaxUID = UID(ts)
    for kw in undefined_sq:
        ds[kw].is_undefined_length = True
    ds.save_as(path, enforce_file_format=True, implicit_vr=ts == ImplicitVRLittleEndian, little_endian=True)
    return path


def _nested() -> Sequence:
    inner = _undefined([_item(CodeValue="A", CodingSchemeDesignator="DCM", CodeMeaning="x")])
    outer = _item(CodeValue="B", CodingSchemeDesignator="DCM", CodeMeaning="y")
    outer.add(DataElement(0x00400441, "SQ", inner, is_undefined_length=True))  # ContentItemModifierSequence
    return _undefined([outer, _item(CodeValue="C", CodingSchemeDesignator="DCM", CodeMeaning="z")])


def _cases() -> dict[str, Dataset]:
    jp = _dataset(SpecificCharacterSet=["", "ISO 2022 IR 87"])
    jp.PatientName = "Yamada^Tarou=山田^太郎=やまだ^たろう"
    jp.ReferringPhysicianName = "Sato^Hanako=佐藤^花子"
    cases = {
        "latin1": _dataset(SpecificCharacterSet="ISO_IR 100", PatientName="Müller^Jürgen", StudyDescription="Thorax ä"),
        "utf8": _dataset(SpecificCharacterSet="ISO_IR 192", PatientName="王^小東", SeriesDescription="头部 CT"),
        "iso2022": jp,
        "empty": _dataset(PatientName="", StudyID="", StudyDate="", AccessionNumber="", Rows=None),
        "multi": _dataset(BodyPartExamined=["CHEST", "ABDOMEN"], PatientSex="O", Rows=512, Columns=256),
        "legacy-da": _dataset(StudyDate="2020.01.01", PatientBirthDate="1970.01.01 "),
        "minimal": _dataset(),
        "defined-sq": _dataset(ProcedureCodeSequence=Sequence([_item(CodeValue="P", CodeMeaning="p")]),
                               StudyDescription="x"),
    }
    raw = _dataset()
    raw.add(DataElement(0x00200011, "IS", " 1\\2 "))      # SeriesNumber, multi-valued, padded
    raw.add(DataElement(0x00200013, "IS", "7 "))
    raw.add(DataElement(0x00280008, "IS", "3"))
    raw.add(DataElement(0x00180015, "CS", " CHEST\\HEAD"))  # BodyPartExamined, leading space
    raw.add(DataElement(0x00080030, "TM", "101500.123 "))
    cases["raw-values"] = raw
    nested = _dataset(StudyDescription="nested")
    nested.add(DataElement(0x00080082, "SQ", _nested(), is_undefined_length=True))  # before extracted tags
    nested.add(DataElement(0x00081032, "SQ", _nested(), is_undefined_length=True))  # between them
    nested.add(DataElement(0x00400275, "SQ", _nested(), is_undefined_length=True))  # after them
    cases["nested-undefined"] = nested
    return cases


@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
@pytest.mark.parametrize("case", sorted(_cases()))
def test_hand_built_files_take_the_fast_path_with_the_same_result(tmp_path: Path, case: str, ts: str) -> None:
    ds = _cases()[case]
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.SamplesPerPixel = 2, 2, 8, 1
    ds.PixelData = b"\x01\x02\x03\x04"
    ds.add(DataElement(0xFFFCFFFC, "OB", b"\x00" * 64))  # trailing padding after the pixel data
    _same(_write(ds, tmp_path / f"{case}.dcm", ts))


def _encapsulated(tmp_path: Path, ts: str, frames: list[bytes], name: str = "enc.dcm") -> Path:
    ds = _dataset(Rows=16, Columns=16, BitsAllocated=8, SamplesPerPixel=1, NumberOfFrames=len(frames))
    ds.PixelData = encapsulate(frames)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.add(DataElement(0xFFFCFFFC, "OB", b"\x00" * 8))
    return _write(ds, tmp_path / name, ts)


@pytest.mark.parametrize("ts", [JPEGBaseline8Bit, JPEGLSLossless, JPEG2000Lossless, RLELossless])
@pytest.mark.parametrize("size", [10, 3000, 200_000])
def test_encapsulated_pixel_data_takes_the_fast_path(tmp_path: Path, ts: str, size: int) -> None:
    frames = [bytes([0xFF, 0xD8]) + bytes(range(256)) * (size // 256) + bytes([0xFF, 0xD9]) for _ in range(3)]
    _same(_encapsulated(tmp_path, ts, frames))


def test_a_delimiter_pattern_inside_a_fragment_declines_when_pydicom_would_misparse(tmp_path: Path) -> None:
    path = _encapsulated(tmp_path, RLELossless, [b"\x00" * 16 + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00" + b"\x00" * 8])
    _same(path, fast=False)  # (pydicom ends the value there and parses the rest as elements)


def _cut(src: Path, dst: Path, keep: int) -> Path:
    dst.write_bytes(src.read_bytes()[:keep])
    return dst


def test_damaged_files_fall_back_and_fail_like_pydicom(tmp_path: Path) -> None:
    ct = write_corpus(tmp_path / "ct", "ct", 1, 1)[0]
    data = ct.read_bytes()
    enc = _encapsulated(tmp_path, JPEGBaseline8Bit, [b"\xff\xd8" + b"\x11" * 5000 + b"\xff\xd9"] * 2)
    edata = enc.read_bytes()
    at_boundary = _cut(ct, tmp_path / "k.dcm", 600)  # (between two elements: both say what is missing)
    _same(at_boundary, fast=None)
    damaged = {
        "pixels-cut": _cut(ct, tmp_path / "a.dcm", len(data) - 1000),
        "header-cut": _cut(ct, tmp_path / "b.dcm", 605),
        "cut-in-header-of-element": _cut(ct, tmp_path / "c.dcm", 403),
        "fragments-cut": _cut(enc, tmp_path / "d.dcm", len(edata) - 3000),
        "delimiter-cut": _cut(enc, tmp_path / "e.dcm", len(edata) - 8 - 16 - 4),
        "padding-cut": _cut(enc, tmp_path / "f.dcm", len(edata) - 4),
        "no-preamble": _cut(ct, tmp_path / "g.dcm", 0),
    }
    (tmp_path / "g.dcm").write_bytes(data[132:])
    (tmp_path / "h.dcm").write_bytes(os.urandom(4096))
    (tmp_path / "i.dcm").write_bytes(data[:132] + os.urandom(4096))
    (tmp_path / "j.dcm").write_bytes(data[:700] + b"\xff" * 64 + data[764:])
    damaged.update({"garbage": tmp_path / "h.dcm", "garbage-after-dicm": tmp_path / "i.dcm",
                    "garbage-inside": tmp_path / "j.dcm"})
    for path in damaged.values():
        _same(path, fast=False)
    with pytest.raises(InvalidDataset, match="truncated inside element"):
        read_header(damaged["pixels-cut"])


def test_what_the_fast_path_leaves_to_pydicom(tmp_path: Path) -> None:
    big = _write(_dataset(StudyDescription="be"), tmp_path / "be.dcm", ExplicitVRLittleEndian)
    ds = _dataset(StudyDescription="be")
    ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    ds.save_as(big, enforce_file_format=True, implicit_vr=False, little_endian=False)
    repeated = _write(_dataset(), tmp_path / "rep.dcm", ExplicitVRLittleEndian)
    raw = repeated.read_bytes()
    pid = raw.index(b"\x10\x00\x20\x00LO")  # (0010,0020) PatientID: appended again at the end
    repeated.write_bytes(raw + raw[pid:pid + 8 + int.from_bytes(raw[pid + 6:pid + 8], "little")])
    for path in (big, repeated):
        _same(path, fast=False)


class _CountingFile(io.FileIO):
    """A real file that counts the bytes read from it."""

    read_total = 0

    def read(self, size: int = -1, /) -> bytes:
        data = super().read(size)
        self.read_total += len(data)
        return data


@pytest.mark.parametrize("encapsulated", [False, True])
def test_a_large_file_is_not_read_whole(tmp_path: Path, encapsulated: bool) -> None:
    if encapsulated:
        path = _encapsulated(tmp_path, JPEG2000Lossless, [b"\xff\x4f" + b"\x22" * 300_000] * 4)
    else:
        path = write_corpus(tmp_path, "ct", 1, 1)[0]
    size = path.stat().st_size
    assert size > 8 * PREFIX_SIZE
    with _CountingFile(path) as fp:
        found = scan_part10(fp, size, _WANTED)
        assert found is not None and 0x0020000D in found.elements
        assert fp.read_total <= PREFIX_SIZE + 1024


def test_an_unknown_vr_is_an_invalid_dataset(tmp_path: Path) -> None:
    """pydicom raises NotImplementedError for a VR it does not know: a bad file, not a handler crash."""
    ct = write_corpus(tmp_path / "ct", "ct", 1, 1)[0]
    data = ct.read_bytes()
    head = b"\x10\x00\x10\x00PN"  # (0010,0010) PatientName in explicit VR little endian
    assert head in data
    bad = tmp_path / "unknown-vr.dcm"
    bad.write_bytes(data.replace(head, b"\x10\x00\x10\x00DE", 1))
    with pytest.raises(InvalidDataset):
        read_header(bad)
