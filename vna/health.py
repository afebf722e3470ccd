"""Readiness endpoint for load balancers: ``GET /health`` on ``[health] host:port``.

Answers ``200 ready`` only while every check of the process passes, else
``503`` with one line per failing check. The checks (built by ``vna serve``)
are: the DICOM listener is open, the gRPC server is serving (when enabled),
the index answers a point read, the audit trail would not refuse an
operation, and the process is not shutting down. HAProxy uses it with
``option httpchk`` and ``check port`` for both the DIMSE and the gRPC backend
of a front-end, so one probe stands for everything a request needs (a plain
TCP check would see an open port on a front-end whose index is down; a DIMSE
check would open an association per probe).

The answer is cached for ``cache_seconds`` so that many checkers cost one
index read; a check that raises counts as failing (its message is reported).
"""

from __future__ import annotations

import errno
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from vna.errors import ConfigError

__all__ = ["Check", "HealthServer"]

log = logging.getLogger(__name__)

#: A named readiness check: returns None when fine, else why not (or raises).
Check = tuple[str, Callable[[], str | None]]


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A checker that hangs up early (HAProxy does) is not an error worth a traceback."""
        log.debug("health check from %s ended early", client_address, exc_info=True)


class HealthServer:
    """Serve ``/health`` from ``checks`` on ``host:port`` in a daemon thread.

    ``reuse_port``: worker processes of one server share the port (each answers
    for itself). ``start`` raises ConfigError if the port cannot be bound.
    """

    def __init__(self, host: str, port: int, checks: list[Check], *, reuse_port: bool = False,
                 cache_seconds: float = 0.5) -> None:
        self.host, self.port = host, port
        self.checks = checks
        self.reuse_port = reuse_port
        self.cache_seconds = cache_seconds
        self._draining = False
        self._lock = threading.Lock()
        self._cached: tuple[float, list[str]] = (-1e9, [])
        self._http: _Server | None = None

    def problems(self) -> list[str]:
        """The failing checks, ``name: why`` (empty when ready); cached ``cache_seconds``."""
        if self._draining:
            return ["shutting down"]
        with self._lock:
            at, found = self._cached
            if time.monotonic() - at < self.cache_seconds:
                return found
            found = []
            for name, check in self.checks:
                try:
                    why = check()
                except Exception as exc:  # a failing dependency, reported, never raised into the server
                    why = f"{type(exc).__name__}: {exc}"
                if why:
                    found.append(f"{name}: {why}")
            if found != self._cached[1]:  # log changes, not every probe
                if found:
                    log.warning("not ready: %s", "; ".join(found))
                else:
                    log.info("ready again")
            self._cached = (time.monotonic(), found)
            return found

    def start(self) -> int:
        """Bind and serve; returns the bound port."""
        health = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server API)
                if self.path.split("?")[0] not in ("/health", "/healthz", "/ready"):
                    self.send_error(404)
                    return
                problems = health.problems()
                body = ("\n".join(problems) if problems else "ready").encode() + b"\n"
                self.send_response(503 if problems else 200)
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # one line per probe every second would drown the log

        http = _Server((self.host, self.port), Handler, bind_and_activate=False)
        try:
            if self.reuse_port:
                http.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            http.server_bind()
            http.server_activate()
        except OSError as exc:
            http.server_close()
            why = "in use" if exc.errno == errno.EADDRINUSE else exc.strerror
            raise ConfigError(f"health endpoint cannot listen on {self.host}:{self.port}: {why}") from exc
        self._http = http
        self.port = int(self._http.server_address[1])
        threading.Thread(target=self._http.serve_forever, name="vna-health", daemon=True).start()
        log.info("health endpoint on http://%s:%d/health", self.host, self.port)
        return self.port

    def drain(self) -> None:
        """Answer 503 from now on (a load balancer stops sending new work)."""
        self._draining = True

    def stop(self) -> None:
        """Stop serving (idempotent)."""
        self._draining = True
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
