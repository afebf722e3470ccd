"""Bearer-token authentication and role checks for the gRPC server.

Every call carries ``authorization: Bearer <token>``. Tokens come from the
config (``[[grpc.token]]`` with ``name``, ``token``, ``role``); a token's role
is ``read`` or ``write`` (write includes read). :data:`METHOD_ROLES` names the
least role of every RPC; a method missing from it needs ``write`` (deny by
default). Health checks (:data:`PUBLIC_PREFIXES`) need no token, so that load
balancers can probe. Secrets are compared in constant time (SHA-256 digests,
``hmac.compare_digest`` against every configured token) and never logged.

A refused call ends with UNAUTHENTICATED (no or unknown token) or
PERMISSION_DENIED (the role is too low) through the status table
(``vna/api/status.py``), before the servicer runs.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from vna.audit import LOGIN, USER_AUTHENTICATION, Actor, AuditLog
from vna.config import GrpcToken
from vna.errors import AuditUnavailable, VnaError

log = logging.getLogger(__name__)

__all__ = [
    "ROLES", "METHOD_ROLES", "PUBLIC_PREFIXES", "Unauthenticated", "PermissionDenied",
    "Principal", "TokenAuthenticator", "AuthInterceptor", "current_principal", "handler_kind",
]

#: Roles, weakest first; a role allows everything the ones before it allow.
ROLES: tuple[str, ...] = ("read", "write")

#: Least role per RPC (full method name).
METHOD_ROLES: dict[str, str] = {
    "/vna.v1.Archive/Store": "write",
    "/vna.v1.Archive/Retrieve": "read",
    "/vna.v1.Archive/Query": "read",
    "/vna.v1.Archive/GetStudyMetadata": "read",
    "/vna.v1.Lifecycle/Plan": "read",
    "/vna.v1.Lifecycle/Run": "write",
    "/vna.v1.Lifecycle/GetStatus": "read",
    "/vna.v1.Lifecycle/SetHold": "write",
    "/vna.v1.Integrity/Scrub": "write",
    "/vna.v1.Integrity/GetReport": "read",
}

#: Methods callable without a token.
PUBLIC_PREFIXES: tuple[str, ...] = ("/grpc.health.v1.Health/",)


class Unauthenticated(VnaError):
    """The call carries no bearer token, or one the server does not know (gRPC UNAUTHENTICATED)."""


class PermissionDenied(VnaError):
    """The caller's role does not allow the RPC (gRPC PERMISSION_DENIED)."""


@dataclass(frozen=True)
class Principal:
    """Who is calling: the configured token's name and role (never the secret)."""

    name: str
    role: str

    def allows(self, role: str) -> bool:
        """True if this principal's role includes ``role``."""
        return ROLES.index(self.role) >= ROLES.index(role)


_current: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("vna_grpc_principal", default=None)


def current_principal() -> Principal | None:
    """The authenticated caller of the RPC running in this thread (None in public methods)."""
    return _current.get()


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8")).digest()


class TokenAuthenticator:
    """Maps bearer tokens to principals and checks roles against :data:`METHOD_ROLES`."""

    def __init__(self, tokens: Sequence[GrpcToken]) -> None:
        self._tokens = [(_digest(t.token), Principal(t.name, t.role)) for t in tokens]

    def authenticate(self, metadata: Sequence[tuple[str, Any]]) -> Principal:
        """The principal of the ``authorization`` metadata; raises Unauthenticated."""
        values = [v for k, v in metadata if k.lower() == "authorization"]
        if not values:
            raise Unauthenticated("missing bearer token (metadata 'authorization: Bearer <token>')")
        value = values[0].decode("latin-1") if isinstance(values[0], bytes) else str(values[0])
        scheme, _, secret = value.strip().partition(" ")
        if scheme.lower() != "bearer" or not secret.strip():
            raise Unauthenticated("the authorization metadata must be 'Bearer <token>'")
        offered = _digest(secret.strip())
        found: Principal | None = None
        for digest, principal in self._tokens:  # no early exit: the time does not tell which token matched
            if hmac.compare_digest(digest, offered) and found is None:
                found = principal
        if found is None:
            raise Unauthenticated("unknown bearer token")
        return found

    @staticmethod
    def authorize(principal: Principal, method: str) -> None:
        """Raise PermissionDenied unless ``principal`` may call ``method``."""
        needed = METHOD_ROLES.get(method, "write")
        if not principal.allows(needed):
            raise PermissionDenied(f"token {principal.name!r} has role {principal.role!r}; "
                                   f"{method.rsplit('/', 1)[-1]} needs {needed!r}")


def handler_kind(handler: Any) -> str:
    """The attribute of a ``grpc.RpcMethodHandler`` that holds its behaviour (``unary_unary``...)."""
    return ("stream" if handler.request_streaming else "unary") + "_" + \
           ("stream" if handler.response_streaming else "unary")


def _refusal(handler: Any, method: str, exc: VnaError, on_refuse: Callable[[Any], None]) -> Any:
    """A handler of the same shape as ``handler`` that ends the call with ``exc``'s status."""
    from vna.api.status import abort

    def deny(_request: Any, context: Any) -> Any:
        on_refuse(context)
        abort(context, exc, method)

    return handler._replace(**{handler_kind(handler): deny})


def _with_principal(handler: Any, principal: Principal) -> Any:
    """The handler, its behaviour run with ``principal`` as :func:`current_principal`."""
    kind = handler_kind(handler)
    behaviour: Callable[..., Any] = getattr(handler, kind)

    def run(request: Any, context: Any) -> Any:
        _current.set(principal)  # each pool thread sets it before every authenticated call
        return behaviour(request, context)

    return handler._replace(**{kind: run})


class AuthInterceptor:
    """A ``grpc.ServerInterceptor`` (duck-typed): authenticate, authorize, then run the handler.

    Refused calls are recorded in ``audit`` (User Authentication, failure) with the
    peer's address and the reason.
    """

    def __init__(self, authenticator: TokenAuthenticator, audit: AuditLog | None = None) -> None:
        self.authenticator = authenticator
        self.audit = audit

    def intercept_service(self, continuation: Callable[[Any], Any], handler_call_details: Any) -> Any:
        handler = continuation(handler_call_details)
        method = str(handler_call_details.method)
        if handler is None or method.startswith(PUBLIC_PREFIXES):
            return handler
        principal: Principal | None = None
        try:
            principal = self.authenticator.authenticate(handler_call_details.invocation_metadata or ())
            self.authenticator.authorize(principal, method)
        except (Unauthenticated, PermissionDenied) as exc:
            return _refusal(handler, method, exc, self._audited(method, principal, exc))
        return _with_principal(handler, principal)

    def _audited(self, method: str, principal: Principal | None, exc: VnaError) -> Callable[[Any], None]:
        """What to do, at call time (the peer is known then), with a refused call: an audit record."""
        def record(context: Any) -> None:
            if self.audit is None:
                return
            actor = Actor(principal.name if principal else "unknown", "token", str(context.peer() or ""))
            try:
                self.audit.record(USER_AUTHENTICATION, "E", actor, outcome=4, event_type=LOGIN,
                                  details={"reason": str(exc), "method": method})
            except AuditUnavailable as aexc:
                log.error("refused gRPC call from %s not audited: %s", actor.address, aexc)
        return record
