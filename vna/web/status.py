"""The one table from vna errors to HTTP status codes (the twin of ``vna/dicom/status.py`` and ``vna/api/status.py``).

Every DICOMweb request that fails on purpose fails through :func:`error_response`:
the status comes from the first matching row of :data:`TABLE`, the body is the
error's message (``text/plain``). Errors outside the tree become 500 with a
generic message (the traceback is logged, never sent).
"""

from __future__ import annotations

import logging

from starlette.responses import PlainTextResponse, Response

from vna.api.auth import PermissionDenied, Unauthenticated
from vna.errors import (
    AuditUnavailable,
    ConfigError,
    DuplicateConflict,
    IndexUnavailable,
    IntegrityError,
    InvalidInput,
    LastVerifiedCopyLost,
    LeaseHeld,
    NotFound,
    StateConflict,
    StorageError,
    VnaError,
)

__all__ = ["NotAcceptable", "UnsupportedMediaType", "BodyTooLarge", "TABLE", "http_status_for", "error_response"]

log = logging.getLogger(__name__)


class NotAcceptable(InvalidInput):
    """No representation the client accepts can be produced (HTTP 406)."""


class UnsupportedMediaType(InvalidInput):
    """The request body is not of a media type the resource takes (HTTP 415)."""


class BodyTooLarge(InvalidInput):
    """The request body is larger than ``web.max_body_bytes`` (HTTP 413)."""


#: First match wins: subclasses before their bases.
TABLE: list[tuple[type[VnaError], int]] = [
    (Unauthenticated, 401),          # no or unknown bearer token
    (PermissionDenied, 403),         # the token's role does not allow the request
    (NotAcceptable, 406),
    (UnsupportedMediaType, 415),
    (BodyTooLarge, 413),
    (InvalidInput, 400),             # bad parameter, bad multipart, bad DICOM, bad UID
    (DuplicateConflict, 409),        # same SOP Instance UID, other bytes (policy reject)
    (NotFound, 404),                 # unknown study / series / instance / frame
    (LastVerifiedCopyLost, 500),     # no copy of the instance verifies
    (IntegrityError, 500),
    (StorageError, 503),             # quorum not met, store or site down: retry
    (IndexUnavailable, 503),
    (AuditUnavailable, 503),         # the audit trail refuses (policy "refuse"): retry
    (StateConflict, 409),
    (LeaseHeld, 409),
    (ConfigError, 503),              # the server is not configured for this
]


def http_status_for(exc: BaseException) -> int:
    """The HTTP status for an error (500 outside the table)."""
    for cls, status in TABLE:
        if isinstance(exc, cls):
            return status
    return 500


def error_response(exc: BaseException, what: str) -> Response:
    """The response for a failed request; ``what`` names the request in the log."""
    status = http_status_for(exc)
    headers = {"WWW-Authenticate": 'Bearer realm="vna"'} if status == 401 else None
    if isinstance(exc, VnaError):
        message = str(exc) or type(exc).__name__
        log.log(logging.ERROR if status >= 500 else logging.WARNING, "%s failed (%d): %s", what, status, message)
    else:
        message = "internal error"
        log.error("%s failed with an unexpected error", what, exc_info=exc)
    return PlainTextResponse(message[:2000] + "\n", status_code=status, headers=headers)
