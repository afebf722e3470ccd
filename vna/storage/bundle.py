"""Seekable cold bundles: many instances in one object, each an independent frame.

One instance is recalled with ONE ranged read of ``(entry.offset, entry.length)``
followed by :func:`decode_frame`; the manifest inside the bundle is the same list
of :class:`BundleEntry` that :meth:`BundleWriter.finish` hands to the caller for
the index, so the bundle can be re-indexed from itself alone.

Layout (integers little endian)::

    header    16 bytes   b"VNABNDL\\0" | format version u32 (=1) | reserved u32 (=0)
    frames    back to back, one per instance (codec ``dicom-px1``, see vna.pixelcodec)
    manifest  UTF-8 JSON {"format": "vna-bundle", "version": 1, "entries": [BundleEntry...]}
    footer    56 bytes   manifest offset u64 | manifest length u64 |
                         SHA-256 of the manifest (32 raw bytes) | b"VNABEND1"

Finding the manifest: read the last ``FOOTER_SIZE`` bytes (:func:`footer_range`),
:func:`manifest_range` gives the manifest's byte range, :func:`read_manifest`
parses and checks it. :func:`load_manifest` does this in one ranged read when
the manifest fits in ``TAIL_READ`` bytes (about 200 entries), two otherwise.
A truncated, extended or damaged bundle raises IntegrityError, never a wrong
manifest.

Memory: :class:`BundleWriter` keeps every encoded frame in memory until
:meth:`~BundleWriter.finish` (a series of a few hundred CT instances, ~150 MB raw
and roughly half that encoded, is fine); it is meant for one series or study
per bundle, not for unbounded streams.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

from vna import pixelcodec
from vna.errors import ConfigError, IntegrityError

__all__ = [
    "BundleEntry",
    "BundleWriter",
    "EncodedFrame",
    "FOOTER_SIZE",
    "HEADER_SIZE",
    "TAIL_READ",
    "decode_frame",
    "footer_range",
    "load_manifest",
    "manifest_range",
    "read_manifest",
]

FORMAT_VERSION = 1
MAGIC = b"VNABNDL\x00"
FOOTER_MAGIC = b"VNABEND1"
_HEADER = struct.Struct("<8sII")
_FOOTER = struct.Struct("<QQ32s8s")
HEADER_SIZE = _HEADER.size
FOOTER_SIZE = _FOOTER.size
TAIL_READ = 64 * 1024  # first tail read of load_manifest: footer + a manifest of ~200 entries
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_DECODERS: dict[str, Callable[[bytes], bytes]] = {pixelcodec.CODEC_NAME: pixelcodec.decode,
                                                  pixelcodec.CODEC_NAME_PX2: pixelcodec.decode,
                                                  pixelcodec.CODEC_NAME_PX3: pixelcodec.decode}


@dataclass(frozen=True)
class BundleEntry:
    """Where one instance version's frame is inside a bundle, and what it must hash to.

    ``content_*`` describe the DICOM bytes as received; ``stored_sha256`` is the
    SHA-256 of the frame (``length`` bytes at ``offset``) as stored.
    """

    sop_uid: str
    version: int
    offset: int
    length: int
    content_sha256: str
    content_size: int
    stored_sha256: str
    codec: str

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (the manifest's and the index's representation)."""
        return {
            "sop_uid": self.sop_uid,
            "version": self.version,
            "offset": self.offset,
            "length": self.length,
            "content_sha256": self.content_sha256,
            "content_size": self.content_size,
            "stored_sha256": self.stored_sha256,
            "codec": self.codec,
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> BundleEntry:
        """Parse :meth:`to_json` output; raises ValueError if a field is missing or mistyped."""
        if not isinstance(obj, Mapping):
            raise ValueError("bundle entry is not an object")
        try:
            entry = cls(
                sop_uid=_field(obj, "sop_uid", str),
                version=_field(obj, "version", int),
                offset=_field(obj, "offset", int),
                length=_field(obj, "length", int),
                content_sha256=_field(obj, "content_sha256", str),
                content_size=_field(obj, "content_size", int),
                stored_sha256=_field(obj, "stored_sha256", str),
                codec=_field(obj, "codec", str),
            )
        except KeyError as exc:
            raise ValueError(f"bundle entry lacks {exc}") from None
        if min(entry.version, entry.offset, entry.length, entry.content_size) < 0:
            raise ValueError("bundle entry has a negative number")
        if not (_HEX64.match(entry.content_sha256) and _HEX64.match(entry.stored_sha256)):
            raise ValueError("bundle entry digest is not 64 lowercase hex digits")
        return entry


def _field(obj: Mapping[str, Any], name: str, typ: type) -> Any:
    value = obj[name]
    if not isinstance(value, typ) or isinstance(value, bool):
        raise ValueError(f"bundle entry field {name!r} is not {typ.__name__}")
    return value


@dataclass(frozen=True)
class EncodedFrame:
    """One instance encoded as a frame, with the digests its :class:`BundleEntry` records."""

    frame: bytes
    content_sha256: str
    content_size: int
    stored_sha256: str

    @classmethod
    def of(cls, content: bytes, frame: bytes) -> EncodedFrame:
        """``frame`` (the encoding of ``content``) with both digests computed."""
        return cls(frame, hashlib.sha256(content).hexdigest(), len(content), hashlib.sha256(frame).hexdigest())


class BundleWriter:
    """Builds one bundle in memory: ``add`` each instance, then ``finish`` once.

    Not thread-safe. ``add`` encodes with ``codec`` (``dicom-px1``, or ``dicom-px2`` /
    ``dicom-px3`` whose greyscale frames need the native extension to decode) at ``codec_level``;
    ``verify=True`` makes the codec decode each frame back before accepting it
    (for debugging; migration verifies by digest after the put anyway).
    """

    def __init__(self, codec_level: int = 9, *, verify: bool = False, codec: str = pixelcodec.CODEC_NAME) -> None:
        if codec not in _DECODERS:
            raise ValueError(f"bundle codec must be one of {sorted(_DECODERS)}, not {codec!r}")
        self.codec_level = codec_level
        self.verify = verify
        self.codec = codec
        self._version = pixelcodec.CODEC_VERSIONS[codec]
        self._frames: list[bytes] = []
        self._entries: list[BundleEntry] = []
        self._keys: set[tuple[str, int]] = set()
        self._pos = HEADER_SIZE
        self._finished = False

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def size(self) -> int:
        """Bytes of header and frames so far (the whole bundle once finished)."""
        return self._pos

    def encode(self, content: bytes) -> bytes:
        """The frame :meth:`add` would write for ``content``. Thread-safe (the native coder and
        zstd release the GIL), so callers may encode in a pool and ``add`` the frames in order."""
        return pixelcodec.encode(content, self.codec_level, verify=self.verify, version=self._version)

    def encode_frame(self, content: bytes, *, content_sha256: str | None = None) -> EncodedFrame:
        """:meth:`encode` plus the digests :meth:`add_frame` records: the frame's SHA-256, and
        ``content_sha256`` (the digest ``content`` was verified against; computed when None).

        Thread-safe, and all of its work releases the GIL: a pool of these keeps every core busy.
        A wrong ``content_sha256`` is caught by :func:`decode_frame`, so bundles written with one
        must be read back and checked before they are relied on (migration always does).
        """
        frame = self.encode(content)
        digest = hashlib.sha256(content).hexdigest() if content_sha256 is None else content_sha256
        return EncodedFrame(frame, digest, len(content), hashlib.sha256(frame).hexdigest())

    def add(self, sop_uid: str, version: int, content: bytes, frame: bytes | None = None) -> BundleEntry:
        """Append ``content`` as the next frame (``frame``: what :meth:`encode` returned for it, or
        None to encode here); raises ValueError after finish or on a duplicate key."""
        self._check_new(sop_uid, version)
        if frame is None:
            frame = self.encode(content)
        return self.add_frame(sop_uid, version, EncodedFrame.of(content, frame))

    def add_frame(self, sop_uid: str, version: int, encoded: EncodedFrame) -> BundleEntry:
        """Append what :meth:`encode_frame` returned as the next frame (its digests are trusted: the
        caller verifies the written bundle); raises ValueError after finish or on a duplicate key."""
        self._check_new(sop_uid, version)
        frame = encoded.frame
        entry = BundleEntry(
            sop_uid=sop_uid,
            version=version,
            offset=self._pos,
            length=len(frame),
            content_sha256=encoded.content_sha256,
            content_size=encoded.content_size,
            stored_sha256=encoded.stored_sha256,
            codec=self.codec,
        )
        self._keys.add((sop_uid, version))
        self._frames.append(frame)
        self._entries.append(entry)
        self._pos += len(frame)
        return entry

    def _check_new(self, sop_uid: str, version: int) -> None:
        if self._finished:
            raise ValueError("bundle already finished")
        if (sop_uid, version) in self._keys:
            raise ValueError(f"bundle already holds {sop_uid} version {version}")

    def finish(self) -> tuple[list[BundleEntry], Iterator[bytes]]:
        """Close the bundle: its entries (for the index) and its bytes as chunks (for ``BlobStore.put``).

        The chunk iterator may be consumed once; the writer releases its frames as it goes.
        """
        if self._finished:
            raise ValueError("bundle already finished")
        self._finished = True
        manifest = json.dumps(
            {"format": "vna-bundle", "version": FORMAT_VERSION, "entries": [e.to_json() for e in self._entries]},
            separators=(",", ":"),
            sort_keys=True,
        ).encode("utf-8")
        footer = _FOOTER.pack(self._pos, len(manifest), hashlib.sha256(manifest).digest(), FOOTER_MAGIC)
        frames, self._frames = self._frames[::-1], []
        self._pos += len(manifest) + len(footer)

        def chunks() -> Iterator[bytes]:
            yield _HEADER.pack(MAGIC, FORMAT_VERSION, 0)
            while frames:
                yield frames.pop()
            yield manifest
            yield footer

        return list(self._entries), chunks()


def footer_range(size: int) -> tuple[int, int]:
    """(offset, length) of the footer of a bundle of ``size`` bytes; IntegrityError if too small."""
    if size < HEADER_SIZE + FOOTER_SIZE:
        raise IntegrityError(f"bundle of {size} bytes is too short")
    return size - FOOTER_SIZE, FOOTER_SIZE


def manifest_range(footer: bytes, size: int) -> tuple[int, int]:
    """(offset, length) of the manifest, from the bundle's last ``FOOTER_SIZE`` bytes and its size.

    Raises IntegrityError if the footer is damaged or does not fit ``size``
    (a truncated or extended bundle).
    """
    off, length, _ = _parse_footer(footer)
    if off < HEADER_SIZE or off + length + FOOTER_SIZE != size:
        raise IntegrityError(f"bundle footer (manifest at {off}+{length}) does not fit a {size}-byte bundle")
    return off, length


def read_manifest(tail: bytes, size: int | None = None) -> list[BundleEntry]:
    """Parse the manifest from ``tail``, the last bytes of a bundle (manifest + footer at least).

    With ``size`` (the bundle's total size) the footer is also checked against
    it. Raises IntegrityError if the footer, the manifest digest, its JSON or an
    entry's range is wrong; ValueError if ``tail`` is too short to hold the
    manifest the footer announces (read :func:`manifest_range` first).
    """
    off, length, digest = _parse_footer(tail[-FOOTER_SIZE:])
    if size is not None:
        manifest_range(tail[-FOOTER_SIZE:], size)
    if length + FOOTER_SIZE > len(tail):
        raise ValueError(f"tail of {len(tail)} bytes does not hold the {length}-byte manifest")
    raw = bytes(tail[len(tail) - FOOTER_SIZE - length : len(tail) - FOOTER_SIZE])
    if hashlib.sha256(raw).digest() != digest:
        raise IntegrityError("bundle manifest does not match its SHA-256")
    try:
        doc = json.loads(raw.decode("utf-8"))
        if not isinstance(doc, dict) or doc.get("format") != "vna-bundle" or not isinstance(doc.get("entries"), list):
            raise ValueError("not a vna-bundle manifest")
        if doc.get("version") != FORMAT_VERSION:
            raise ValueError(f"unsupported manifest version {doc.get('version')!r}")
        entries = [BundleEntry.from_json(e) for e in doc["entries"]]
    except ValueError as exc:  # includes JSON and UTF-8 decode errors
        raise IntegrityError(f"bundle manifest is malformed: {exc}") from exc
    pos = HEADER_SIZE
    for e in entries:
        if e.offset < pos or e.length == 0 or e.offset + e.length > off:
            raise IntegrityError(f"bundle manifest entry {e.sop_uid} has a bad range {e.offset}+{e.length}")
        pos = e.offset + e.length
    return entries


def load_manifest(read_range: Callable[[int, int], bytes], size: int) -> list[BundleEntry]:
    """The manifest of a ``size``-byte bundle, using ``read_range(offset, length)`` once or twice.

    Raises IntegrityError if the bundle is damaged or a read returns short.
    """
    footer_range(size)
    want = min(size, TAIL_READ)
    tail = _read_exact(read_range, size - want, want)
    off, length = manifest_range(tail[-FOOTER_SIZE:], size)
    if off < size - want:
        tail = _read_exact(read_range, off, size - off)
    return read_manifest(tail, size)


def decode_frame(frame: bytes, entry: BundleEntry) -> bytes:
    """The instance bytes of ``frame`` (the bundle's ``entry.offset``/``length`` range).

    Checks the frame's size and SHA-256, decodes it, then checks the content's
    size and SHA-256. Raises IntegrityError on any mismatch (never returns wrong
    bytes) and ConfigError for a codec this version cannot decode.
    """
    if len(frame) != entry.length:
        raise IntegrityError(f"frame of {entry.sop_uid} is {len(frame)} bytes, expected {entry.length}")
    if hashlib.sha256(frame).hexdigest() != entry.stored_sha256:
        raise IntegrityError(f"frame of {entry.sop_uid} does not match its stored SHA-256")
    decoder = _DECODERS.get(entry.codec)
    if decoder is None:
        raise ConfigError(f"unknown bundle codec {entry.codec!r}")
    content = decoder(frame)
    if len(content) != entry.content_size or hashlib.sha256(content).hexdigest() != entry.content_sha256:
        raise IntegrityError(f"decoded {entry.sop_uid} does not match its content SHA-256")
    return content


def _parse_footer(footer: bytes) -> tuple[int, int, bytes]:
    if len(footer) != FOOTER_SIZE:
        raise IntegrityError(f"bundle footer is {len(footer)} bytes, expected {FOOTER_SIZE}")
    off, length, digest, magic = _FOOTER.unpack(footer)
    if magic != FOOTER_MAGIC:
        raise IntegrityError("bundle footer magic missing (truncated or not a bundle)")
    return int(off), int(length), bytes(digest)


def _read_exact(read_range: Callable[[int, int], bytes], offset: int, length: int) -> bytes:
    data = read_range(offset, length)
    if len(data) != length:
        raise IntegrityError(f"bundle read at {offset} returned {len(data)} of {length} bytes")
    return data
