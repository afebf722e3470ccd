"""The pure parts of the web front-end: the streaming multipart parser, Accept negotiation, query rows as DICOM JSON."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vna.errors import InvalidInput
from vna.web.dicomjson import row_json
from vna.web.media import PART_END, MultipartParser, PartStart, parse_accept
from vna.web.status import NotAcceptable, http_status_for
from vna.web.wado import _frame_plan

B = "bnd"


def _body(parts: list[bytes], preamble: bytes = b"") -> bytes:
    out = preamble
    for i, p in enumerate(parts):
        out += (b"\r\n" if out else b"") + f"--{B}\r\nContent-Type: application/dicom\r\n\r\n".encode() + p
    return out + f"\r\n--{B}--\r\n".encode()


def _parse(body: bytes, cuts: list[int]) -> list[tuple[dict[str, str], bytes]]:
    """The parts of ``body`` fed to the parser in pieces split at ``cuts``."""
    parser = MultipartParser(B)
    parts: list[tuple[dict[str, str], bytes]] = []
    data: list[bytes] = []
    bounds = [0, *sorted(c for c in cuts if 0 < c < len(body)), len(body)]
    for a, b in zip(bounds, bounds[1:]):
        for ev in parser.feed(body[a:b]):
            if isinstance(ev, PartStart):
                parts.append((ev.headers, b""))
                data = []
            elif isinstance(ev, bytes):
                assert ev, "no empty data events"
                data.append(ev)
            else:
                assert ev is PART_END
                parts[-1] = (parts[-1][0], b"".join(data))
    parser.close()
    assert parser.done
    return parts


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=300), min_size=1, max_size=5), st.binary(max_size=20),
       st.lists(st.integers(min_value=0, max_value=2000), max_size=12))
def test_parser_finds_every_part_exactly_at_any_chunk_boundaries(parts: list[bytes], preamble: bytes,
                                                                 cuts: list[int]) -> None:
    delim = f"\r\n--{B}".encode()
    if any(delim in p + b"\r\n" or delim[2:] in p for p in parts) or delim[2:] in preamble or b"\r\n--" in preamble:
        return  # a body containing the delimiter is not a valid multipart body for this boundary
    body = _body(parts, preamble)
    found = _parse(body, cuts)
    assert [p for _h, p in found] == parts
    assert all(h["content-type"] == "application/dicom" for h, _p in found)


def test_parser_at_every_single_split_and_byte_by_byte() -> None:
    parts = [b"\r\n--bn\r\n-", b"", b"x" * 100 + b"\r\n--", b"--bnd"[:-1]]
    body = _body(parts, preamble=b"ignored preamble")
    for cut in range(len(body) + 1):
        assert [p for _h, p in _parse(body, [cut])] == parts
    assert [p for _h, p in _parse(body, list(range(len(body))))] == parts
    # transport padding after a delimiter, a part without headers, an epilogue
    padded = f"--{B}  \t\r\n\r\nraw\r\n--{B}--\r\nepilogue".encode()
    assert _parse(padded, list(range(len(padded)))) == [({}, b"raw")]


def test_parser_memory_stays_bounded() -> None:
    parser = MultipartParser(B)
    parser.feed(f"--{B}\r\nContent-Type: application/dicom\r\n\r\n".encode())
    for _ in range(100):
        out = parser.feed(b"\0" * 65536)
        assert sum(len(e) for e in out if isinstance(e, bytes)) >= 65536 - len(B) - 4
        assert len(parser._buf) < len(B) + 4
    with pytest.raises(InvalidInput, match="blank line"):
        p2 = MultipartParser(B)
        p2.feed(f"--{B}\r\nX-Long: ".encode())
        for _ in range(3):
            p2.feed(b"a" * 32768)


@pytest.mark.parametrize("body", [
    b"", b"garbage", f"--{B}\r\nContent-Type: application/dicom\r\n\r\nabc".encode(),   # no close delimiter
    f"--{B}\r\nno-colon-header\r\n\r\nabc\r\n--{B}--".encode(),
    f"--{B}\r\nContent-Type: application/dicom\r\nabc\r\n--{B}--".encode(),           # no blank line
    f"--{B}\r\nContent-Type: application/dicom\r\n\r\nab\r\n--{B}xyz\r\n--{B}--".encode(),  # boundary in data
    f"--{B}\r\n\r\nabc\r\n--{B}".encode(),                                                # cut in the close
])
def test_malformed_bodies_are_refused(body: bytes) -> None:
    for cuts in ([], list(range(len(body)))):
        with pytest.raises(InvalidInput):
            _parse(body, cuts)


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
