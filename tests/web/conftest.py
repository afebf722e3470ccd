"""Fixtures of the DICOMweb tests: a real `vna serve` with its web port on, and a small HTTP helper."""

from __future__ import annotations

import email.parser
import email.policy
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import requests

from tests.conftest import VnaServer, free_port


@dataclass
class Web:
    """A vna server and its DICOMweb base URL."""

    server: VnaServer
    port: int

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}/dicomweb"

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture
def make_web(make_server: Callable[..., VnaServer]) -> Callable[..., Web]:
    """Start a vna server with DICOMweb on a free port (``config``: extra TOML)."""
    def factory(config: str = "", env: dict[str, str] | None = None) -> Web:
        port = free_port()
        srv = make_server(config, env={"VNA_WEB_PORT": str(port), **(env or {})})
        return Web(srv, port)
    return factory


@pytest.fixture
def web(make_web: Callable[..., Web]) -> Web:
    return make_web()


def multipart_body(files: list[Path], boundary: str = "vna-test-boundary") -> tuple[bytes, str]:
    """A STOW-RS body of Part 10 files, and its Content-Type."""
    chunks = []
    for f in files:
        chunks += [f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode(), f.read_bytes(), b"\r\n"]
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f'multipart/related; type="application/dicom"; boundary={boundary}'


def split_parts(response: requests.Response) -> list[tuple[str, bytes]]:
    """(Content-Type, bytes) of every part of a multipart/related response (parsed by the stdlib)."""
    raw = b"Content-Type: " + response.headers["content-type"].encode() + b"\r\n\r\n" + response.content
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(raw)
    assert msg.is_multipart(), response.headers["content-type"]
    return [(str(p["content-type"]), p.get_payload(decode=True)) for p in msg.iter_parts()]
