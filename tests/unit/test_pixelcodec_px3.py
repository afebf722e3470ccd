"""dicom-px3: the native px3 coder inside the px frame (format version 3): bit-exact roundtrips for
any input, damaged frames refused, px2 and px3 frames written before decode unchanged."""

from __future__ import annotations

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
from vna.pixelcodec import CODEC_NAME_PX3, FORMAT_VERSION_PX3, Method, PixelKind, decode, encode, frame_info
from vna.storage.bundle import BundleWriter

pytestmark = pytest.mark.skipif(not pixelcodec_native.available(), reason="vna_native is not installed")

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
_RANS = {PixelKind.GRAY16_MED: PixelKind.GRAY16_RANS, PixelKind.GRAY8_LEFT: PixelKind.GRAY8_RANS}


def roundtrip3(data: bytes, level: int = 3, threads: int = 1) -> bytes:
    frame = encode(data, level, version=FORMAT_VERSION_PX3, threads=threads)
    assert decode(frame) == data
    return frame


# ----------------------------------------------------------------------------- any input


@examples(200)
@given(st.binary(max_size=4096))
def test_arbitrary_bytes_roundtrip(data: bytes) -> None:
    assert frame_info(roundtrip3(data)).method is Method.ZSTD


@examples(100)
@given(st.data())
def test_mutated_real_file_roundtrips(data: st.DataObject) -> None:
    roundtrip3(mutated_ct_small(data))


@examples(250)
@given(dicom_files(), st.integers(1, 3))
def test_generated_dicom_roundtrips(case: tuple[bytes, PixelKind], threads: int) -> None:
    """Signed/unsigned, 8/16 bits, 1..40 x 1..40, 1..3 frames, random/smooth/extreme/constant pixels."""
    data, kind = case
    info = frame_info(roundtrip3(data, threads=threads))
    assert info.method is Method.NATIVE
    if kind in _RANS:
        assert (info.version, info.kind) == (FORMAT_VERSION_PX3, _RANS[kind]) or kind is PixelKind.GRAY8_LEFT
    else:  # colour: exactly the px1 frame
        assert (info.version, info.kind) == (1, kind)


def test_extreme_16bit_values_and_shapes() -> None:
    for shape in [(1, 1), (1, 300), (300, 1), (2, 3), (65, 129)]:
        for img in (np.zeros(shape), np.full(shape, 65535), np.indices(shape).sum(0) % 2 * 65535):
            for signed in (False, True):
                frame = roundtrip3(_native16(img.astype(np.uint16), signed=signed))
                info = frame_info(frame)
                assert info.kind is PixelKind.GRAY16_RANS
                assert bool(info.flags & pixelcodec.FLAG_SIGNED) is signed


def test_every_pydicom_test_file_roundtrips_and_greyscale_uses_the_native_coder() -> None:
    native = 0
    for path in sorted(p for p in get_testdata_files() if Path(p).is_file()):
        data = Path(path).read_bytes()
        frame = roundtrip3(data)
        info1 = frame_info(encode(data, 3))
        if info1.kind is PixelKind.GRAY16_MED:
            assert frame_info(frame).kind is PixelKind.GRAY16_RANS, path
        native += frame_info(frame).kind in (PixelKind.GRAY16_RANS, PixelKind.GRAY8_RANS)
    assert native >= 30


def test_generated_ct_is_smaller_than_px1(tmp_path: Path) -> None:
    for path in write_corpus(tmp_path, "ct", studies=1, per_study=2, seed=3):
        data = path.read_bytes()
        frame = roundtrip3(data, 9, threads=2)
        assert frame_info(frame).kind is PixelKind.GRAY16_RANS
        assert len(frame) < len(encode(data, 9))


# ----------------------------------------------------------------------------- damage


@lru_cache(maxsize=1)  # _native16 makes a new UID per call: the same frames in every example
def _frames3() -> list[tuple[bytes, bytes]]:
    ct = _ct_small()
    multi = _native16(np.arange(3 * 17 * 9, dtype=np.uint16).reshape(51, 9) * 97)
    return [(ct, encode(ct, 3, version=3)), (multi, encode(multi, 3, version=3))]


@examples(300)
@given(st.sampled_from(range(2)), st.data())
def test_corrupted_frame_never_returns_wrong_bytes(which: int, data: st.DataObject) -> None:
    original, good = _frames3()[which]
    assert_damage_is_caught(original, good, data)


@pytest.mark.parametrize("which", range(2))
def test_truncated_or_extended_frame_raises(which: int) -> None:
    _, frame = _frames3()[which]
    assert_native_cuts_raise(frame)


@pytest.mark.parametrize("changes", [
    {"version": 1}, {"version": 2}, {"version": 4}, {"method": 0}, {"kind": int(PixelKind.GRAY16_MED)},
    {"kind": int(PixelKind.GRAY16_AC)}, {"kind": int(PixelKind.GRAY8_RANS)}, {"kind": 9}, {"rows": 127},
    {"cols": 1}, {"frames": 2}, {"flags": pixelcodec.FLAG_RAW}, {"flags": 0}, {"tile": 64},
    {"pixel_length": 2}, {"meta_zlen": 5}, {"content_crc": 1},
    # a geometry far larger than the stream: refused before anything that size is allocated
    {"rows": 65535, "cols": 65535, "frames": 1000, "pixel_length": 65535 * 65535 * 1000 * 2,
     "content_size": 65535 * 65535 * 1000 * 2 + 100000},
])
def test_consistent_lies_in_the_header_raise(changes: dict[str, int]) -> None:
    frame = encode(_ct_small(), 3, version=3)  # CT_small is signed: flags == FLAG_SIGNED
    with pytest.raises(IntegrityError):
        decode(reheader(frame, **changes))


def test_native_stream_errors_become_integrity_errors() -> None:
    with pytest.raises(IntegrityError):
        pixelcodec_native.gray3_decode(b"\x00" * 12, rows=2, cols=2, frames=1, bits=16, signed=False)
    with pytest.raises(ValueError):
        pixelcodec_native.gray3_encode(b"\x00" * 3, rows=2, cols=2, frames=1, bits=16, signed=False)
    # 8.6 TB announced by 64 bytes: refused before allocating (a sample costs at least 0.0227 bit)
    with pytest.raises(IntegrityError, match="too short"):
        pixelcodec_native.gray3_decode(b"\x00" * 64, rows=65535, cols=65535, frames=1000, bits=16, signed=False)


@examples(300)
@given(st.binary(max_size=300), st.integers(1, 9), st.integers(1, 9), st.integers(1, 2), st.booleans())
def test_arbitrary_native_streams_are_refused_or_decoded(stream: bytes, rows: int, cols: int, frames: int,
                                                         wide: bool) -> None:
    bits = 16 if wide else 8
    try:
        out = pixelcodec_native.gray3_decode(stream, rows=rows, cols=cols, frames=frames, bits=bits, signed=False)
    except IntegrityError:
        return
    assert len(out) == rows * cols * frames * bits // 8


# ----------------------------------------------------------------------------- earlier frames forever


@pytest.mark.parametrize("folder", ["px2", "px3"])
def test_committed_native_frames_decode_unchanged(folder: str) -> None:
    """The px2 and px3 stream formats are frozen: frames written by them decode forever."""
    assert len(assert_committed_frames_decode(FIXTURES / folder)) >= 4


# ----------------------------------------------------------------------------- codec and bundle


def test_codec_registry_and_bundle_carry_px3() -> None:
    assert_codec_and_bundle_carry(CODEC_NAME_PX3, FORMAT_VERSION_PX3)


def test_frames_encoded_in_a_pool_make_the_same_bundle() -> None:
    """BundleWriter.encode is what add writes: frames encoded on other threads give identical bundles."""
    from concurrent.futures import ThreadPoolExecutor

    contents = [_ct_small(), _native16(np.arange(40 * 33, dtype=np.uint16).reshape(40, 33) * 31), b"not dicom"]
    serial, pooled = BundleWriter(3, codec=CODEC_NAME_PX3), BundleWriter(3, codec=CODEC_NAME_PX3)
    for i, c in enumerate(contents):
        serial.add(f"1.2.{i}", 1, c)
    with ThreadPoolExecutor(3) as pool:
        frames = list(pool.map(pooled.encode, contents))
    for i, (c, f) in enumerate(zip(contents, frames)):
        pooled.add(f"1.2.{i}", 1, c, f)
    (e1, d1), (e2, d2) = serial.finish(), pooled.finish()
    assert e1 == e2 and b"".join(d1) == b"".join(d2)
