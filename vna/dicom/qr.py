"""Query/Retrieve identifiers for both DIMSE receivers: level and keys of a request, a C-FIND match's
response identifier."""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword

from vna.domain import QueryLevel
from vna.errors import InvalidInput
from vna.services.retrieve import InstanceRef

__all__ = ["PATIENT_ROOT", "UNIQUE_KEYS", "identifier_map", "move_contexts", "query_level", "response"]

#: the Patient Root FIND, MOVE and GET information models
PATIENT_ROOT = frozenset({"1.2.840.10008.5.1.4.1.2.1.1", "1.2.840.10008.5.1.4.1.2.1.2", "1.2.840.10008.5.1.4.1.2.1.3"})
UNIQUE_KEYS = {"PatientID", "IssuerOfPatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"}
SKIP_KEYS = {"QueryRetrieveLevel", "SpecificCharacterSet", "TimezoneOffsetFromUTC"}
ECHOED_KEYS = ("TimezoneOffsetFromUTC",)


def query_level(ds: Dataset, model: str) -> QueryLevel:
    """The request's QueryRetrieveLevel. Raises InvalidInput when it is not PATIENT/STUDY/SERIES/IMAGE or
    PATIENT is asked of a Study Root ``model``."""
    level = str(ds.get("QueryRetrieveLevel", "")).strip().upper()
    try:
        qlevel = QueryLevel(level)
    except ValueError:
        raise InvalidInput(f"QueryRetrieveLevel {level!r} is not PATIENT/STUDY/SERIES/IMAGE") from None
    if qlevel is QueryLevel.PATIENT and model not in PATIENT_ROOT:
        raise InvalidInput("PATIENT level needs the Patient Root information model")
    return qlevel


def identifier_map(ds: Dataset) -> dict[str, str]:
    """The identifier's keys as ``keyword -> value`` strings (sequences and empty values as "")."""
    out: dict[str, str] = {}
    for elem in ds:
        kw = elem.keyword or keyword_for_tag(elem.tag)
        if not kw or kw in SKIP_KEYS or elem.tag.group in (0x0000, 0x0002):
            continue
        if elem.VR == "SQ":
            out[kw] = ""
            continue
        value = elem.value
        if value is None:
            out[kw] = ""
        elif isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
            out[kw] = "\\".join(str(v) for v in value)
        else:
            out[kw] = str(value)
    return out


def response(level: str, row: dict[str, str], requested: Dataset) -> Dataset:
    """The C-FIND response identifier of one match, in the VRs of the request."""
    rsp = Dataset()
    rsp.QueryRetrieveLevel = level
    non_ascii = False
    for kw, value in row.items():
        tag = tag_for_keyword(kw)
        if tag is None:
            continue
        vr = requested[tag].VR if tag in requested else dictionary_VR(tag)
        if vr == "SQ":
            rsp.add_new(tag, "SQ", [])
            continue
        if vr in ("US", "SS", "UL", "SL", "FL", "FD"):
            try:
                rsp.add_new(tag, vr, int(value) if vr not in ("FL", "FD") else float(value))
            except ValueError:
                rsp.add_new(tag, vr, None)
            continue
        if vr in ("IS", "DS") and value == "":
            rsp.add_new(tag, vr, None)
            continue
        if not value.isascii():
            non_ascii = True
        rsp.add_new(tag, vr, value.split("\\") if "\\" in value and vr not in ("LT", "ST", "UT") else value)
    for kw in ECHOED_KEYS:  # PS3.4 C.4.1.1.3.2: returned as sent
        if kw in requested:
            rsp.add(requested[kw])
    if non_ascii or "SpecificCharacterSet" in requested:
        rsp.SpecificCharacterSet = "ISO_IR 192"
    return rsp


def move_contexts(refs: list[InstanceRef]) -> list[tuple[str, list[str]]]:
    """Storage contexts for a C-MOVE sub-association: one per (SOP class, stored transfer syntax), so a
    compressed instance is never negotiated down to a syntax it cannot be sent in; little-endian
    uncompressed syntaxes also offer the other one; at most 128."""
    seen: set[tuple[str, str]] = set()
    out: list[tuple[str, list[str]]] = []
    explicit, implicit = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"
    for r in refs:
        if (r.sop_class_uid, r.transfer_syntax_uid) in seen:
            continue
        seen.add((r.sop_class_uid, r.transfer_syntax_uid))
        syntaxes = [r.transfer_syntax_uid]
        if r.transfer_syntax_uid in (explicit, implicit):
            syntaxes += [ts for ts in (explicit, implicit) if ts not in syntaxes]
        out.append((r.sop_class_uid, syntaxes))
    return out[:128]
