"""Records shared by every layer. Plain frozen dataclasses and enums only."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field

from vna.errors import InvalidUID

__all__ = [
    "Tier",
    "PlacementState",
    "BlobStat",
    "Placement",
    "InstanceRecord",
    "QueryLevel",
    "validate_uid",
    "UID_RE",
    "LOCAL_SITE",
    "site_of",
    "site_store_id",
]

#: A UID by PS3.5 9.1 (no leading zeros in a component); ``\Z``: a trailing newline is not a UID.
UID_RE = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*\Z")
_LENIENT_UID_RE = re.compile(r"[0-9]+(\.[0-9]+)*\Z")


def validate_uid(value: object, what: str, *, strict: bool = False) -> str:
    """Return ``value`` as a UID string or raise :class:`InvalidUID`.

    A UID is digits and dots, at most 64 characters (PS3.5 9.1). Leading zeros
    in components are tolerated unless ``strict`` (legacy data has them), since
    they are harmless in paths; anything else (``../``, spaces, letters) is not.
    """
    if value is None:
        raise InvalidUID(f"{what} is missing")
    uid = str(value).strip("\x00 ")
    if not uid:
        raise InvalidUID(f"{what} is empty")
    if len(uid) > 64:
        raise InvalidUID(f"{what} is longer than 64 characters ({len(uid)})")
    pattern = UID_RE if strict else _LENIENT_UID_RE
    if not pattern.match(uid):
        raise InvalidUID(f"{what} is not a valid UID: {uid[:80]!r}")
    return uid


#: The site of a store id without a site qualifier (a single-site archive).
LOCAL_SITE = "local"
_SITE_SEP = "@"


def site_store_id(name: str, site: str) -> str:
    """The store id recorded in placements: ``name@site`` (``hot-1@A``), or ``name`` for the local site.

    Every placement thereby names the site that holds it, with no schema
    change; ids of a single-site archive (``site_id = "local"``) stay as they were.
    """
    return name if site == LOCAL_SITE else f"{name}{_SITE_SEP}{site}"


def site_of(store_id: str) -> str:
    """The site holding a store: the part after ``@`` in ``hot-1@A``, :data:`LOCAL_SITE` when unqualified."""
    _, sep, site = store_id.rpartition(_SITE_SEP)
    return site if sep and site else LOCAL_SITE


class Tier(str, enum.Enum):
    """Where a copy lives; retrieve prefers them in this order."""

    CACHE = "cache"
    HOT = "hot"
    COLD = "cold"


class PlacementState(str, enum.Enum):
    """Life of one copy. PENDING -> OK -> TO_DELETE -> (purged); MISSING/CORRUPT found by checks."""

    PENDING = "PENDING"
    OK = "OK"
    TO_DELETE = "TO_DELETE"
    MISSING = "MISSING"
    CORRUPT = "CORRUPT"


class QueryLevel(str, enum.Enum):
    """DICOM Query/Retrieve levels."""

    PATIENT = "PATIENT"
    STUDY = "STUDY"
    SERIES = "SERIES"
    IMAGE = "IMAGE"


@dataclass(frozen=True)
class BlobStat:
    """What a blob store reports about one stored blob."""

    key: str
    size: int
    sha256: str | None = None
    modified: float | None = None  # last-modified time (epoch seconds) if the store knows it


@dataclass(frozen=True)
class Placement:
    """One copy of one instance version on one store.

    ``content_*`` describe the DICOM bytes as received; ``stored_*`` the bytes
    at rest (after the codec). For a cold bundle, ``offset``/``length`` locate
    the instance's frame inside the blob.
    """

    sop_uid: str
    version: int
    tier: Tier
    store_id: str
    blob_key: str
    codec: str
    content_sha256: str
    content_size: int
    stored_sha256: str
    stored_size: int
    state: PlacementState
    created_at: float
    verified_at: float | None = None
    offset: int | None = None
    length: int | None = None


@dataclass(frozen=True)
class InstanceRecord:
    """Catalogue attributes of one stored instance version (header only).

    ``attrs`` holds the DICOM keyword -> string value pairs that queries match
    on and return, at every level (patient, study, series, instance).
    """

    sop_uid: str
    series_uid: str
    study_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    version: int
    content_sha256: str
    content_size: int
    received_at: float
    source_ae: str
    attrs: dict[str, str] = field(default_factory=dict)
