"""dicom-px2: the native greyscale coder inside the px frame (format version 2): bit-exact
roundtrips for any input, damaged frames refused, px1 frames written before it decode unchanged."""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydicom.data import get_testdata_files

from benchmarks.corpus import write_corpus
from tests.unit.test_pixelcodec import (_ct_small, _native16, assert_codec_and_bundle_carry,
                                         assert_committed_frames_decode, assert_damage_is_caught,
                                         assert_native_cuts_raise, dicom_files, examples, mutated_ct_small, reheader)
from vna import pixelcodec, pixelcodec_native
from vna.errors import IntegrityError
from vna.pixelcodec import CODEC_NAME_PX2, FORMAT_VERSION_PX2, Method, PixelKind, decode, encode, frame_info
from vna.storage.bundle import BundleWriter

pytestmark = pytest.mark.skipif(not pixelcodec_native.available(), reason="vna_native is not installed")

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "px1"
_AC = {PixelKind.GRAY16_MED: PixelKind.GRAY16_AC, PixelKind.GRAY8_LEFT: PixelKind.GRAY8_AC}


def roundtrip2(data: bytes, level: int = 3, threads: int = 1) -> bytes:
    frame = encode(data, level, version=FORMAT_VERSION_PX2, threads=threads)
    assert decode(frame) == data
    return frame


# ----------------------------------------------------------------------------- any input


@examples(200)
@given(st.binary(max_size=4096))
def test_arbitrary_bytes_roundtrip(data: bytes) -> None:
    assert frame_info(roundtrip2(data)).method is Method.ZSTD


@examples(100)
@given(st.data())
def test_mutated_real_file_roundtrips(data: st.DataObject) -> None:
    roundtrip2(mutated_ct_small(data))


@examples(250)
@given(dicom_files(), st.integers(1, 3))
def test_generated_dicom_roundtrips(case: tuple[bytes, PixelKind], threads: int) -> None:
    """Signed/unsigned, 8/16 bits, 1..40 x 1..40, 1..3 frames, random/smooth/extreme/constant pixels."""
    data, kind = case
    info = frame_info(roundtrip2(data, threads=threads))
    assert info.method is Method.NATIVE
    if kind is PixelKind.GRAY16_MED:
        assert (info.version, info.kind) == (FORMAT_VERSION_PX2, PixelKind.GRAY16_AC)
    elif kind is not PixelKind.GRAY8_LEFT:  # colour: exactly the px1 frame
        assert (info.version, info.kind) == (1, kind)


def test_extreme_16bit_values_and_shapes() -> None:
    for shape in [(1, 1), (1, 300), (300, 1), (65, 129)]:
        for img in (np.zeros(shape), np.full(shape, 65535), np.indices(shape).sum(0) % 2 * 65535):
            for signed in (False, True):
                frame = roundtrip2(_native16(img.astype(np.uint16), signed=signed))
                info = frame_info(frame)
                assert info.kind is PixelKind.GRAY16_AC
                assert bool(info.flags & pixelcodec.FLAG_SIGNED) is signed


def test_every_pydicom_test_file_roundtrips_and_greyscale_uses_the_native_coder() -> None:
    native = smaller = 0
    for path in sorted(p for p in get_testdata_files() if Path(p).is_file()):
        data = Path(path).read_bytes()
        frame = roundtrip2(data)
        px1 = encode(data, 3)
        info, info1 = frame_info(frame), frame_info(px1)
        if info1.kind in _AC and info1.kind is PixelKind.GRAY16_MED:
            assert info.kind is _AC[info1.kind], path
        native += info.kind in (PixelKind.GRAY16_AC, PixelKind.GRAY8_AC)
        smaller += len(frame) < len(px1)
        assert decode(px1) == data
    assert native >= 30
    assert smaller >= 30


def test_generated_ct_is_smaller_than_px1(tmp_path: Path) -> None:
    for path in write_corpus(tmp_path, "ct", studies=1, per_study=2, seed=3):
        data = path.read_bytes()
        frame = roundtrip2(data, 9, threads=2)
        assert frame_info(frame).kind is PixelKind.GRAY16_AC
        assert len(frame) < len(encode(data, 9))


# ----------------------------------------------------------------------------- damage


@lru_cache(maxsize=1)  # _native16 makes a new UID per call: the same frames in every example
def _frames2() -> list[tuple[bytes, bytes]]:
    ct = _ct_small()
    multi = _native16(np.arange(3 * 17 * 9, dtype=np.uint16).reshape(51, 9) * 97)
    return [(ct, encode(ct, 3, version=2)), (multi, encode(multi, 3, version=2))]


@examples(300)
@given(st.sampled_from(range(2)), st.data())
def test_corrupted_frame_never_returns_wrong_bytes(which: int, data: st.DataObject) -> None:
    original, good = _frames2()[which]
    assert_damage_is_caught(original, good, data)


@pytest.mark.parametrize("which", range(2))
def test_truncated_or_extended_frame_raises(which: int) -> None:
    _, frame = _frames2()[which]
    assert_native_cuts_raise(frame)


@pytest.mark.parametrize("changes", [
    {"version": 1}, {"version": 3}, {"method": 0}, {"kind": int(PixelKind.GRAY16_MED)}, {"kind": 7},
    {"kind": int(PixelKind.GRAY8_AC)}, {"rows": 127}, {"cols": 1}, {"frames": 2}, {"flags": pixelcodec.FLAG_RAW},
    {"flags": 0}, {"tile": 64}, {"pixel_length": 2}, {"meta_zlen": 5}, {"content_crc": 1},
])
def test_consistent_lies_in_the_header_raise(changes: dict[str, int]) -> None:
    frame = encode(_ct_small(), 3, version=2)  # CT_small is signed: flags == FLAG_SIGNED
    with pytest.raises(IntegrityError):
        decode(reheader(frame, **changes))


def test_px1_decoder_kinds_refused_in_version_2_and_native_kinds_in_version_1() -> None:
    px1 = encode(_ct_small(), 3)
    with pytest.raises(IntegrityError):
        decode(reheader(px1, version=2))
    with pytest.raises(IntegrityError):
        decode(reheader(px1, kind=int(PixelKind.GRAY16_AC), tile=0))


def test_native_stream_errors_become_integrity_errors() -> None:
    with pytest.raises(IntegrityError):
        pixelcodec_native.gray_decode(b"\x00" * 12, rows=2, cols=2, frames=1, bits=16, signed=False)
    with pytest.raises(ValueError):
        pixelcodec_native.gray_encode(b"\x00" * 3, rows=2, cols=2, frames=1, bits=16, signed=False)


# ----------------------------------------------------------------------------- px1 forever


def test_committed_px1_frames_decode_unchanged() -> None:
    manifest = json.loads((FIXTURES / "manifest.json").read_text())
    assert len(manifest) >= 5
    for name, want in manifest.items():
        frame = (FIXTURES / name).read_bytes()
        info = frame_info(frame)
        assert (info.version, info.method.name, info.kind.name if info.kind else None, info.flags, info.tile) == (
            1, want["method"], want["kind"], want["flags"], want["tile"]), name
        out = decode(frame)
        assert (len(out), hashlib.sha256(out).hexdigest()) == (want["size"], want["sha256"]), name


# ----------------------------------------------------------------------------- codec and bundle


def test_codec_registry_and_bundle_carry_px2() -> None:
    assert_codec_and_bundle_carry(CODEC_NAME_PX2, FORMAT_VERSION_PX2)
    with pytest.raises(ValueError):
        BundleWriter(3, codec="zstd")


def test_committed_px2_frames_decode_unchanged() -> None:
    """The px2 stream format is frozen: frames written by this version decode forever."""
    manifest = assert_committed_frames_decode(FIXTURES.parent / "px2")
    assert {m["kind"] for m in manifest.values()} == {"GRAY16_AC", "GRAY8_AC"}
