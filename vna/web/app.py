"""The ASGI app: DICOMweb routes under ``/dicomweb``, the viewer under ``/viewer/``, ``/`` redirecting there.

Authentication (:class:`BearerAuth`): on a loopback bind no token is asked;
otherwise every ``/dicomweb`` request needs ``Authorization: Bearer`` with one
of the ``[[grpc.token]]`` tokens — ``read`` for GET, ``write`` for POST. A
refused request is answered 401/403 and audited (User Authentication,
failure), as refused gRPC calls are.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from vna.api.auth import PermissionDenied, Principal, TokenAuthenticator, Unauthenticated
from vna.audit import LOGIN, USER_AUTHENTICATION, Actor
from vna.config import WebConfig, is_loopback
from vna.errors import AuditUnavailable, VnaError
from vna.web import qido, stow, viewer, wado
from vna.web.context import WebContext
from vna.web.status import error_response

if TYPE_CHECKING:
    from vna.archive import Archive

__all__ = ["build_app", "BearerAuth"]

log = logging.getLogger(__name__)

Endpoint = Callable[[Request], Awaitable[Response]]


def _guarded(endpoint: Endpoint) -> Endpoint:
    """The endpoint with vna errors (and unexpected ones) turned into responses through the status table."""
    async def run(request: Request) -> Response:
        try:
            return await endpoint(request)
        except Exception as exc:  # mapped to a status (unexpected ones to 500, logged with the traceback)
            return error_response(exc, f"{request.method} {request.url.path}")
    run.__name__ = endpoint.__name__
    return run


def _routes() -> list[Route]:
    s, se, i = "/studies/{study}", "/series/{series}", "/instances/{instance}"
    get: list[tuple[str, Endpoint]] = [
        ("/studies", qido.search), (f"{s}/series", qido.search), ("/series", qido.search),
        ("/instances", qido.search), (f"{s}/instances", qido.search), (f"{s}{se}/instances", qido.search),
        (s, wado.retrieve), (f"{s}{se}", wado.retrieve), (f"{s}{se}{i}", wado.retrieve),
        (f"{s}/metadata", wado.metadata), (f"{s}{se}/metadata", wado.metadata),
        (f"{s}{se}{i}/metadata", wado.metadata),
        (f"{s}{se}{i}/bulkdata/{{path:path}}", wado.bulkdata),
        (f"{s}{se}{i}/frames/{{frames}}", wado.frames),
        (f"{s}{se}{i}/rendered", wado.rendered), (f"{s}{se}{i}/frames/{{frames}}/rendered", wado.rendered),
        (f"{s}/thumbnail", wado.thumbnail), (f"{s}{se}/thumbnail", wado.thumbnail),
        (f"{s}{se}{i}/thumbnail", wado.thumbnail), (f"{s}{se}{i}/frames/{{frames}}/thumbnail", wado.thumbnail),
    ]
    routes = [Route(f"/dicomweb{p}", _guarded(e), methods=["GET"]) for p, e in get]
    routes += [Route("/dicomweb/studies", _guarded(stow.store), methods=["POST"]),
               Route(f"/dicomweb{s}", _guarded(stow.store), methods=["POST"])]
    return routes


class BearerAuth:
    """ASGI middleware: authenticate ``/dicomweb`` requests on a non-loopback bind (see the module doc)."""

    def __init__(self, app: ASGIApp, cfg: WebConfig, authenticator: TokenAuthenticator, archive: Archive,
                 context: WebContext | None = None) -> None:
        self.app = app
        self.context = context
        self.required = not is_loopback(cfg.host)
        self.authenticator = authenticator
        self.archive = archive

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.required or not str(scope.get("path", "")).startswith("/dicomweb"):
            await self.app(scope, receive, send)
            return
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope.get("headers", [])]
        method = str(scope.get("method", "GET"))
        principal: Principal | None = None
        try:
            principal = self.authenticator.authenticate(headers)
            needed = "write" if method not in ("GET", "HEAD", "OPTIONS") else "read"
            if not principal.allows(needed):
                raise PermissionDenied(f"token {principal.name!r} has role {principal.role!r}; "
                                       f"{method} needs {needed!r}")
        except (Unauthenticated, PermissionDenied) as exc:
            self._audit_refusal(scope, principal, exc)
            response = error_response(exc, f"{method} {scope.get('path')}")
            await response(scope, receive, send)
            return
        scope.setdefault("state", {})["principal"] = principal
        await self.app(scope, receive, send)

    def close(self) -> None:
        """Release what the app holds (the context's thread pools) once the server has stopped."""
        if self.context is not None:
            self.context.close()

    def _audit_refusal(self, scope: Scope, principal: Principal | None, exc: VnaError) -> None:
        client = scope.get("client") or ("", 0)
        actor = Actor(principal.name if principal else "unknown", "token", f"{client[0]}:{client[1]}")
        try:
            self.archive.audit.record(USER_AUTHENTICATION, "E", actor, outcome=4, event_type=LOGIN,
                                      details={"reason": str(exc), "method": scope.get("method"),
                                               "path": scope.get("path")})
        except AuditUnavailable as aexc:
            log.error("refused DICOMweb request from %s not audited: %s", actor.address, aexc)


def build_app(archive: Archive, cfg: WebConfig, tokens: Any = ()) -> BearerAuth:
    """The whole web front-end over ``archive``'s services (``close()`` it after the server stopped)."""
    spool = archive.cfg.resolve("spool/web")  # emptied by `vna serve` before its workers start
    spool.mkdir(parents=True, exist_ok=True)
    routes = _routes()
    routes += viewer.routes(viewer.viewer_dir(cfg, archive.cfg))

    async def root(_request: Request) -> Response:
        return RedirectResponse("/viewer/", status_code=307)

    routes.append(Route("/", root, methods=["GET"]))
    app = Starlette(routes=routes)
    ctx = WebContext(archive, cfg, spool)
    app.state.vna = ctx
    return BearerAuth(app, cfg, TokenAuthenticator(tokens), archive, ctx)
