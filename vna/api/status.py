"""The one table from vna errors to gRPC status codes (the gRPC twin of ``vna/dicom/status.py``).

Every RPC that fails on purpose fails through :func:`abort`: the code comes
from the first matching row of :data:`TABLE`, the details are the error's
message, and the trailing metadata key ``vna-error`` names the error class so
that clients (``vna.api.client``) can tell e.g. a quorum failure from an index
outage without parsing text. Errors outside the tree become ``INTERNAL`` with
a generic message (the traceback is logged, never sent).
"""

from __future__ import annotations

import logging
from typing import Any, NoReturn

import grpc

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

__all__ = ["TABLE", "ERROR_METADATA_KEY", "code_for", "abort"]

log = logging.getLogger(__name__)

#: Trailing-metadata key naming the vna error class of a failed call.
ERROR_METADATA_KEY = "vna-error"

#: First match wins: subclasses before their bases.
TABLE: list[tuple[type[VnaError], Any]] = [
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),      # no or unknown bearer token
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),   # the token's role does not allow the RPC
    (InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),        # bad DICOM, bad UID, bad request field
    (DuplicateConflict, grpc.StatusCode.ALREADY_EXISTS),     # same SOP Instance UID, other bytes (reject)
    (NotFound, grpc.StatusCode.NOT_FOUND),                   # unknown instance / study (BlobNotFound too)
    (LastVerifiedCopyLost, grpc.StatusCode.DATA_LOSS),       # no copy of the instance verifies
    (IntegrityError, grpc.StatusCode.DATA_LOSS),
    (StorageError, grpc.StatusCode.UNAVAILABLE),             # quorum not met, store down or full: retry
    (IndexUnavailable, grpc.StatusCode.UNAVAILABLE),         # the index cannot be reached: retry
    (AuditUnavailable, grpc.StatusCode.UNAVAILABLE),         # the audit trail refuses (policy "refuse"): retry
    (StateConflict, grpc.StatusCode.ABORTED),                # a concurrent change won: retry
    (LeaseHeld, grpc.StatusCode.ABORTED),                    # the job is already running
    (ConfigError, grpc.StatusCode.FAILED_PRECONDITION),      # the server is not configured for this
]


def code_for(exc: BaseException) -> Any:
    """The gRPC status code for an error (``INTERNAL`` outside the table)."""
    for cls, code in TABLE:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL


def abort(context: Any, exc: BaseException, what: str) -> NoReturn:
    """End the call with the status for ``exc`` (``context.abort`` raises); ``what`` names the call in the log."""
    code = code_for(exc)
    if isinstance(exc, VnaError):
        details = str(exc) or type(exc).__name__
        name = type(exc).__name__
        level = logging.ERROR if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.DATA_LOSS) else logging.WARNING
        log.log(level, "%s failed (%s): %s", what, code.name, details)
    else:
        details, name = "internal error", "InternalError"
        log.error("%s failed with an unexpected error", what, exc_info=exc)
    context.set_trailing_metadata(((ERROR_METADATA_KEY, name),))
    context.abort(code, details[:2000])
    raise AssertionError("context.abort returned")  # pragma: no cover  (it always raises)
