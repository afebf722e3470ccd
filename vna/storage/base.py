"""The BlobStore port: moves opaque bytes; knows nothing of DICOM, codecs or the index."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, Iterator, Protocol, runtime_checkable

from vna.domain import BlobStat

__all__ = ["BlobStore", "FileCopyStore", "LocalPathStore", "safe_key"]


_SAFE_KEY = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*(?:/[A-Za-z0-9_-][A-Za-z0-9._-]*)*")


def safe_key(key: str, *, quarantined: bool = False) -> str:
    """Return ``key`` if it is a safe relative blob key, else raise ValueError.

    Keys are ``/``-separated segments of ``[A-Za-z0-9._-]``; no segment is empty
    or starts with ``.`` (that excludes ``.``/``..`` and reserves ``.tmp``,
    ``.quarantine`` and the like for the stores themselves). Callers build keys
    from validated UIDs; this is the last line of defence against path traversal.
    ``quarantined`` also admits keys under ``.quarantine/`` (reading them back for forensics).
    """
    if not key or len(key) > 1024 or key.startswith("/"):
        raise ValueError(f"unsafe blob key {key!r}")
    rest = key[len(".quarantine/"):] if quarantined and key.startswith(".quarantine/") else key
    if _SAFE_KEY.fullmatch(rest) is None:
        raise ValueError(f"unsafe blob key {key!r}")
    return key


@runtime_checkable
class BlobStore(Protocol):
    """Opaque byte storage.

    Contracts: ``put`` is atomic and create-new (raises BlobExists, never
    overwrites; on failure nothing is left under the key); ``delete`` is
    idempotent; ``quarantine`` moves a blob aside under a quarantine prefix so
    it is no longer served but kept for forensics. I/O failures raise
    StorageUnavailable; absent keys raise BlobNotFound.
    """

    store_id: str

    def put(self, key: str, chunks: Iterable[bytes]) -> BlobStat:
        """Store the concatenated chunks under ``key``, durably, then return its stat."""
        ...

    def open(self, key: str, offset: int = 0, length: int | None = None) -> Iterator[bytes]:
        """Yield the blob's bytes from ``offset`` (``length`` bytes or to the end)."""
        ...

    def stat(self, key: str) -> BlobStat:
        """Size (and digest if the store keeps one) of the blob."""
        ...

    def delete(self, key: str) -> None:
        """Remove the blob; absent keys are not an error."""
        ...

    def quarantine(self, key: str) -> str:
        """Move the blob out of service; returns its quarantine key."""
        ...

    def iter_keys(self, prefix: str = "") -> Iterator[str]:
        """Every key under ``prefix`` (quarantined blobs excluded)."""
        ...


@runtime_checkable
class FileCopyStore(Protocol):
    """Optional capability: ``put`` of a local file without streaming it through Python."""

    def put_file(self, key: str, source: Path, *, adopt: bool = False) -> BlobStat:
        """Same contract as ``put`` with the file's bytes.

        ``adopt``: ``source`` is a spool file of the caller's that nobody writes
        again; the store may take it over (hard link) instead of copying it.
        """
        ...


@runtime_checkable
class LocalPathStore(Protocol):
    """Optional capability: the blob is a local file that can be sent without copying."""

    def local_path(self, key: str) -> Path:
        """Path of the blob's file (it may vanish at any time)."""
        ...
