"""Codecs transform instance bytes at rest. A codec name, once written, stays decodable forever.

``identity`` stores bytes as received; ``zstd`` is one zstd frame. Codecs are
streaming: ``encode``/``decode`` map chunk iterators to chunk iterators.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Protocol

import zstandard

from vna.errors import ConfigError, IntegrityError

__all__ = ["Codec", "IdentityCodec", "ZstdCodec", "PixelCodec", "get_codec"]


class Codec(Protocol):
    """Reversible byte transformation identified by ``name``."""

    name: str

    def encode(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        """Yield the encoded form of the concatenated chunks."""
        ...

    def decode(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        """Yield the original bytes; raise IntegrityError if they cannot be decoded."""
        ...


class IdentityCodec:
    """Bytes at rest are the bytes received."""

    name = "identity"

    def encode(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        yield from chunks

    def decode(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        yield from chunks


class ZstdCodec:
    """One zstd frame (level configurable; the level is not needed to decode)."""

    name = "zstd"

    def __init__(self, level: int = 3) -> None:
        self.level = level

    def encode(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        comp = zstandard.ZstdCompressor(level=self.level).compressobj()
        for data in chunks:
            out = comp.compress(data)
            if out:
                yield out
        yield comp.flush()

    def decode(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        dec = zstandard.ZstdDecompressor().decompressobj()
        try:
            for data in chunks:
                out = dec.decompress(data)
                if out:
                    yield out
        except zstandard.ZstdError as exc:
            raise IntegrityError(f"zstd frame cannot be decoded: {exc}") from exc


class PixelCodec:
    """``dicom-px1``: pixel-aware lossless compression of a whole Part 10 file (see vna.pixelcodec).

    Works on whole instances (frames of a cold bundle), so it buffers.
    """

    def __init__(self, level: int = 9, *, version: int = 1) -> None:
        self.level = level
        self.version = version
        from vna import pixelcodec

        self.name = {v: k for k, v in pixelcodec.CODEC_VERSIONS.items()}[version]
        self._impl = pixelcodec

    def encode(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        yield self._impl.encode(b"".join(chunks), self.level, version=self.version)

    def decode(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        yield self._impl.decode(b"".join(chunks))


def get_codec(name: str) -> Codec:
    """The codec registered under ``name``; raises ConfigError for unknown names."""
    if name == "identity":
        return IdentityCodec()
    if name == "zstd":
        return ZstdCodec()
    if name == "dicom-px1":
        return PixelCodec()
    if name == "dicom-px2":  # px1 + the native greyscale coder (vna.pixelcodec, format version 2)
        return PixelCodec(version=2)
    if name == "dicom-px3":  # px1 + the native px3 coder (format version 3)
        return PixelCodec(version=3)
    raise ConfigError(f"unknown codec {name!r}")
