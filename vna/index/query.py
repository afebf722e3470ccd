"""DICOM C-FIND matching (PS3.4 C.2.2.2) — the one implementation every index uses.

Adapters push down what their store can serve as a *superset* pre-filter and
then call :func:`matches_all` on each candidate row, so the semantics are the
same on every backend. Rows are ``keyword -> str`` mappings.

Supported: universal (empty value or ``*``), single value, wildcard (``*``,
``?``), range for DA/TM/DT (``a-b``, ``a-``, ``-b``), list of UIDs (``\\``),
multi-valued stored attributes (``ModalitiesInStudy``). PN matching is
case-insensitive (``make_condition(..., pn_case_insensitive=False)`` for exact). A stored empty value matches
only universal matching.

Patient identity (``docs/patient-identity.md``): a patient is the pair
(PatientID, IssuerOfPatientID). A study also carries the identities its
objects list in Other Patient IDs Sequence (row key :data:`OTHER_IDS_KEY`).
Conditions on PatientID and IssuerOfPatientID are matched *jointly* against
each identity of the row, the primary one and the others: the row matches if
one identity satisfies all of them. Answers carry the primary identity.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable, Mapping

from pydicom.datadict import dictionary_VR

from vna.domain import QueryLevel

__all__ = [
    "MatchKind",
    "Condition",
    "LEVEL_KEYS",
    "COMPUTED_KEYS",
    "UNIQUE_KEY",
    "keys_for_level",
    "make_condition",
    "matches",
    "matches_all",
    "matches_primary_identity",
    "normalise_time",
    "OTHER_IDS_KEY",
    "ISSUER_ASSIGNED_KEY",
    "IDENTITY_KEYS",
    "MAX_OTHER_IDS",
    "merge_other_ids",
    "audit_patient_id",
    "encode_other_ids",
    "decode_other_ids",
    "identities",
]

#: Row key (not a DICOM keyword) of a study's Other Patient IDs: see :func:`encode_other_ids`.
OTHER_IDS_KEY = "other_patient_ids"
#: Catalogue attribute (not a DICOM keyword) present, "Y", when ingest assigned the IssuerOfPatientID
#: from configuration because the object carried none (the stored bytes are as received).
ISSUER_ASSIGNED_KEY = "issuer_of_patient_id_assigned"
#: The keys matched jointly against each identity of a row.
IDENTITY_KEYS = frozenset({"PatientID", "IssuerOfPatientID"})
#: Other Patient IDs kept per instance (more are ignored: a peer cannot make a row grow without bound).
MAX_OTHER_IDS = 32

#: Attributes the index records, per level.
LEVEL_KEYS: dict[QueryLevel, tuple[str, ...]] = {
    QueryLevel.PATIENT: ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex"),
    QueryLevel.STUDY: (
        "StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber", "StudyID",
        "StudyDescription", "ReferringPhysicianName",
    ),
    QueryLevel.SERIES: (
        "SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription",
        "BodyPartExamined", "SeriesDate", "SeriesTime",
    ),
    QueryLevel.IMAGE: (
        "SOPInstanceUID", "SOPClassUID", "InstanceNumber", "ContentDate", "ContentTime",
        "NumberOfFrames", "Rows", "Columns",
    ),
}

#: Attributes computed by the index at query time, per level.
COMPUTED_KEYS: dict[QueryLevel, tuple[str, ...]] = {
    QueryLevel.PATIENT: (
        "NumberOfPatientRelatedStudies", "NumberOfPatientRelatedSeries", "NumberOfPatientRelatedInstances",
    ),
    QueryLevel.STUDY: ("ModalitiesInStudy", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances", "InstanceAvailability"),
    QueryLevel.SERIES: ("NumberOfSeriesRelatedInstances", "InstanceAvailability"),
    QueryLevel.IMAGE: ("InstanceAvailability", "AvailableTransferSyntaxUID"),
}

UNIQUE_KEY: dict[QueryLevel, str] = {
    QueryLevel.PATIENT: "PatientID",
    QueryLevel.STUDY: "StudyInstanceUID",
    QueryLevel.SERIES: "SeriesInstanceUID",
    QueryLevel.IMAGE: "SOPInstanceUID",
}

_ORDER = [QueryLevel.PATIENT, QueryLevel.STUDY, QueryLevel.SERIES, QueryLevel.IMAGE]

#: Attributes whose stored value may hold several values separated by ``\``.
MULTI_VALUED = frozenset({"ModalitiesInStudy"})


def keys_for_level(level: QueryLevel) -> tuple[str, ...]:
    """Every stored and computed key visible at ``level`` (its own and the levels above)."""
    keys: list[str] = []
    for lv in _ORDER[: _ORDER.index(level) + 1]:
        keys.extend(LEVEL_KEYS[lv])
    keys.extend(COMPUTED_KEYS[level])
    return tuple(keys)


class MatchKind(str, enum.Enum):
    """The kind of matching a condition needs."""

    SINGLE = "single"
    WILDCARD = "wildcard"
    RANGE = "range"
    LIST = "list"


@dataclass(frozen=True)
class Condition:
    """One non-universal matching key.

    ``values`` holds the single value, the wildcard pattern, the list items, or
    the (low, high) range bounds (``""`` for an open end).
    """

    keyword: str
    vr: str
    kind: MatchKind
    values: tuple[str, ...]
    case_insensitive: bool = False


@lru_cache(maxsize=512)
def _vr(keyword: str) -> str:
    if keyword == "ModalitiesInStudy":
        return "CS"
    try:
        return str(dictionary_VR(keyword))
    except KeyError:
        return "LO"


def make_condition(keyword: str, raw: str, *, pn_case_insensitive: bool = True) -> Condition | None:
    """Turn one identifier value into a Condition; None means universal matching."""
    value = raw.strip(" \x00")
    if value == "" or set(value) == {"*"}:
        return None
    vr = _vr(keyword)
    ci = vr == "PN" and pn_case_insensitive
    if vr in ("DA", "TM", "DT") and "-" in value and not (vr == "DT" and _dt_has_only_tz_dash(value)):
        low, _, high = value.partition("-")
        return Condition(keyword, vr, MatchKind.RANGE, (low.strip(), high.strip()), ci)
    if "\\" in value and (vr in ("UI", "CS", "LO", "SH", "DA", "AE") or keyword in MULTI_VALUED):
        items = tuple(v.strip() for v in value.split("\\") if v.strip())
        return Condition(keyword, vr, MatchKind.LIST, items, ci)
    if vr not in ("UI", "DA", "TM", "DT") and ("*" in value or "?" in value):
        return Condition(keyword, vr, MatchKind.WILDCARD, (value,), ci)
    return Condition(keyword, vr, MatchKind.SINGLE, (value,), ci)


def _dt_has_only_tz_dash(value: str) -> bool:
    # "20200101120000-0500" is a DT with a timezone offset, not a range
    return bool(re.fullmatch(r"\d{4,14}(\.\d{1,6})?-\d{4}", value))


@lru_cache(maxsize=1024)
def _wildcard_re(pattern: str, ci: bool) -> re.Pattern[str]:
    out = []
    for ch in pattern:
        if ch == "*":
            out.append(".*")
        elif ch == "?":
            out.append(".")
        else:
            out.append(re.escape(ch))
    return re.compile("".join(out), re.DOTALL | (re.IGNORECASE if ci else 0))


def normalise_time(value: str) -> str:
    """TM as ``HHMMSS.ffffff`` with missing parts zero-filled (``"0930"`` -> ``"093000.000000"``)."""
    v = value.replace(":", "").strip()
    main, _, frac = v.partition(".")
    main = (main + "000000")[:6]
    return f"{main}.{(frac + '000000')[:6]}"


def _tm_upper(value: str) -> str:
    """Upper range bound: an unstated part is its maximum ("1230" -> "123059.999999")."""
    main, _, frac = value.replace(":", "").strip().partition(".")
    return f"{(main + '5959')[:6]}.{(frac + '999999')[:6]}"


def _norm_dt(value: str) -> str:
    v = value.strip()
    m = re.match(r"^(\d{4,14})(\.\d{1,6})?([+-]\d{4})?$", v)
    if not m:
        return v
    digits = (m.group(1) + "0101000000")[:14] if len(m.group(1)) < 8 else (m.group(1) + "000000")[:14]
    frac = (m.group(2) or ".")[1:]
    return digits + "." + (frac + "000000")[:6]


def _range_key(vr: str, value: str) -> str:
    if vr == "TM":
        return normalise_time(value)
    if vr == "DT":
        return _norm_dt(value)
    return value.replace(".", "").strip()  # DA; tolerate legacy "2020.01.01"


def _single(cond: Condition, stored: str) -> bool:
    want = cond.values[0]
    if cond.vr == "TM":
        return normalise_time(stored) == normalise_time(want)
    if cond.vr in ("IS", "US", "SS", "UL", "SL"):
        try:
            return int(stored) == int(want)
        except ValueError:
            return stored == want
    if cond.vr == "DS":
        try:
            return float(stored) == float(want)
        except ValueError:
            return stored == want
    if cond.case_insensitive:
        return stored.casefold() == want.casefold()
    return stored == want


def _match_one(cond: Condition, stored: str) -> bool:
    if cond.kind is MatchKind.SINGLE:
        return _single(cond, stored)
    if cond.kind is MatchKind.WILDCARD:
        return _wildcard_re(cond.values[0], cond.case_insensitive).fullmatch(stored) is not None
    if cond.kind is MatchKind.LIST:
        return any(_single(Condition(cond.keyword, cond.vr, MatchKind.SINGLE, (v,), cond.case_insensitive), stored)
                   for v in cond.values)
    low, high = cond.values
    key = _range_key(cond.vr, stored)
    if low and key < _range_key(cond.vr, low):
        return False
    if high:
        hk = _tm_upper(high) if cond.vr == "TM" else _range_key(cond.vr, high)
        if key > hk:
            return False
    return True


def matches(cond: Condition, stored: str | None) -> bool:
    """True if the stored value satisfies the condition (empty stored values never do)."""
    if stored is None:
        return False
    stored = stored.strip(" \x00")
    if stored == "":
        return False
    if cond.keyword in MULTI_VALUED:
        return any(_match_one(cond, v) for v in stored.split("\\") if v)
    return _match_one(cond, stored)


def encode_other_ids(pairs: Iterable[tuple[str, str]]) -> str:
    """The stored form of (PatientID, IssuerOfPatientID) pairs: ``id<TAB>issuer`` items, sorted, unique,
    joined by newlines (LO values hold neither character). Pairs without a PatientID are dropped."""
    items = {f"{pid}\t{issuer}" for pid, issuer in pairs if pid}
    return "\n".join(sorted(items))


def decode_other_ids(value: str | None) -> list[tuple[str, str]]:
    """The pairs of :func:`encode_other_ids` (also accepts unsorted, repeated items)."""
    out: list[tuple[str, str]] = []
    for item in (value or "").split("\n"):
        pid, _, issuer = item.partition("\t")
        if pid:
            out.append((pid, issuer))
    return out


def audit_patient_id(patient_id: str, issuer: str | None) -> str:
    """How the audit trail names a patient: the PatientID, as ``ID^^^Issuer`` (HL7 CX, assigning
    authority in component 4) when it has an issuer, so two domains' "12345" are told apart."""
    return f"{patient_id}^^^{issuer}" if patient_id and issuer else patient_id


def merge_other_ids(stored: str | None, new: str | None) -> str:
    """The union of two encoded sets of Other Patient IDs (:func:`encode_other_ids`), bounded: the stored
    items are kept and new ones added while fewer than :data:`MAX_OTHER_IDS` are held."""
    held = dict.fromkeys(decode_other_ids(stored))
    for pair in decode_other_ids(new):
        if len(held) >= MAX_OTHER_IDS:
            break
        held.setdefault(pair)
    return encode_other_ids(held)


def identities(row: Mapping[str, str | None]) -> list[tuple[str | None, str | None]]:
    """Every identity of a row: its primary (PatientID, IssuerOfPatientID), then its other ones."""
    out: list[tuple[str | None, str | None]] = [(row.get("PatientID"), row.get("IssuerOfPatientID"))]
    out.extend(decode_other_ids(row.get(OTHER_IDS_KEY)))
    return out


def matches_primary_identity(conditions: Iterable[Condition], row: Mapping[str, str | None]) -> bool:
    """True if the row's primary identity (its PatientID and IssuerOfPatientID) satisfies every identity
    condition; other conditions are ignored. The retrieve rule: a C-MOVE/C-GET by PatientID never follows
    Other Patient IDs (docs/patient-identity.md)."""
    return all(matches(c, row.get(c.keyword)) for c in conditions if c.keyword in IDENTITY_KEYS)


def matches_all(conditions: Iterable[Condition], row: Mapping[str, str | None]) -> bool:
    """True if the row satisfies every condition (identity conditions jointly, see the module docstring)."""
    ident: list[Condition] = []
    for c in conditions:
        if c.keyword in IDENTITY_KEYS:
            ident.append(c)
        elif not matches(c, row.get(c.keyword)):
            return False
    if not ident:
        return True
    return any(all(matches(c, pid if c.keyword == "PatientID" else issuer) for c in ident)
               for pid, issuer in identities(row))
