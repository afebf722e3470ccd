"""Other Patient IDs Sequence in the ingest header: read by pydicom (the Part 10 scanner declines), bounded."""

from __future__ import annotations

from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from benchmarks.corpus import StudySpec, make_study
from vna.index.query import MAX_OTHER_IDS, OTHER_IDS_KEY, decode_other_ids
from vna.services.ingest import read_header, read_header_fast


def _file(tmp_path: Path, items: list[tuple[str, str | None]], *, implicit: bool = False) -> Path:
    ts = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    ds = make_study(StudySpec(kind="small", instances=1, seed=5, transfer_syntax=ts), 0)[0]
    seq = []
    for pid, issuer in items:
        item = Dataset()
        item.PatientID = pid
        if issuer is not None:
            item.IssuerOfPatientID = issuer
        seq.append(item)
    ds.OtherPatientIDsSequence = Sequence(seq)
    path = tmp_path / "x.dcm"
    ds.save_as(path, enforce_file_format=True, implicit_vr=implicit, little_endian=True)
    return path


def test_other_ids_are_read_and_the_scanner_declines(tmp_path: Path) -> None:
    for implicit in (False, True):
        path = _file(tmp_path, [("B-777", "HOSP_B"), ("X-9", None), ("", "HOSP_C")], implicit=implicit)
        assert read_header_fast(path) is None
        h = read_header(path)
        assert decode_other_ids(h.attrs[OTHER_IDS_KEY]) == [("B-777", "HOSP_B"), ("X-9", "")]
        assert h.attrs["PatientID"] == str(dcmread(path).PatientID)


def test_without_the_sequence_the_scanner_answers(tmp_path: Path) -> None:
    ds = make_study(StudySpec(kind="small", instances=1, seed=5), 0)[0]
    path = tmp_path / "y.dcm"
    ds.save_as(path, enforce_file_format=True)
    h = read_header_fast(path)
    assert h is not None and OTHER_IDS_KEY not in h.attrs


def test_other_ids_are_bounded_and_odd_values_skipped(tmp_path: Path) -> None:
    items: list[tuple[str, str | None]] = [(f"ID{n}", "H") for n in range(MAX_OTHER_IDS + 10)]
    h = read_header(_file(tmp_path, items))
    assert len(decode_other_ids(h.attrs[OTHER_IDS_KEY])) == MAX_OTHER_IDS
    h = read_header(_file(tmp_path, [("A\tB", "H"), ("OK", "H")]))
    assert decode_other_ids(h.attrs[OTHER_IDS_KEY]) == [("OK", "H")]
