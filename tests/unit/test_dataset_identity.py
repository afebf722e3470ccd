"""vna.services.dataset_identity on real files re-encoded by DCMTK dcmconv: the same data set in another File
Meta or native encoding is the same; any changed value (also past the 1 MiB streaming threshold, in a
sequence, in an encapsulated fragment) is not; an encapsulated syntax is only the same as itself."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence

from vna.services.dataset_identity import same_dataset

#: dcmconv options: implicit VR LE, explicit VR LE, explicit VR big endian, deflated
SYNTAXES = ("+ti", "+te", "+tb", "+td")


def dcmconv(src: Path, dst: Path, *opts: str) -> Path:
    subprocess.run(["dcmconv", *opts, str(src), str(dst)], check=True, capture_output=True)
    return dst


def pydicom_file(name: str) -> Path:
    found = get_testdata_file(name)
    assert found is not None, name
    return Path(found)


def flipped(src: Path, dst: Path, from_end: int) -> Path:
    data = bytearray(src.read_bytes())
    data[-from_end] ^= 0x01
    dst.write_bytes(bytes(data))
    return dst


@pytest.fixture(scope="module")
def large(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 16-bit 1024x1024 image (2 MiB of pixel data, streamed rather than loaded) with a code sequence."""
    ds = dcmread(pydicom_file("CT_small.dcm"))
    ds.Rows = ds.Columns = 1024
    ds.PixelData = np.arange(1024 * 1024, dtype=np.uint16).tobytes()
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator = "123", "DCM"
    ds.ProcedureCodeSequence = Sequence([item])
    path = tmp_path_factory.mktemp("identity") / "large.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small_bigendian.dcm", "rtplan.dcm", "image_dfl.dcm"])
@pytest.mark.parametrize("opt", SYNTAXES)
def test_same_data_set_in_every_native_syntax(tmp_path: Path, name: str, opt: str) -> None:
    src = pydicom_file(name)
    other = dcmconv(src, tmp_path / "other.dcm", opt)
    assert same_dataset(src, other) and same_dataset(other, src)


@pytest.mark.parametrize("opt", SYNTAXES[:3])
def test_large_values_are_streamed_and_compared(tmp_path: Path, large: Path, opt: str) -> None:
    other = dcmconv(large, tmp_path / "other.dcm", opt)
    assert same_dataset(large, other) and same_dataset(other, large)
    assert not same_dataset(large, flipped(other, tmp_path / "bad.dcm", 1000))  # one pixel bit


def test_other_file_meta_and_group_lengths_do_not_count(tmp_path: Path, large: Path) -> None:
    ds = dcmread(large)
    ds.file_meta.ImplementationClassUID = "1.2.3.4"
    ds.file_meta.ImplementationVersionName = "OTHER_1"
    ds.file_meta.SourceApplicationEntityTitle = "ELSEWHERE"
    ds.save_as(tmp_path / "meta.dcm")
    assert same_dataset(large, tmp_path / "meta.dcm")
    assert same_dataset(large, dcmconv(large, tmp_path / "grouplength.dcm", "+g"))


def test_changed_values_differ(tmp_path: Path, large: Path) -> None:
    for change in ("name", "sequence", "removed", "added"):
        ds = dcmread(large)
        if change == "name":
            ds.PatientName = "Other^Name"
        elif change == "sequence":
            ds.ProcedureCodeSequence[0].CodeValue = "124"
        elif change == "removed":
            del ds.StudyDescription
        else:
            ds.StudyComments = "added"
        ds.save_as(tmp_path / f"{change}.dcm")
        assert not same_dataset(large, tmp_path / f"{change}.dcm"), change
        assert not same_dataset(dcmconv(large, tmp_path / "i.dcm", "+ti"),
                                dcmconv(tmp_path / f"{change}.dcm", tmp_path / f"{change}-i.dcm", "+ti")), change


def test_encapsulated_only_same_as_itself(tmp_path: Path) -> None:
    ds = dcmread(pydicom_file("JPEG2000.dcm"))
    ds.PixelData = encapsulate([os.urandom(700_000) for _ in range(3)])  # 2 MiB of fragments: streamed
    ds.NumberOfFrames = 3
    ds.save_as(tmp_path / "frames.dcm")
    copy = dcmconv(tmp_path / "frames.dcm", tmp_path / "copy.dcm")  # rewritten by DCMTK, same syntax
    assert same_dataset(tmp_path / "frames.dcm", copy)
    assert not same_dataset(tmp_path / "frames.dcm", flipped(copy, tmp_path / "bad.dcm", 5000))
    assert not same_dataset(pydicom_file("MR_small_RLE.dcm"), pydicom_file("MR_small.dcm"))  # same image, other syntax


def test_unreadable_files_are_never_the_same(tmp_path: Path) -> None:
    good = pydicom_file("CT_small.dcm")
    (tmp_path / "junk.dcm").write_bytes(b"not dicom")
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(good.read_bytes()[:-3000])
    assert not same_dataset(good, tmp_path / "junk.dcm")
    assert not same_dataset(good, truncated)
    assert not same_dataset(good, tmp_path / "absent.dcm")
