"""The native Part 10 scanner (vna_native.Part10Scanner) against the Python reference (vna.services.part10).

On every file of pydicom's test data, the generated corpus and drawn mutations of them
(byte flips, cuts, insertions, truncation, length fields rewritten): both scanners
decline, or both return the same transfer syntax and raw elements.
"""

from __future__ import annotations

import struct
from functools import lru_cache
from pathlib import Path
from tempfile import TemporaryDirectory

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_files
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from benchmarks.corpus import write_corpus
from vna.services.ingest import _WANTED
from vna.services.part10 import native_scanner, scan_part10_file

pytestmark = [pytest.mark.skipif(native_scanner(_WANTED) is None, reason="vna_native has no Part10Scanner"),
              pytest.mark.filterwarnings("ignore::UserWarning")]  # (pydicom on invalid UIDs)

#: _WANTED and a few more tags of other VRs (US, IS, DS, SQ, AT ...)
_MORE = {**_WANTED, 0x00280010: "US", 0x00280011: "US", 0x00200013: "IS", 0x00280030: "DS",
         0x00081140: "SQ", 0x00209165: "AT", 0x00181030: "LO", 0x00100010: "PN", 0x00080008: "CS"}
_WANTS = [_WANTED, _MORE]


@lru_cache(maxsize=1)
def _corpus() -> tuple[tuple[str, bytes], ...]:
    """(name, bytes) of every pydicom test file and of generated corpus files of each kind and syntax."""
    files = [(Path(p).name, Path(p).read_bytes()) for p in sorted(get_testdata_files()) if Path(p).is_file()]
    with TemporaryDirectory() as tmp:
        for ts in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
            for kind in ("small", "mr", "ct"):
                for p in write_corpus(Path(tmp) / f"{kind}-{ts}", kind, 1, 2, transfer_syntax=ts):
                    files.append((f"{kind}-{ts}-{p.name}", p.read_bytes()))
    return tuple(files)


def _outcome(path: Path, wanted: dict[int, str], native: bool) -> object:
    try:
        return scan_part10_file(path, wanted, native=native)
    except Exception as exc:  # pydicom's conversion of the TransferSyntaxUID: both must raise alike
        return (type(exc), str(exc))


def _agree(path: Path, wanted: dict[int, str], name: str = "") -> object:
    want = _outcome(path, wanted, False)
    got = _outcome(path, wanted, True)
    assert got == want, name
    return want


def test_every_test_and_corpus_file_scans_the_same(tmp_path: Path) -> None:
    scanned = 0
    for name, data in _corpus():
        path = tmp_path / "f.dcm"
        path.write_bytes(data)
        for wanted in _WANTS:
            scanned += _agree(path, wanted, name) is not None
    assert scanned >= 60  # (most files are scanned, not declined: the comparison is not vacuous)


@st.composite
def _mutated(draw: st.DrawFn) -> bytes:
    """A corpus file with 1-4 drawn flips, cuts, insertions, truncations or rewritten length fields,
    mostly in the first KiBs where the headers are."""
    _, data = draw(st.sampled_from(_corpus()))
    raw = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        if not raw:
            break
        span = draw(st.sampled_from([min(len(raw), 2048), len(raw)]))
        pos = draw(st.integers(0, span - 1))
        op = draw(st.sampled_from(["flip", "cut", "insert", "truncate", "length16", "length32"]))
        if op == "flip":
            raw[pos] ^= draw(st.integers(1, 255))
        elif op == "cut":
            del raw[pos:pos + draw(st.integers(1, 64))]
        elif op == "insert":
            raw[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "truncate":
            del raw[pos:]
        elif op == "length16":
            raw[pos:pos + 2] = struct.pack("<H", draw(st.sampled_from([0, 1, 2, 4, 0x400, 0xFFFF])))
        else:
            raw[pos:pos + 4] = struct.pack("<L", draw(st.sampled_from(
                [0, 2, 8, 0x401, 0x10000, 0xFFFFFFFF, 0xFFFFFFFE, len(raw) - pos])))
    return bytes(raw)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(_mutated(), st.sampled_from(_WANTS))
def test_mutated_files_scan_the_same(tmp_path: Path, data: bytes, wanted: dict[int, str]) -> None:
    path = tmp_path / "m.dcm"
    path.write_bytes(data)
    _agree(path, wanted)


def test_a_missing_file_raises_oserror_like_the_reference(tmp_path: Path) -> None:
    for native in (False, True):
        with pytest.raises(FileNotFoundError):
            scan_part10_file(tmp_path / "absent.dcm", _WANTED, native=native)
