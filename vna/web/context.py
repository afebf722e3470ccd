"""What every DICOMweb endpoint needs: the Archive's services, the web config, the caller."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from starlette.requests import Request

from vna.api.auth import Principal
from vna.audit import Actor
from vna.config import WebConfig
from vna.domain import validate_uid
from vna.errors import InvalidUID

if TYPE_CHECKING:
    from vna.archive import Archive

__all__ = ["WebContext", "actor_of", "uid_param", "ctx_of", "STORE_THREADS", "READ_THREADS"]

#: instances stored at once by STOW-RS (each mostly waits for fsyncs; together they share index group commits)
STORE_THREADS = 16
#: instances read and verified at once by WADO-RS
READ_THREADS = 8


@dataclass(frozen=True)
class WebContext:
    """The shared services (one Archive per process), the ``[web]`` settings and the bounded thread pools
    the endpoints run blocking work on (threads start on first use; :meth:`close` stops them)."""

    archive: Archive
    cfg: WebConfig
    spool: Path
    prefix: str = "/dicomweb"
    #: STOW-RS ingests (all parts of a request at once, the server's requests together)
    store_pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(STORE_THREADS, thread_name_prefix="vna-web-store"))
    #: WADO-RS reads (verification of the instances a response sends next)
    read_pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(READ_THREADS, thread_name_prefix="vna-web-read"))

    def close(self) -> None:
        """Stop the pools' threads once the work they hold is done."""
        self.store_pool.shutdown(wait=True, cancel_futures=True)
        self.read_pool.shutdown(wait=True, cancel_futures=True)


def ctx_of(request: Request) -> WebContext:
    """The context the app was built with."""
    ctx: WebContext = request.app.state.vna
    return ctx


def actor_of(request: Request) -> Actor:
    """The caller for audit records: the token's name (or ``anonymous`` on loopback) and the peer address."""
    principal: Principal | None = request.scope.get("state", {}).get("principal")
    peer = f"{request.client.host}:{request.client.port}" if request.client else ""
    if principal is None:
        return Actor("anonymous", "http", peer)
    return Actor(principal.name, "token", peer)


def uid_param(request: Request, name: str) -> str:
    """A UID path parameter, validated (digits and dots only: nothing else reaches a service or a path)."""
    value = str(request.path_params[name])
    try:
        return validate_uid(value, name)
    except InvalidUID as exc:
        raise InvalidUID(f"{name} in the URL is not a UID: {exc}") from None
