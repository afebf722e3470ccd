"""The one table from vna errors to DIMSE status codes (PS3.4 / PS3.7 Annex C)."""

from __future__ import annotations

from vna.errors import (
    AuditUnavailable,
    DuplicateConflict,
    IndexUnavailable,
    InvalidDataset,
    InvalidInput,
    InvalidUID,
    NotFound,
    StorageError,
    VnaError,
)

__all__ = [
    "SUCCESS", "PENDING", "CANCEL", "OUT_OF_RESOURCES", "CANNOT_UNDERSTAND", "INVALID_UID",
    "DUPLICATE_SOP_INSTANCE", "IDENTIFIER_MISMATCH", "MOVE_DESTINATION_UNKNOWN",
    "SUBOPS_FAILED", "UNABLE_TO_PROCESS", "status_for",
]

SUCCESS = 0x0000
PENDING = 0xFF00
CANCEL = 0xFE00
OUT_OF_RESOURCES = 0xA700          # storage / index unavailable, quorum not met: retry later
CANNOT_UNDERSTAND = 0xC000         # dataset unparsable or inconsistent with the request
INVALID_UID = 0xC0E1               # a UID is missing, malformed or unsafe (vna-specific 0xCxxx)
DUPLICATE_SOP_INSTANCE = 0x0111    # same SOP Instance UID, different bytes, policy reject (as dcm4chee)
IDENTIFIER_MISMATCH = 0xA900       # C-FIND/MOVE/GET identifier does not match the SOP class
MOVE_DESTINATION_UNKNOWN = 0xA801
SUBOPS_FAILED = 0xA702             # C-MOVE/C-GET: out of resources, unable to perform sub-operations
UNABLE_TO_PROCESS = 0xC0FF         # internal error (distinct from pynetdicom's own 0xC2xx/0xC3xx)

_TABLE: list[tuple[type[VnaError], int]] = [
    (InvalidUID, INVALID_UID),
    (InvalidDataset, CANNOT_UNDERSTAND),
    (InvalidInput, CANNOT_UNDERSTAND),
    (DuplicateConflict, DUPLICATE_SOP_INSTANCE),
    (StorageError, OUT_OF_RESOURCES),
    (IndexUnavailable, OUT_OF_RESOURCES),
    (AuditUnavailable, OUT_OF_RESOURCES),
    (NotFound, CANNOT_UNDERSTAND),
]


def status_for(exc: VnaError) -> int:
    """The DIMSE failure status for an error (first matching row of the table)."""
    for cls, status in _TABLE:
        if isinstance(exc, cls):
            return status
    return UNABLE_TO_PROCESS
