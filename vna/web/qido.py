"""QIDO-RS (PS3.18 10.6): search for studies, series and instances through the QueryService.

The matching is C-FIND's (one implementation, :mod:`vna.index.query`): a
QIDO query is turned into the same ``keyword -> value`` identifier a C-FIND
carries. Attributes the archive does not record are neither matched (a
``Warning: 299`` header names them) nor returned; ``fuzzymatching=true`` is
answered with literal matching and a ``Warning: 299`` saying so.
"""

from __future__ import annotations

import json
import re
from typing import Any

from pydicom.datadict import keyword_for_tag
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from vna.domain import QueryLevel
from vna.errors import InvalidInput
from vna.index.query import keys_for_level
from vna.web.context import actor_of, ctx_of, uid_param
from vna.web.dicomjson import row_json
from vna.web.media import parse_accept

__all__ = ["search", "DEFAULT_KEYS"]

#: Returned without asking (PS3.18 Table 10.6.3-3..5, those the archive records).
DEFAULT_KEYS: dict[QueryLevel, tuple[str, ...]] = {
    QueryLevel.STUDY: (
        "StudyDate", "StudyTime", "AccessionNumber", "InstanceAvailability", "ModalitiesInStudy",
        "ReferringPhysicianName", "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
        "StudyInstanceUID", "StudyID", "StudyDescription", "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances", "RetrieveAETitle",
    ),
    QueryLevel.SERIES: (
        "Modality", "SeriesDescription", "SeriesNumber", "SeriesInstanceUID", "NumberOfSeriesRelatedInstances",
        "SeriesDate", "SeriesTime", "StudyInstanceUID", "InstanceAvailability", "RetrieveAETitle",
    ),
    QueryLevel.IMAGE: (
        "SOPClassUID", "SOPInstanceUID", "InstanceAvailability", "InstanceNumber", "Rows", "Columns",
        "NumberOfFrames", "SeriesInstanceUID", "StudyInstanceUID", "RetrieveAETitle",
    ),
}

_CONTROL = ("limit", "offset", "fuzzymatching", "includefield")
_TAG_RE = re.compile(r"^[0-9A-Fa-f]{8}$")
_JSON_TYPES = ("application/dicom+json", "application/json")


def _keyword(name: str) -> str:
    """A query key given as keyword or 8-hex-digit tag -> keyword; raises InvalidInput."""
    if _TAG_RE.match(name):
        kw = keyword_for_tag(int(name, 16))
        if not kw:
            raise InvalidInput(f"unknown attribute tag {name} in the query")
        return str(kw)
    if "." in name:
        raise InvalidInput(f"sequence matching ({name}) is not supported")
    from pydicom.datadict import tag_for_keyword

    if tag_for_keyword(name) is None and name not in ("ModalitiesInStudy",):
        raise InvalidInput(f"unknown attribute {name!r} in the query")
    return name


def _int_param(request: Request, name: str) -> int | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        raise InvalidInput(f"{name} must be a non-negative integer, not {raw!r}") from None
    if value < 0:
        raise InvalidInput(f"{name} must be a non-negative integer, not {raw!r}")
    return value


def _level_of(request: Request) -> tuple[QueryLevel, dict[str, str], tuple[str, ...]]:
    """The query level, the UIDs fixed by the path, and the upper-level keys returned for a flat search."""
    path = request.url.path.rstrip("/")
    fixed: dict[str, str] = {}
    if "study" in request.path_params:
        fixed["StudyInstanceUID"] = uid_param(request, "study")
    if "series" in request.path_params:
        fixed["SeriesInstanceUID"] = uid_param(request, "series")
    if path.endswith("/studies"):
        return QueryLevel.STUDY, fixed, ()
    if path.endswith("/series"):
        extra = () if "study" in fixed else DEFAULT_KEYS[QueryLevel.STUDY]
        return QueryLevel.SERIES, fixed, extra
    extra = () if "series" in fixed else DEFAULT_KEYS[QueryLevel.SERIES]
    if "study" not in fixed:
        extra += DEFAULT_KEYS[QueryLevel.STUDY]
    return QueryLevel.IMAGE, fixed, extra


def build_query(request: Request) -> tuple[QueryLevel, dict[str, str], list[str], bool]:
    """(level, identifier, attributes not used for matching, fuzzy asked) of a QIDO request."""
    level, fixed, extra = _level_of(request)
    known = set(keys_for_level(level)) | {"RetrieveAETitle"}
    identifier: dict[str, str] = {}
    for kw in (*DEFAULT_KEYS[level], *extra):
        if kw in known:
            identifier[kw] = ""
    ignored: list[str] = []
    for name, value in request.query_params.multi_items():
        if name in _CONTROL:
            continue
        kw = _keyword(name)
        if kw not in known:
            ignored.append(kw)
            continue
        if kw in fixed and value and value != fixed[kw]:
            raise InvalidInput(f"{kw}={value} contradicts the URL")
        identifier[kw] = value
    identifier.update(fixed)
    for raw in request.query_params.getlist("includefield"):
        for name in (n.strip() for n in raw.split(",")):
            if not name:
                continue
            if name == "all":
                for kw in keys_for_level(level):
                    identifier.setdefault(kw, "")
                continue
            kw = _keyword(name)
            if kw in known:
                identifier.setdefault(kw, "")
    fuzzy = request.query_params.get("fuzzymatching", "false").lower()
    if fuzzy not in ("true", "false"):
        raise InvalidInput("fuzzymatching must be true or false")
    return level, identifier, ignored, fuzzy == "true"


async def search(request: Request) -> Response:
    """``GET .../studies|series|instances``: the matches as ``application/dicom+json``."""
    ctx = ctx_of(request)
    if not any(any(m.matches(t) for t in _JSON_TYPES) for m in parse_accept(request.headers.get("accept"))):
        from vna.web.status import NotAcceptable

        raise NotAcceptable("QIDO-RS answers application/dicom+json only")
    level, identifier, ignored, fuzzy = build_query(request)
    limit, offset = _int_param(request, "limit"), _int_param(request, "offset") or 0
    actor = actor_of(request)

    def run() -> list[dict[str, Any]]:
        rows = ctx.archive.query.find(level, identifier, limit=None if limit is None else limit + offset,
                                      actor=actor)
        out = []
        for i, row in enumerate(rows):
            if i >= offset:
                out.append(row_json(row))
        return out

    matches = await run_in_threadpool(run)
    warnings = []
    if fuzzy:
        warnings.append('299 vna "The fuzzymatching parameter is not supported. '
                        'Only literal matching has been performed."')
    if ignored:
        warnings.append(f'299 vna "The following attributes are not recorded and were not used as match keys: '
                        f'{", ".join(sorted(set(ignored)))}"')
    headers = {"Warning": ", ".join(warnings)} if warnings else {}
    body = json.dumps(matches, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return Response(body, media_type="application/dicom+json", headers=headers)
