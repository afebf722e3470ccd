"""The one exception tree of vna.

Every error vna raises on purpose derives from :class:`VnaError`. Foreign
library errors (sqlite3, cassandra, botocore, pynetdicom, OSError) are mapped
into this tree at the adapter boundary; front-ends map the tree to protocol
statuses through one table each (``vna/dicom/status.py``).

::

    VnaError
    ├── ConfigError                 bad or inconsistent configuration
    ├── InvalidInput                the caller sent something unusable
    │   ├── InvalidUID              missing / malformed / unsafe UID
    │   └── InvalidDataset          unparsable or inconsistent DICOM
    ├── DuplicateConflict           same SOP Instance UID, different bytes (reject policy)
    ├── NotFound                    no such instance / blob / remote AE
    ├── StorageError                a blob store failed
    │   ├── BlobExists              create-new put hit an existing key
    │   ├── BlobNotFound            the key is absent
    │   ├── StorageUnavailable      the store cannot be reached / written
    │   ├── QuorumNotMet            fewer than W replicas took a write
    │   └── SiteUnavailable         another site of the federation cannot be reached
    ├── AuditUnavailable            the audit trail cannot be written (operation refused)
    ├── IntegrityError              bytes do not hash to the recorded digest
    │   └── LastVerifiedCopyLost    no verified copy of an instance remains
    └── IndexError_                 the index failed
        ├── IndexUnavailable        the index cannot be reached / written
        ├── StateConflict           a compare-and-set transition lost
        └── LeaseHeld               another worker holds the lease
"""

from __future__ import annotations

__all__ = [
    "VnaError",
    "ConfigError",
    "InvalidInput",
    "InvalidUID",
    "InvalidDataset",
    "DuplicateConflict",
    "NotFound",
    "StorageError",
    "BlobExists",
    "BlobNotFound",
    "StorageUnavailable",
    "QuorumNotMet",
    "SiteUnavailable",
    "AuditUnavailable",
    "IntegrityError",
    "LastVerifiedCopyLost",
    "IndexError_",
    "IndexUnavailable",
    "StateConflict",
    "LeaseHeld",
]


class VnaError(Exception):
    """Base of every error vna raises on purpose."""


class ConfigError(VnaError):
    """The configuration is invalid (CLI exit code 2)."""


class InvalidInput(VnaError):
    """The caller sent something the archive cannot accept."""


class InvalidUID(InvalidInput):
    """A UID is missing, malformed (not digits and dots) or longer than 64 chars."""


class InvalidDataset(InvalidInput):
    """A dataset cannot be parsed or contradicts its command (e.g. SOP class)."""


class DuplicateConflict(VnaError):
    """The SOP Instance UID is stored with different bytes and policy is reject."""


class NotFound(VnaError):
    """The requested object does not exist."""


class StorageError(VnaError):
    """A blob store operation failed."""


class BlobExists(StorageError):
    """A create-new put found the key already present."""


class BlobNotFound(StorageError, NotFound):
    """The blob key is absent from the store."""


class StorageUnavailable(StorageError):
    """The store cannot be read or written (I/O error, full, read-only, down)."""


class QuorumNotMet(StorageError):
    """Fewer than the required number of replicas accepted a write."""


class SiteUnavailable(StorageError):
    """Another site of the federation cannot be reached (its gRPC front-end is down or cut off)."""


class AuditUnavailable(VnaError):
    """The audit trail cannot be written and policy refuses service (DIMSE: out of resources)."""


class IntegrityError(VnaError):
    """Bytes read back do not match their recorded digest or size."""


class LastVerifiedCopyLost(IntegrityError):
    """No verified copy of an instance is left; nothing may be touched."""


class IndexError_(VnaError):
    """The index failed (named with a trailing underscore to avoid the builtin)."""


class IndexUnavailable(IndexError_):
    """The index cannot be reached or written."""


class StateConflict(IndexError_):
    """A compare-and-set transition found a different current state."""


class LeaseHeld(IndexError_):
    """A job lease is held by another owner."""
