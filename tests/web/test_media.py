"""The pure parts of the web front-end: multipart splitting, Accept negotiation, query rows as DICOM JSON."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vna.errors import InvalidInput
from vna.web.dicomjson import row_json
from vna.web.media import parse_accept, split_multipart
from vna.web.status import NotAcceptable, http_status_for
from vna.web.wado import _frame_plan

B = "bnd"


def _body(parts: list[bytes], preamble: bytes = b"") -> bytes:
    out = preamble
    for i, p in enumerate(parts):
        out += (b"\r\n" if out else b"") + f"--{B}\r\nContent-Type: application/dicom\r\n\r\n".encode() + p
    return out + f"\r\n--{B}--\r\n".encode()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=300), min_size=1, max_size=5), st.binary(max_size=20))
def test_split_finds_every_part_exactly(tmp_path_factory: pytest.TempPathFactory, parts: list[bytes],
                                        preamble: bytes) -> None:
    delim = f"\r\n--{B}".encode()
    if any(delim in p + b"\r\n" or delim[2:] in p for p in parts) or delim[2:] in preamble or b"\r\n--" in preamble:
        return  # a body containing the delimiter is not a valid multipart body for this boundary
    path = tmp_path_factory.mktemp("mp") / "body"
    body = _body(parts, preamble)
    path.write_bytes(body)
    found = split_multipart(path, B)
    assert [body[p.start:p.end] for p in found] == parts
    assert all(p.content_type == "application/dicom" for p in found)


@pytest.mark.parametrize("body", [
    b"", b"garbage", f"--{B}\r\nContent-Type: application/dicom\r\n\r\nabc".encode(),   # no close delimiter
    f"--{B}\r\nno-colon-header\r\n\r\nabc\r\n--{B}--".encode(),
    f"--{B}\r\nContent-Type: application/dicom\r\nabc\r\n--{B}--".encode(),             # no blank line
])
def test_malformed_bodies_are_refused(tmp_path: Path, body: bytes) -> None:
    path = tmp_path / "body"
    path.write_bytes(body)
    with pytest.raises(InvalidInput):
        split_multipart(path, B)


def test_frame_negotiation() -> None:
    ele, j2k = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.90"
    star = parse_accept("multipart/related; type=application/octet-stream; transfer-syntax=*")
    assert _frame_plan(star, j2k) == ("image/jp2", j2k, False)
    assert _frame_plan(star, ele) == ("application/octet-stream", ele, False)
    octet = parse_accept('multipart/related; type="application/octet-stream"')
    assert _frame_plan(octet, "1.2.840.10008.1.2") == ("application/octet-stream", ele, False)
    assert _frame_plan(octet, j2k) == ("application/octet-stream", ele, True)  # decoded if pydicom can
    assert _frame_plan(parse_accept("multipart/related; type=image/jp2"), j2k) == ("image/jp2", j2k, False)
    with pytest.raises(NotAcceptable):
        _frame_plan(parse_accept("multipart/related; type=image/jls"), j2k)
    assert http_status_for(NotAcceptable("x")) == 406


def test_row_json_leaves_out_empty_values_and_types_numbers() -> None:
    out = row_json({"PatientName": "DOE^J", "ModalitiesInStudy": "", "NumberOfStudyRelatedInstances": "3",
                    "StudyInstanceUID": "1.2.3", "ModalitiesInStudy2": "x"})
    assert out == {"00100010": {"vr": "PN", "Value": [{"Alphabetic": "DOE^J"}]},
                   "0020000D": {"vr": "UI", "Value": ["1.2.3"]},
                   "00201208": {"vr": "IS", "Value": [3]}}
    assert row_json({"ModalitiesInStudy": "CT\\MR"}) == {"00080061": {"vr": "CS", "Value": ["CT", "MR"]}}
