"""DICOM JSON (PS3.18 F.2): query rows and stored data sets, with BulkDataURIs for bulk data."""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Callable, Mapping

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import Tag

__all__ = ["keyword_tag", "vr_of", "row_json", "dataset_json", "BULK_VRS", "BULK_THRESHOLD"]

#: Binary VRs sent as BulkDataURI above :data:`BULK_THRESHOLD` bytes (InlineBinary below).
BULK_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
BULK_THRESHOLD = 1024

_INT_VRS = frozenset({"IS", "SL", "SS", "UL", "US", "SV", "UV"})
_EXTRA_VRS = {"ModalitiesInStudy": "CS", "InstanceAvailability": "CS"}


@lru_cache(maxsize=1024)
def keyword_tag(keyword: str) -> str:
    """The 8-hex-digit tag of a keyword (``"00100010"`` for PatientName); raises KeyError."""
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise KeyError(keyword)
    return f"{int(tag):08X}"


@lru_cache(maxsize=1024)
def vr_of(keyword: str) -> str:
    """The dictionary VR of a keyword."""
    if keyword in _EXTRA_VRS:
        return _EXTRA_VRS[keyword]
    return str(dictionary_VR(keyword))


def _values(vr: str, text: str) -> list[Any]:
    parts = text.split("\\")
    if vr == "PN":
        return [{"Alphabetic": p} for p in parts]
    if vr in _INT_VRS:
        return [int(float(p)) for p in parts if p.strip()]
    if vr in ("DS", "FL", "FD"):
        return [float(p) for p in parts if p.strip()]
    return parts


def row_json(row: Mapping[str, str]) -> dict[str, Any]:
    """A query answer (``keyword -> text``) as a DICOM JSON object; keys without a value are left out.

    (A value-less attribute is valid JSON, but viewers trip on some, e.g. an
    empty ModalitiesInStudy; leaving it out says the same.)
    """
    out: dict[str, Any] = {}
    for kw, text in row.items():
        if text is None or text.strip(" \x00") == "":
            continue
        try:
            tag, vr = keyword_tag(kw), vr_of(kw)
            values = _values(vr, text.strip(" \x00"))
        except (KeyError, ValueError):
            continue  # not a dictionary keyword, or a malformed number: nothing honest to send
        if values:
            out[tag] = {"vr": vr, "Value": values}
    return dict(sorted(out.items()))


def _paths(ds: Dataset, prefix: str, into: dict[int, str]) -> None:
    """Record the bulkdata path (``7FE00010``, ``00540016/0/00181072``...) of every element, by id."""
    for elem in ds:
        path = f"{prefix}{int(elem.tag):08X}"
        into[id(elem)] = path
        if elem.VR == "SQ" and isinstance(elem.value, DicomSequence):
            for i, item in enumerate(elem.value):
                _paths(item, f"{path}/{i}/", into)


def dataset_json(ds: Dataset, bulk_base: str, *, pixel_vr: str | None = None) -> dict[str, Any]:
    """A data set (read without its pixel data) as DICOM JSON; binary values over the threshold by URI.

    ``bulk_base``: the instance's ``.../bulkdata`` URL; an element's URI is the
    base plus its tag path. ``pixel_vr``: the stored Pixel Data had this VR
    (it is then listed with its BulkDataURI, though not read). Private
    elements are kept.
    """
    paths: dict[int, str] = {}
    _paths(ds, "", paths)
    handler: Callable[[DataElement], str] = lambda elem: f"{bulk_base}/{paths.get(id(elem), f'{int(elem.tag):08X}')}"
    out: dict[str, Any] = ds.to_json_dict(bulk_data_threshold=BULK_THRESHOLD, bulk_data_element_handler=handler)
    if pixel_vr is not None and "7FE00010" not in out:
        out["7FE00010"] = {"vr": pixel_vr, "BulkDataURI": f"{bulk_base}/7FE00010"}
    return out


def tag_path(path: str) -> list[int | Any]:
    """Parse a bulkdata tag path (``7FE00010`` or ``00540016/0/00181072``); raises ValueError."""
    parts = path.split("/")
    if len(parts) % 2 != 1:
        raise ValueError(f"bad bulkdata path {path!r}")
    out: list[int | Any] = []
    for i, p in enumerate(parts):
        if i % 2 == 0:
            if len(p) != 8:
                raise ValueError(f"bad tag {p!r}")
            out.append(Tag(int(p, 16)))
        else:
            out.append(int(p))
    return out
