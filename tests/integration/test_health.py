"""The ``[health]`` readiness endpoint of ``vna serve`` (what HAProxy probes), against real servers."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

from tests.conftest import VnaServer, free_port

Factory = Callable[..., VnaServer]


def get(port: int, path: str = "/health") -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return int(r.status), r.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode()


def test_ready_when_listening_and_index_answers(make_server: Factory) -> None:
    port = free_port()
    srv = make_server(f'[health]\nhost = "127.0.0.1"\nport = {port}\n')
    assert get(port) == (200, "ready\n")
    assert get(port, "/nope")[0] == 404
    srv.stop()
    try:
        get(port)
    except OSError:
        pass  # stopped: nothing listens any more
    else:
        raise AssertionError("the health endpoint outlived the server")


def test_not_ready_while_the_audit_trail_refuses(make_server: Factory) -> None:
    port = free_port()
    make_server(f'[health]\nhost = "127.0.0.1"\nport = {port}\n[audit]\npath = "/dev/full"\n')
    status, body = get(port)
    assert status == 503 and body.startswith("audit: audit trail unavailable")


def test_health_port_in_use_is_a_clear_error(make_server: Factory, tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        srv = make_server(f'[health]\nhost = "127.0.0.1"\nport = {taken}\n', start=False)
        try:
            srv.start(timeout=20)
        except RuntimeError as exc:
            assert "health endpoint cannot listen" in str(exc)
        else:
            raise AssertionError("vna serve started without its health endpoint")


def test_every_worker_process_answers_on_the_shared_port(make_server: Factory) -> None:
    port = free_port()
    make_server(f'[dicom]\nworkers = 2\n[health]\nhost = "127.0.0.1"\nport = {port}\n')
    assert [get(port) for _ in range(6)] == [(200, "ready\n")] * 6
