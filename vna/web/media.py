"""Media types: Accept negotiation, multipart/related bodies (written streaming, read from a spool file)."""

from __future__ import annotations

import mmap
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from vna.errors import InvalidInput

__all__ = ["MediaRange", "parse_media_type", "parse_accept", "PartWriter", "Part", "split_multipart",
           "TS_MEDIA_TYPES", "EXPLICIT_LE", "IMPLICIT_LE", "DEFLATED_LE", "BIG_ENDIAN"]

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
DEFLATED_LE = "1.2.840.10008.1.2.1.99"
BIG_ENDIAN = "1.2.840.10008.1.2.2"
NATIVE_SYNTAXES = frozenset({IMPLICIT_LE, EXPLICIT_LE, DEFLATED_LE, BIG_ENDIAN})

#: The media type of a frame in a stored compressed transfer syntax (PS3.18 Table 8.7.3-2).
TS_MEDIA_TYPES: dict[str, str] = {
    "1.2.840.10008.1.2.4.50": "image/jpeg", "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg", "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls", "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2", "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.92": "image/jpx", "1.2.840.10008.1.2.4.93": "image/jpx",
    "1.2.840.10008.1.2.4.201": "image/jphc", "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc",
    "1.2.840.10008.1.2.5": "image/dicom-rle",
}


@dataclass(frozen=True)
class MediaRange:
    """One media type (or range) with its parameters, lower-cased names, quotes removed."""

    type: str
    params: dict[str, str] = field(default_factory=dict)

    def matches(self, media_type: str) -> bool:
        """True if this range covers ``media_type`` (``*/*``, ``image/*``, exact)."""
        if self.type in ("*/*", "*"):
            return True
        if self.type.endswith("/*"):
            return media_type.split("/", 1)[0] == self.type[:-2]
        return self.type == media_type


def parse_media_type(value: str) -> MediaRange:
    """``type/subtype; a=b; c="d"`` -> MediaRange (raises InvalidInput on an empty value)."""
    head, *params = _split(value, ";")
    if not head.strip():
        raise InvalidInput("empty media type")
    out: dict[str, str] = {}
    for p in params:
        name, sep, val = p.partition("=")
        if sep:
            out[name.strip().lower()] = val.strip().strip('"')
    return MediaRange(head.strip().lower(), out)


def _split(value: str, sep: str) -> list[str]:
    """Split on ``sep`` outside double quotes."""
    parts: list[str] = []
    cur: list[str] = []
    quoted = False
    for ch in value:
        if ch == '"':
            quoted = not quoted
        if ch == sep and not quoted:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


def parse_accept(header: str | None) -> list[MediaRange]:
    """The media ranges of an Accept header (``*/*`` when absent), those with ``q=0`` dropped."""
    if not header or not header.strip():
        return [MediaRange("*/*")]
    out = []
    for item in _split(header, ","):
        if not item.strip():
            continue
        mr = parse_media_type(item)
        if mr.params.get("q", "1").strip() in ("0", "0.0", "0.00", "0.000"):
            continue
        out.append(mr)
    return out


class PartWriter:
    """A multipart/related body written part by part (``Content-Type`` of the whole from :attr:`content_type`)."""

    def __init__(self, part_type: str) -> None:
        self.boundary = secrets.token_hex(16)
        self.content_type = f'multipart/related; type="{part_type}"; boundary={self.boundary}'

    def head(self, content_type: str, length: int | None = None, location: str | None = None) -> bytes:
        """The delimiter and headers that open a part."""
        lines = [f"--{self.boundary}", f"Content-Type: {content_type}"]
        if length is not None:
            lines.append(f"Content-Length: {length}")
        if location is not None:
            lines.append(f"Content-Location: {location}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def end(self) -> bytes:
        """The close delimiter (each part's data is followed by CRLF before the next delimiter)."""
        return f"--{self.boundary}--\r\n".encode("latin-1")


def file_chunks(path: Path, chunk: int = 1 << 20) -> Iterator[bytes]:
    """The bytes of a file in chunks."""
    with open(path, "rb") as fh:
        while data := fh.read(chunk):
            yield data


@dataclass(frozen=True)
class Part:
    """One part of a multipart body: its headers (lower-case names) and its byte range in the spool file."""

    headers: dict[str, str]
    start: int
    end: int

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "")


def split_multipart(path: Path, boundary: str) -> list[Part]:
    """The parts of the multipart body in ``path`` (RFC 2046), found without reading it into memory.

    Raises InvalidInput if the body has no opening delimiter, no close
    delimiter, or a part without a header/body separator.
    """
    if not boundary or len(boundary) > 200:
        raise InvalidInput("multipart boundary missing or longer than 200 characters")
    delim = b"--" + boundary.encode("latin-1")
    size = os.path.getsize(path)
    if size == 0:
        raise InvalidInput("empty multipart body")
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        pos = 0 if mm[:len(delim)] == delim else mm.find(b"\r\n" + delim)
        if pos < 0:
            raise InvalidInput("malformed multipart body: no opening boundary delimiter")
        pos = pos if pos == 0 and mm[:len(delim)] == delim else pos + 2
        parts: list[Part] = []
        while True:
            after = pos + len(delim)
            if mm[after:after + 2] == b"--":
                return parts
            eol = mm.find(b"\r\n", after)
            if eol < 0 or mm[after:eol].strip(b" \t"):
                raise InvalidInput("malformed multipart body: bad boundary delimiter line")
            hs = eol + 2
            if mm[hs:hs + 2] == b"\r\n":
                headers, body_start = {}, hs + 2   # no headers: the body follows the blank line
            else:
                head_end = mm.find(b"\r\n\r\n", hs, hs + 65536)
                if head_end < 0:
                    raise InvalidInput("malformed multipart body: a part has no blank line after its headers")
                headers, body_start = _headers(mm[hs:head_end]), head_end + 4
            nxt = mm.find(b"\r\n" + delim, body_start)
            if nxt < 0:
                raise InvalidInput("malformed multipart body: no close delimiter (truncated?)")
            parts.append(Part(headers, body_start, nxt))
            pos = nxt + 2


def _headers(raw: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in raw.decode("latin-1").split("\r\n"):
        name, sep, value = line.partition(":")
        if not sep:
            raise InvalidInput("malformed multipart body: a part header line has no ':'")
        out[name.strip().lower()] = value.strip()
    return out


def copy_range(src: BinaryIO, start: int, end: int, write: Callable[[bytes], object], chunk: int = 1 << 20) -> None:
    """Pass bytes ``[start, end)`` of ``src`` to ``write``, in chunks."""
    src.seek(start)
    left = end - start
    while left > 0:
        data = src.read(min(chunk, left))
        if not data:
            raise InvalidInput("multipart body ended early")
        write(data)
        left -= len(data)
