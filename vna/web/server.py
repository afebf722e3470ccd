"""The web front-end's server: uvicorn in a thread of the ``vna serve`` process, over the Archive's services."""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import TYPE_CHECKING

from vna.config import Config
from vna.preflight import listen_error

if TYPE_CHECKING:
    from vna.archive import Archive
    from vna.web.app import BearerAuth

__all__ = ["WebServer"]

log = logging.getLogger(__name__)


class WebServer:
    """Serve :func:`vna.web.app.build_app` on ``[web] host:port`` (TLS when configured) until :meth:`stop`.

    ``reuse_port``: worker processes of one server share the port. ``start``
    raises ConfigError if the port cannot be bound. The server thread's event
    loop is uvloop's when it is installed (a dependency off Windows), else asyncio's.
    """

    def __init__(self, archive: Archive, cfg: Config, *, reuse_port: bool = False) -> None:
        self.archive = archive
        self.cfg = cfg
        self.web = cfg.web
        self.reuse_port = reuse_port
        self._server: object | None = None
        self._app: BearerAuth | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The viewer's address as a person would open it."""
        scheme = "https" if self.web.tls_cert else "http"
        host = f"[{self.web.host}]" if ":" in self.web.host else self.web.host
        return f"{scheme}://{host}:{self.web.port}/viewer/"

    def _socket(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.web.host else socket.AF_INET
        # IPPROTO_TCP named: asyncio sets TCP_NODELAY only on sockets whose proto says TCP (else delayed ACKs
        # stall every response)
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((self.web.host, self.web.port))
        except OSError as exc:
            sock.close()
            raise listen_error("web.port", "DICOMweb and the viewer", self.web.host, self.web.port, exc) from exc
        sock.listen(128)
        sock.set_inheritable(True)
        return sock

    def start(self, timeout: float = 30.0) -> None:
        """Bind and serve in a daemon thread; returns once serving (raises ConfigError / RuntimeError)."""
        import uvicorn

        from vna.web.app import build_app

        sock = self._socket()
        app = build_app(self.archive, self.web, self.cfg.grpc.token)
        self._app = app
        config = uvicorn.Config(
            app, log_level="warning", access_log=False, lifespan="off", proxy_headers=False,
            ssl_certfile=str(self.cfg.resolve(self.web.tls_cert)) if self.web.tls_cert else None,
            ssl_keyfile=str(self.cfg.resolve(self.web.tls_key)) if self.web.tls_key else None,
            timeout_graceful_shutdown=5, limit_concurrency=256,
        )
        server = uvicorn.Server(config)
        self._server = server
        self._thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="vna-web",
                                        daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                sock.close()
                raise RuntimeError("the DICOMweb server did not start (see the log above)")
            time.sleep(0.02)
        log.info("DICOMweb on %s (viewer at %s)", self.url.replace("/viewer/", "/dicomweb"), self.url)

    @property
    def serving(self) -> bool:
        """True while the server thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        """Stop accepting, let requests in flight finish (a few seconds at most), return."""
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        server.should_exit = True  # type: ignore[attr-defined]
        thread.join(15)
        if self._app is not None and not thread.is_alive():
            self._app.close()
        self._server = self._thread = self._app = None
