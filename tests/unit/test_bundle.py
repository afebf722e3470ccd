"""Cold bundles: one ranged read per instance, the manifest found from the tail, damage detected."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from vna.errors import ConfigError, IntegrityError
from vna.storage import bundle as bmod
from vna.storage.bundle import (
    FOOTER_SIZE,
    BundleEntry,
    BundleWriter,
    EncodedFrame,
    decode_frame,
    footer_range,
    load_manifest,
    manifest_range,
    read_manifest,
)
from vna.storage.filesystem import FilesystemBlobStore


def _build(contents: list[bytes], level: int = 3) -> tuple[list[BundleEntry], bytes]:
    w = BundleWriter(level, verify=True)
    added = [w.add(f"1.2.3.{i}", 1, c) for i, c in enumerate(contents)]
    entries, chunks = w.finish()
    blob = b"".join(chunks)
    assert entries == added and w.size == len(blob)
    return entries, blob


@pytest.fixture(scope="module")
def contents(corpus: list[Path]) -> list[bytes]:
    return [p.read_bytes() for p in corpus] + [b"", b"not dicom", os.urandom(5000)]


@pytest.fixture(scope="module")
def built(contents: list[bytes]) -> tuple[list[BundleEntry], bytes]:
    return _build(contents)


def test_each_instance_from_its_own_range(contents: list[bytes], built: tuple[list[BundleEntry], bytes]) -> None:
    entries, blob = built
    assert len(entries) == len(contents)
    for entry, original in zip(entries, contents):
        frame = blob[entry.offset : entry.offset + entry.length]
        assert decode_frame(frame, entry) == original
        assert entry.content_sha256 == hashlib.sha256(original).hexdigest()
        assert entry.content_size == len(original) and entry.codec == "dicom-px1"


def test_manifest_from_the_tail(built: tuple[list[BundleEntry], bytes]) -> None:
    entries, blob = built
    reads: list[tuple[int, int]] = []

    def read(off: int, n: int) -> bytes:
        reads.append((off, n))
        return blob[off : off + n]

    assert load_manifest(read, len(blob)) == entries
    assert len(reads) == 1
    off, n = manifest_range(blob[slice(*_as_slice(footer_range(len(blob))))], len(blob))
    assert read_manifest(blob[off:], len(blob)) == entries
    assert read_manifest(blob[off - 7 :]) == entries
    with pytest.raises(ValueError):
        read_manifest(blob[off + 1 :])


def _as_slice(rng: tuple[int, int]) -> tuple[int, int]:
    return rng[0], rng[0] + rng[1]


def test_large_manifest_takes_a_second_read() -> None:
    entries, blob = _build([f"instance {i}".encode() for i in range(400)], level=1)
    reads: list[tuple[int, int]] = []

    def read(off: int, n: int) -> bytes:
        reads.append((off, n))
        return blob[off : off + n]

    assert load_manifest(read, len(blob)) == entries
    assert len(reads) == 2


def test_bundle_through_a_real_blob_store(tmp_path: Path, contents: list[bytes]) -> None:
    store = FilesystemBlobStore("cold", tmp_path, fsync=False)
    w = BundleWriter(3)
    for i, c in enumerate(contents):
        w.add(f"1.2.3.{i}", 1, c)
    entries, chunks = w.finish()
    stat = store.put("bundles/b1", chunks)

    def read(off: int, n: int) -> bytes:
        return b"".join(store.open("bundles/b1", off, n))

    assert load_manifest(read, stat.size) == entries
    for entry, original in zip(entries, contents):
        assert decode_frame(read(entry.offset, entry.length), entry) == original


def test_tampered_frame_raises(built: tuple[list[BundleEntry], bytes]) -> None:
    entries, blob = built
    for entry in entries:
        frame = bytearray(blob[entry.offset : entry.offset + entry.length])
        frame[len(frame) // 2] ^= 0x01
        with pytest.raises(IntegrityError):
            decode_frame(bytes(frame), entry)
        with pytest.raises(IntegrityError):
            decode_frame(bytes(frame[:-1]), entry)


def test_wrong_entry_or_content_digest_raises(built: tuple[list[BundleEntry], bytes]) -> None:
    entries, blob = built
    e0, e1 = entries[0], entries[1]
    with pytest.raises(IntegrityError):
        decode_frame(blob[e1.offset : e1.offset + e1.length], e0)
    frame = blob[e0.offset : e0.offset + e0.length]
    liar = BundleEntry(**{**e0.to_json(), "content_sha256": "0" * 64})
    with pytest.raises(IntegrityError):
        decode_frame(frame, liar)
    with pytest.raises(ConfigError):
        decode_frame(frame, BundleEntry(**{**e0.to_json(), "codec": "future-codec"}))


def test_truncated_or_extended_bundle_raises(built: tuple[list[BundleEntry], bytes]) -> None:
    _, blob = built
    for cut in (1, 7, FOOTER_SIZE - 1, FOOTER_SIZE, FOOTER_SIZE + 10, len(blob) // 2, len(blob) - 20):
        short = blob[:-cut]
        with pytest.raises(IntegrityError):
            load_manifest(lambda off, n: short[off : off + n], len(short))
    longer = blob + b"\x00" * 16
    with pytest.raises(IntegrityError):
        load_manifest(lambda off, n: longer[off : off + n], len(longer))
    with pytest.raises(IntegrityError):  # a store that returns short reads
        load_manifest(lambda off, n: blob[off : off + n - 1], len(blob))
    with pytest.raises(IntegrityError):
        footer_range(10)


def test_tampered_manifest_raises(built: tuple[list[BundleEntry], bytes]) -> None:
    _, blob = built
    off, n = manifest_range(blob[-FOOTER_SIZE:], len(blob))
    damaged = bytearray(blob)
    damaged[off + n // 2] ^= 0x20
    with pytest.raises(IntegrityError):
        read_manifest(bytes(damaged), len(damaged))


def _with_manifest(blob: bytes, doc: object) -> bytes:
    """A bundle whose manifest is replaced by ``doc`` with a correct footer (a consistent liar)."""
    off, _ = manifest_range(blob[-FOOTER_SIZE:], len(blob))
    raw = json.dumps(doc).encode()
    footer = bmod._FOOTER.pack(off, len(raw), hashlib.sha256(raw).digest(), bmod.FOOTER_MAGIC)
    return blob[:off] + raw + footer


@pytest.mark.parametrize("mutate", [
    lambda d: {**d, "format": "other"},
    lambda d: {**d, "version": 99},
    lambda d: {**d, "entries": "x"},
    lambda d: {**d, "entries": [{**d["entries"][0], "offset": 3}]},
    lambda d: {**d, "entries": [{**d["entries"][0], "length": 10**9}]},
    lambda d: {**d, "entries": [d["entries"][1], d["entries"][0]]},
    lambda d: {**d, "entries": [{**d["entries"][0], "content_sha256": "XYZ"}]},
    lambda d: {**d, "entries": [{**d["entries"][0], "version": True}]},
    lambda d: {**d, "entries": [{k: v for k, v in d["entries"][0].items() if k != "codec"}]},
    lambda d: [],
])
def test_inconsistent_manifest_raises(built: tuple[list[BundleEntry], bytes], mutate: object) -> None:
    entries, blob = built
    doc = {"format": "vna-bundle", "version": 1, "entries": [e.to_json() for e in entries]}
    assert read_manifest(_with_manifest(blob, doc)) == entries
    bad = _with_manifest(blob, mutate(doc))  # type: ignore[operator]
    with pytest.raises(IntegrityError):
        load_manifest(lambda off, n: bad[off : off + n], len(bad))


def test_entry_json_roundtrip(built: tuple[list[BundleEntry], bytes]) -> None:
    for e in built[0]:
        assert BundleEntry.from_json(json.loads(json.dumps(e.to_json()))) == e
    with pytest.raises(ValueError):
        BundleEntry.from_json({"sop_uid": "1"})


def test_writer_misuse() -> None:
    w = BundleWriter(1)
    w.add("1.2", 1, b"a")
    w.add("1.2", 2, b"b")
    with pytest.raises(ValueError):
        w.add("1.2", 1, b"c")
    entries, chunks = w.finish()
    assert len(entries) == len(w) == 2
    with pytest.raises(ValueError):
        w.add("1.3", 1, b"d")
    with pytest.raises(ValueError):
        w.finish()
    blob = b"".join(chunks)
    assert blob.startswith(bmod.MAGIC) and load_manifest(lambda o, n: blob[o : o + n], len(blob)) == entries


def test_frames_encoded_in_a_pool_make_the_same_bundle(contents: list[bytes]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    serial = BundleWriter(3)
    for i, c in enumerate(contents):
        serial.add(f"1.2.3.{i}", 1, c)
    pooled = BundleWriter(3)
    with ThreadPoolExecutor(4) as pool:
        encoded = list(pool.map(pooled.encode_frame, contents))
    for i, e in enumerate(encoded):
        assert isinstance(e, EncodedFrame) and e.content_sha256 == hashlib.sha256(contents[i]).hexdigest()
        pooled.add_frame(f"1.2.3.{i}", 1, e)
    (a, chunks_a), (b, chunks_b) = serial.finish(), pooled.finish()
    assert a == b and b"".join(chunks_a) == b"".join(chunks_b)
    with pytest.raises(ValueError):
        pooled.add_frame("1.2.3.x", 1, encoded[0])  # finished
    w = BundleWriter(3)
    w.add_frame("1.2", 1, encoded[0])
    with pytest.raises(ValueError):
        w.add_frame("1.2", 1, encoded[1])  # duplicate key


def test_a_wrong_trusted_content_digest_is_caught_when_read_back(contents: list[bytes]) -> None:
    """encode_frame may take the digest the caller verified the content against; a wrong one
    (bytes changed after that check) makes the frame fail decode_frame, never restore wrong bytes."""
    w = BundleWriter(3)
    right = w.encode_frame(contents[0], content_sha256=hashlib.sha256(contents[0]).hexdigest())
    assert right == w.encode_frame(contents[0])
    w.add_frame("1.2.1", 1, right)
    w.add_frame("1.2.2", 1, w.encode_frame(contents[0], content_sha256=hashlib.sha256(contents[1]).hexdigest()))
    entries, chunks = w.finish()
    blob = b"".join(chunks)
    assert decode_frame(blob[entries[0].offset : entries[0].offset + entries[0].length], entries[0]) == contents[0]
    with pytest.raises(IntegrityError):
        decode_frame(blob[entries[1].offset : entries[1].offset + entries[1].length], entries[1])


def test_empty_bundle() -> None:
    entries, chunks = BundleWriter().finish()
    blob = b"".join(chunks)
    assert entries == [] and load_manifest(lambda o, n: blob[o : o + n], len(blob)) == []
