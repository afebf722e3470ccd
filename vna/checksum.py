"""Streaming SHA-256 helpers. Digests are lowercase hex strings everywhere."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

__all__ = ["CHUNK", "HashingIterator", "sha256_file", "read_chunks"]

CHUNK = 1 << 20


def read_chunks(fh: BinaryIO, length: int | None = None, chunk: int = CHUNK) -> Iterator[bytes]:
    """Yield the file's bytes from its current position (``length`` bytes, or to EOF)."""
    remaining = length
    while remaining is None or remaining > 0:
        n = chunk if remaining is None else min(chunk, remaining)
        data = fh.read(n)
        if not data:
            return
        if remaining is not None:
            remaining -= len(data)
        yield data


class HashingIterator:
    """Wraps a chunk iterator; after exhaustion ``hexdigest()`` and ``size`` describe it."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = iter(chunks)
        self._hash = hashlib.sha256()
        self.size = 0

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        data = next(self._chunks)
        self._hash.update(data)
        self.size += len(data)
        return data

    def hexdigest(self) -> str:
        """SHA-256 of the bytes seen so far."""
        return self._hash.hexdigest()


def sha256_file(path: Path) -> tuple[str, int]:
    """Return (sha256 hex, size) of a whole file."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        for data in read_chunks(fh):
            h.update(data)
            size += len(data)
    return h.hexdigest(), size
