"""dicom-px1: bit-exact roundtrips for any input, the pixel-aware path where it should be, and
damaged frames that raise IntegrityError instead of returning wrong bytes."""

from __future__ import annotations

import hashlib
import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_files
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless, generate_uid

from benchmarks.corpus import write_corpus
from vna import pixelcodec
from vna.codec import get_codec
from vna.errors import IntegrityError
from vna.pixelcodec import Method, PixelKind, decode, encode, frame_info
from vna.storage.bundle import BundleWriter, decode_frame

def examples(n: int) -> settings:
    return settings(max_examples=n, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def roundtrip(data: bytes, level: int = 3) -> bytes:
    frame = encode(data, level)
    assert decode(frame) == data
    return frame


# ----------------------------------------------------------------------------- arbitrary bytes


@examples(300)
@given(st.binary(max_size=4096))
def test_arbitrary_bytes_roundtrip(data: bytes) -> None:
    frame = roundtrip(data)
    assert frame_info(frame).method is Method.ZSTD


@examples(150)
@given(st.binary(max_size=2048))
def test_bytes_behind_a_preamble_roundtrip(tail: bytes) -> None:
    roundtrip(b"\x00" * 128 + b"DICM" + tail)


def _ct_small() -> bytes:
    return Path(get_testdata_files("CT_small.dcm")[0]).read_bytes()


def mutated_ct_small(data: st.DataObject) -> bytes:
    """A real CT with 1-6 drawn flips, cuts and insertions (never empty)."""
    raw = bytearray(_ct_small())
    for _ in range(data.draw(st.integers(1, 6))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        pos = data.draw(st.integers(0, len(raw) - 1))
        if op == "flip":
            raw[pos] ^= data.draw(st.integers(1, 255))
        elif op == "cut":
            del raw[pos : pos + data.draw(st.integers(1, 64))]
        else:
            raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=16))
        if not raw:
            raw = bytearray(b"x")
    return bytes(raw)


@examples(150)
@given(st.data())
def test_mutated_real_file_roundtrips(data: st.DataObject) -> None:
    """Flipped bytes, cuts and insertions in a real CT never break the roundtrip (the walker must cope)."""
    roundtrip(mutated_ct_small(data))


# ----------------------------------------------------------------------------- generated DICOM

_TEXT = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=255, exclude_characters="\\"), max_size=40)


def _pixels(rng: np.random.Generator, mode: str, shape: tuple[int, ...], dtype: type, maxval: int) -> np.ndarray:
    if mode == "random":
        return rng.integers(0, maxval + 1, shape).astype(dtype)
    if mode == "extremes":
        return np.where(rng.random(shape) < 0.5, 0, maxval).astype(dtype)
    if mode == "constant":
        return np.full(shape, maxval if rng.random() < 0.5 else 0, dtype=dtype)
    grid = np.indices(shape).sum(axis=0).astype(np.float64)
    smooth: np.ndarray = (grid * rng.uniform(0, 50) + rng.normal(0, rng.uniform(0, 30), shape)) % (maxval + 1)
    return smooth.astype(dtype)


@st.composite
def dicom_files(draw: st.DrawFn) -> tuple[bytes, PixelKind]:
    bits = draw(st.sampled_from([8, 16]))
    samples = 1 if bits == 16 else draw(st.sampled_from([1, 3]))
    rows, cols = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    frames = draw(st.integers(1, 3))
    planar = draw(st.sampled_from([0, 1]))
    signed = draw(st.booleans())
    implicit = draw(st.booleans())
    mode = draw(st.sampled_from(["random", "smooth", "extremes", "constant"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    maxval, dtype = (65535, np.uint16) if bits == 16 else (255, np.uint8)
    shape = (frames, rows, cols, samples) if samples == 3 and planar == 0 else (frames, samples, rows, cols)
    pixels = _pixels(rng, mode, shape, dtype, maxval)

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.7")
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = draw(_TEXT)
    ds.StudyDescription = draw(_TEXT)
    if draw(st.booleans()):
        item = Dataset()
        item.CodeValue = draw(_TEXT.filter(lambda s: len(s) <= 16))
        item.CodeMeaning = draw(_TEXT)
        ds.ProcedureCodeSequence = Sequence([item])
        ds["ProcedureCodeSequence"].is_undefined_length = draw(st.booleans())
    ds.SamplesPerPixel = samples
    ds.PhotometricInterpretation = "RGB" if samples == 3 else "MONOCHROME2"
    if samples == 3:
        ds.PlanarConfiguration = planar
    if frames > 1 or draw(st.booleans()):
        ds.NumberOfFrames = frames
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = bits
    ds.BitsStored = draw(st.integers(1, bits))
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = int(signed)
    ds.PixelData = pixels.astype("<u2" if bits == 16 else np.uint8).tobytes()
    if draw(st.booleans()):
        ds.add_new(0xFFFCFFFC, "OB", b"\x00" * draw(st.integers(0, 8)) * 2)  # trailing padding
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True, implicit_vr=implicit, little_endian=True)
    kind = (PixelKind.GRAY16_MED if bits == 16 else PixelKind.GRAY8_LEFT if samples == 1
            else PixelKind.RGB8_INTERLEAVED if planar == 0 else PixelKind.RGB8_PLANAR)
    return buf.getvalue(), kind


@examples(250)
@given(dicom_files(), st.sampled_from([1, 3, 9]))
def test_generated_dicom_roundtrips_pixel_aware(case: tuple[bytes, PixelKind], level: int) -> None:
    data, kind = case
    frame = roundtrip(data, level)
    info = frame_info(frame)
    assert info.method is Method.NATIVE
    assert info.kind is kind


@examples(60)
@given(dicom_files(), st.sampled_from([0, 1, 2, 5, 64]))
def test_any_tile_size_roundtrips(case: tuple[bytes, PixelKind], tile: int) -> None:
    data = case[0]
    assert decode(encode(data, 1, tile=tile)) == data


def test_extreme_16bit_values_and_shapes() -> None:
    """1x1, single rows/columns, and alternating 0/65535 (maximal residuals) are exact."""
    for shape in [(1, 1), (1, 300), (300, 1), (65, 129)]:
        for img in (np.zeros(shape), np.full(shape, 65535), np.indices(shape).sum(0) % 2 * 65535):
            data = _native16(img.astype(np.uint16))
            assert frame_info(roundtrip(data)).kind is PixelKind.GRAY16_MED


def _native16(img: np.ndarray, *, signed: bool = False) -> bytes:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.2")
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = img.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = int(signed)
    ds.PixelData = img.astype("<u2").tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


# ----------------------------------------------------------------------------- real files

_TESTDATA = sorted(p for p in get_testdata_files() if Path(p).is_file())


def test_every_pydicom_test_file_roundtrips() -> None:
    assert len(_TESTDATA) > 100
    native = 0
    for path in _TESTDATA:
        data = Path(path).read_bytes()
        frame = encode(data, 3)
        assert decode(frame) == data, path
        native += frame_info(frame).method is Method.NATIVE
    assert native >= 35  # the uncompressed little-endian images take the pixel-aware path


def test_uncompressed_16bit_ct_uses_med(tmp_path: Path) -> None:
    for path in write_corpus(tmp_path, "ct", studies=1, per_study=2, seed=3):
        data = path.read_bytes()
        frame = roundtrip(data, 9)
        info = frame_info(frame)
        assert (info.method, info.kind, info.rows, info.cols) == (Method.NATIVE, PixelKind.GRAY16_MED, 512, 512)
        assert info.tile == pixelcodec.DEFAULT_TILE
        assert len(frame) < len(pixelcodec._zstd(data, 9))  # better than plain zstd at the same level
    info = frame_info(roundtrip(_ct_small()))
    assert (info.kind, info.tile) == (PixelKind.GRAY16_MED, pixelcodec.SMALL_TILE)


def test_signed_ct_is_biased_and_exact() -> None:
    rng = np.random.default_rng(5)
    smooth = np.add.outer(np.arange(64), np.arange(64)) * 30 - 1900  # crosses zero: sign bits flip
    img = (smooth + rng.normal(0, 5, (64, 64))).astype(np.int16).view(np.uint16)
    frame = roundtrip(_native16(img, signed=True))
    assert frame_info(frame).flags & pixelcodec.FLAG_SIGNED


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_bigendian.dcm", "image_dfl.dcm",
                                  "JPEG2000.dcm", "rtdose.dcm", "liver_1frame.dcm"])
def test_unsuitable_files_use_plain_zstd(name: str) -> None:
    frame = roundtrip(Path(get_testdata_files(name)[0]).read_bytes())
    assert frame_info(frame).method is Method.ZSTD


def test_pixels_stored_unfiltered_when_the_filter_loses() -> None:
    """Colour bars compress better raw: the trial picks RAW, and the frame still roundtrips."""
    frame = roundtrip(Path(get_testdata_files("SC_rgb_jpeg_dcmd.dcm")[0]).read_bytes())
    info = frame_info(frame)
    assert (info.method, info.flags, info.tile) == (Method.NATIVE, pixelcodec.FLAG_RAW, 0)
    ramp = np.tile(np.arange(256, dtype=np.uint16) * 257, (64, 4))  # a LUT-like ramp: MED wins anyway
    assert frame_info(roundtrip(_native16(ramp))).flags == 0


def test_pixel_length_mismatch_uses_plain_zstd() -> None:
    data = _native16(np.arange(64, dtype=np.uint16).reshape(8, 8))
    # Rows 8 -> 9: the pixel data is now one row short of what the header promises.
    patched = data.replace(b"\x28\x00\x10\x00US\x02\x00\x08\x00", b"\x28\x00\x10\x00US\x02\x00\x09\x00")
    assert patched != data
    assert frame_info(roundtrip(patched)).method is Method.ZSTD


def test_compressed_transfer_syntax_uses_plain_zstd() -> None:
    data = _native16(np.zeros((4, 4), dtype=np.uint16))
    patched = data.replace(ExplicitVRLittleEndian.encode() + b"\x00", RLELossless.encode(), 1)
    assert frame_info(roundtrip(patched)).method is Method.ZSTD


# ----------------------------------------------------------------------------- damaged frames


def _frames() -> list[bytes]:
    ct = _ct_small()
    return [encode(ct, 3), encode(b"not dicom at all " * 50, 3), encode(b"", 3)]


@examples(300)
@given(st.sampled_from(range(3)), st.data())
def test_corrupted_frame_never_returns_wrong_bytes(which: int, data: st.DataObject) -> None:
    original = [_ct_small(), b"not dicom at all " * 50, b""][which]
    assert_damage_is_caught(original, _frames()[which], data)


def assert_damage_is_caught(original: bytes, frame: bytes, data: st.DataObject) -> None:
    """Flip one to three drawn bytes of ``frame`` (which encodes ``original``): decoding raises
    IntegrityError or restores ``original`` exactly (a change zstd ignores, e.g. window size)."""
    damaged = bytearray(frame)
    for _ in range(data.draw(st.integers(1, 3))):
        pos = data.draw(st.integers(0, len(damaged) - 1))
        damaged[pos] ^= data.draw(st.integers(1, 255))
    try:
        out = decode(bytes(damaged))
    except IntegrityError:
        return
    assert out == original


@pytest.mark.parametrize("which", range(3))
def test_truncated_or_extended_frame_raises(which: int) -> None:
    frame = _frames()[which]
    for cut in {0, 1, 10, pixelcodec.HEADER_SIZE - 1, pixelcodec.HEADER_SIZE, len(frame) - 1}:
        with pytest.raises(IntegrityError):
            decode(frame[:cut])
    with pytest.raises(IntegrityError):
        decode(frame + b"\x00")


def reheader(frame: bytes, **changes: int) -> bytes:
    """Rewrite header fields with a valid CRC: a frame that lies consistently."""
    names = ["magic", "version", "method", "kind", "flags", "content_size", "content_crc", "pixel_offset",
             "pixel_length", "rows", "cols", "frames", "tile", "reserved", "meta_zlen"]
    fields = dict(zip(names, pixelcodec._HEADER.unpack_from(frame, 0)))
    fields.update(changes)
    head = pixelcodec._HEADER.pack(*fields.values())
    return head + struct.pack("<I", zlib.crc32(head)) + frame[pixelcodec.HEADER_SIZE:]


@pytest.mark.parametrize("changes", [
    {"version": 2}, {"method": 7}, {"kind": 9}, {"rows": 127}, {"pixel_length": 2}, {"frames": 2},
    {"pixel_offset": 10**9}, {"content_size": 1}, {"meta_zlen": 10**9}, {"meta_zlen": 5}, {"flags": 0x80}, {"flags": pixelcodec.FLAG_RAW},
    {"reserved": 1}, {"tile": 16}, {"tile": 0}, {"content_crc": 1},
])
def test_consistent_lies_in_the_header_raise(changes: dict[str, int]) -> None:
    frame = encode(_ct_small(), 3)
    with pytest.raises(IntegrityError):
        decode(reheader(frame, **changes))


def test_zstd_method_rejects_pixel_fields() -> None:
    frame = encode(b"abc" * 100, 3)
    with pytest.raises(IntegrityError):
        decode(reheader(frame, rows=1))


def test_verify_falls_back_to_zstd_when_native_is_wrong(monkeypatch: pytest.MonkeyPatch) -> None:
    data = _ct_small()
    real = pixelcodec._med_residuals
    monkeypatch.setattr(pixelcodec, "_med_residuals", lambda img, tile: real(img, tile) ^ np.uint16(1))
    frame = encode(data, 3, verify=True)
    assert frame_info(frame).method is Method.ZSTD
    assert decode(frame) == data


# ----------------------------------------------------------------------------- shared with px2 and px3


def assert_native_cuts_raise(frame: bytes) -> None:
    """A native-coded ``frame`` cut inside its header, at and inside its pixel stream, or extended by a
    byte, raises IntegrityError."""
    info = frame_info(frame)
    cuts = {0, pixelcodec.HEADER_SIZE - 1, pixelcodec.HEADER_SIZE, pixelcodec.HEADER_SIZE + info.meta_zlen,
            pixelcodec.HEADER_SIZE + info.meta_zlen + 7, len(frame) - 1}
    for cut in cuts:
        with pytest.raises(IntegrityError):
            decode(frame[:cut])
    with pytest.raises(IntegrityError):
        decode(frame + b"\x00")


def assert_committed_frames_decode(folder: Path) -> dict[str, dict[str, object]]:
    """Each frame ``folder/manifest.json`` lists has the version, kind and flags it lists and decodes to
    the content of its size and SHA-256. Returns the manifest."""
    manifest: dict[str, dict[str, object]] = json.loads((folder / "manifest.json").read_text())
    for name, want in manifest.items():
        frame = (folder / name).read_bytes()
        info = frame_info(frame)
        assert (info.version, info.kind.name if info.kind else None, info.flags) == (
            want["version"], want["kind"], want["flags"]), name
        out = decode(frame)
        assert (len(out), hashlib.sha256(out).hexdigest()) == (want["size"], want["sha256"]), name
    return manifest


def assert_codec_and_bundle_carry(codec_name: str, version: int) -> None:
    """The codec registered as ``codec_name`` roundtrips split content, and a bundle written with it
    holds a frame of format ``version`` that decodes back."""
    data = _ct_small()
    codec = get_codec(codec_name)
    assert codec.name == codec_name
    assert b"".join(codec.decode(codec.encode([data[:100], data[100:]]))) == data
    writer = BundleWriter(3, codec=codec_name)
    entry = writer.add("1.2.3", 1, data)
    _, chunks = writer.finish()
    blob = b"".join(chunks)
    frame = blob[entry.offset : entry.offset + entry.length]
    assert entry.codec == codec_name and frame_info(frame).version == version
    assert decode_frame(frame, entry) == data
