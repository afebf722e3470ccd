"""Media types: Accept negotiation, multipart/related bodies (written and parsed streaming)."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from vna.errors import InvalidInput

__all__ = ["MediaRange", "parse_media_type", "parse_accept", "PartWriter", "MultipartParser", "PartStart", "PART_END",
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
class PartStart:
    """A part begins: its headers (lower-case names). Its bytes follow as ``bytes`` events, then :data:`PART_END`."""

    headers: dict[str, str]

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "")


class _PartEnd:
    """The part's bytes are complete (its closing delimiter was seen)."""

    def __repr__(self) -> str:
        return "PART_END"


PART_END = _PartEnd()
#: What :meth:`MultipartParser.feed` returns, in body order.
Event = PartStart | bytes | _PartEnd

_PREAMBLE, _AFTER_DELIM, _HEADERS, _BODY, _DONE = range(5)
#: the longest header block of one part, and of a delimiter line (transport padding included)
MAX_PART_HEADERS = 65536
_MAX_DELIM_LINE = 1024


class MultipartParser:
    """A multipart body (RFC 2046) parsed as it arrives, in chunks of any size.

    :meth:`feed` returns the events the bytes so far complete; a part's data
    is handed out as soon as it cannot be the start of a delimiter, so memory
    stays bounded by the chunk size plus the boundary (plus one part's header
    block, at most :data:`MAX_PART_HEADERS`). :meth:`close` says the body has
    ended. Both raise InvalidInput on a malformed body: no opening
    delimiter, a delimiter line with anything but padding after the
    boundary (the boundary inside a part's data), a part without a blank line
    after its headers, a header line without ``:``, no close delimiter. The
    epilogue after the close delimiter is ignored.
    """

    def __init__(self, boundary: str) -> None:
        if not boundary or len(boundary) > 200:
            raise InvalidInput("multipart boundary missing or longer than 200 characters")
        self._dash = b"--" + boundary.encode("latin-1")
        self._delim = b"\r\n" + self._dash
        self._buf = bytearray()
        self._state = _PREAMBLE
        self._at_start = True   # the opening delimiter may also be the body's first bytes (no preamble)
        self._seen = 0

    @property
    def done(self) -> bool:
        """True once the close delimiter was seen."""
        return self._state == _DONE

    def feed(self, data: bytes) -> list[Event]:
        """The events completed by ``data`` (the next bytes of the body)."""
        self._seen += len(data)
        if self._state == _DONE:
            return []
        buf = self._buf
        buf += data
        out: list[Event] = []
        delim = self._delim
        while True:
            state = self._state
            if state == _BODY:
                i = buf.find(delim)
                if i >= 0:
                    if i:
                        out.append(bytes(buf[:i]))
                    out.append(PART_END)
                    del buf[:i + len(delim)]
                    self._state = _AFTER_DELIM
                    continue
                n = len(buf) - len(delim) + 1   # the tail may be the start of a delimiter
                if n > 0:
                    out.append(bytes(buf[:n]))
                    del buf[:n]
                return out
            if state == _HEADERS:
                if len(buf) < 2:
                    return out
                if buf[:2] == b"\r\n":
                    headers: dict[str, str] = {}
                    del buf[:2]
                else:
                    end = buf.find(b"\r\n\r\n", 0, MAX_PART_HEADERS + 4)
                    if end < 0:
                        if len(buf) > MAX_PART_HEADERS:
                            raise InvalidInput("malformed multipart body: a part has no blank line after its "
                                               f"headers within {MAX_PART_HEADERS} bytes")
                        return out
                    headers = _headers(bytes(buf[:end]))
                    del buf[:end + 4]
                out.append(PartStart(headers))
                self._state = _BODY
                continue
            if state == _AFTER_DELIM:
                if len(buf) < 2:
                    return out
                if buf[:2] == b"--":
                    self._state = _DONE
                    buf.clear()
                    return out
                eol = buf.find(b"\r\n", 0, _MAX_DELIM_LINE)
                if eol < 0:
                    partial = buf[:-1] if buf.endswith(b"\r") else buf
                    if len(buf) >= _MAX_DELIM_LINE or partial.strip(b" \t"):
                        raise InvalidInput("malformed multipart body: bad boundary delimiter line "
                                           "(the boundary inside a part's data?)")
                    return out
                if buf[:eol].strip(b" \t"):
                    raise InvalidInput("malformed multipart body: bad boundary delimiter line "
                                       "(the boundary inside a part's data?)")
                del buf[:eol + 2]
                self._state = _HEADERS
                continue
            # _PREAMBLE
            if self._at_start:
                if len(buf) < len(self._dash) and self._dash.startswith(buf):
                    return out   # could still open with the delimiter
                self._at_start = False
                if buf.startswith(self._dash):
                    del buf[:len(self._dash)]
                    self._state = _AFTER_DELIM
                    continue
            i = buf.find(delim)
            if i >= 0:
                del buf[:i + len(delim)]
                self._state = _AFTER_DELIM
                continue
            keep = len(delim) - 1
            if len(buf) > keep:
                del buf[:len(buf) - keep]   # preamble: ignored
            return out

    def close(self) -> None:
        """The body has ended: raise InvalidInput unless it was a complete multipart body."""
        if self._state == _DONE:
            return
        if self._seen == 0:
            raise InvalidInput("empty multipart body")
        if self._state == _PREAMBLE:
            raise InvalidInput("malformed multipart body: no opening boundary delimiter")
        if self._state == _HEADERS:
            raise InvalidInput("malformed multipart body: a part has no blank line after its headers")
        raise InvalidInput("malformed multipart body: no close delimiter (truncated?)")


def _headers(raw: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in raw.decode("latin-1").split("\r\n"):
        name, sep, value = line.partition(":")
        if not sep:
            raise InvalidInput("malformed multipart body: a part header line has no ':'")
        out[name.strip().lower()] = value.strip()
    return out
