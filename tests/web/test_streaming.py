"""STOW-RS bodies parsed as they arrive and WADO-RS responses streamed from verified copies, through HTTP.

The server sees the body in the pieces the client sends (chunked transfer
encoding, a pause between pieces): delimiters, part headers and data split at
awkward places must give the same instances; a truncated body, the boundary
inside a part's data, a part over the limit or a client that goes away store
nothing and leave no spool file.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest
import requests
from pydicom import dcmread

from tests.web.conftest import Web, multipart_body, split_parts

pytestmark = pytest.mark.dcmtk

BOUNDARY = "vna-test-boundary"


def _spool(web: Web) -> list[Path]:
    return list((web.server.data_dir / "spool" / "web").iterdir())


def _count(web: Web) -> int:
    return len(requests.get(f"{web.base}/instances", timeout=30).json())


def _pieces(body: bytes, cuts: list[int], pause: float = 0.005) -> Iterator[bytes]:
    """``body`` cut at ``cuts``, one chunk each, with a pause so the server reads them apart."""
    bounds = [0, *sorted({c for c in cuts if 0 < c < len(body)}), len(body)]
    for a, b in zip(bounds, bounds[1:]):
        time.sleep(pause)
        yield body[a:b]


def _post(web: Web, data: bytes | Iterator[bytes], ctype: str) -> requests.Response:
    return requests.post(f"{web.base}/studies", data=data, timeout=60,
                         headers={"Content-Type": ctype, "Accept": "application/dicom+json"})


def _awkward_cuts(body: bytes) -> list[int]:
    """Cuts inside every delimiter, inside every part's header block, and single bytes around them."""
    cuts: list[int] = []
    delim = f"\r\n--{BOUNDARY}".encode()
    pos = body.find(delim[2:])
    while pos >= 0:
        cuts += [pos - 1, pos, pos + 1, pos + 2, pos + len(delim) // 2, pos + len(delim) - 3,
                 pos + len(delim) + 5, pos + len(delim) + 20, pos + len(delim) + 21]
        pos = body.find(delim, pos + 1)
    return cuts


def test_body_split_at_awkward_chunk_boundaries_is_stored_byte_identical(web: Web, corpus: list[Path]) -> None:
    files = corpus[:4]
    body, ctype = multipart_body(files, BOUNDARY)
    r = _post(web, _pieces(body, _awkward_cuts(body)), ctype)
    assert r.status_code == 200, r.text
    assert len(r.json()["00081199"]["Value"]) == len(files)
    assert not _spool(web)
    for f in files:
        ds = dcmread(f, stop_before_pixels=True)
        got = requests.get(f"{web.base}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/"
                           f"{ds.SOPInstanceUID}", headers={"Accept": 'multipart/related; type="application/dicom"'},
                           timeout=30)
        assert got.status_code == 200
        assert [data for _t, data in split_parts(got)] == [f.read_bytes()]


def test_truncated_body_and_boundary_inside_data_store_nothing(web: Web, corpus: list[Path]) -> None:
    body, ctype = multipart_body(corpus[:3], BOUNDARY)
    cut = body.rfind(f"--{BOUNDARY}--".encode())   # every part complete but the close delimiter missing
    r = _post(web, _pieces(body[:cut], _awkward_cuts(body[:cut])), ctype)
    assert r.status_code == 400 and "close delimiter" in r.text
    first = corpus[0].read_bytes()
    inside = body.replace(first, first[:1000] + f"\r\n--{BOUNDARY}X".encode() + first[1000:], 1)
    r = _post(web, _pieces(inside, _awkward_cuts(inside)), ctype)
    assert r.status_code == 400 and "boundary" in r.text
    assert _count(web) == 0
    assert not _spool(web)


def test_part_over_the_limit_is_refused_while_it_arrives(make_web: Callable[..., Web], corpus: list[Path],
                                                         tmp_path: Path) -> None:
    web = make_web("[web]\nmax_body_bytes = 1048576\n")
    big = tmp_path / "big.bin"
    big.write_bytes(b"\1" * (3 * 1024 * 1024))
    body, ctype = multipart_body([corpus[0], big, corpus[1]], BOUNDARY)   # valid parts before and after
    r = _post(web, _pieces(body, list(range(0, len(body), 200_000)), pause=0), ctype)   # chunked: no length
    assert r.status_code == 413 and "max_body_bytes" in r.text
    assert _count(web) == 0
    assert not _spool(web)


def test_client_going_away_mid_body_stores_nothing(web: Web, corpus: list[Path]) -> None:
    body, ctype = multipart_body(corpus[:3], BOUNDARY)
    with socket.create_connection(("127.0.0.1", web.port), timeout=30) as sock:
        sock.sendall(f"POST /dicomweb/studies HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {ctype}\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:len(body) * 2 // 3])
        deadline = time.monotonic() + 10
        while not _spool(web) and time.monotonic() < deadline:   # the parts received so far are spooled
            time.sleep(0.02)
        assert _spool(web)
    deadline = time.monotonic() + 10
    while _spool(web) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _spool(web)
    assert _count(web) == 0
    r = _post(web, body, ctype)   # the server goes on serving
    assert r.status_code == 200 and _count(web) == 3


def _blobs(web: Web, sop_uid: str) -> list[Path]:
    return [p for p in (web.server.data_dir / "hot").rglob(f"{sop_uid}.v1.*.dcm") if ".quarantine" not in p.parts]


def test_study_retrieve_leaves_out_an_instance_without_verified_copy(web: Web, corpus: list[Path]) -> None:
    study = [p for p in corpus if p.name.startswith("ct-7-0000")]
    assert len(study) == 3
    body, ctype = multipart_body(study, BOUNDARY)
    assert _post(web, body, ctype).status_code == 200
    ds = dcmread(study[1], stop_before_pixels=True)
    bad = str(ds.SOPInstanceUID)
    copies = _blobs(web, bad)
    assert len(copies) == 2
    data = bytearray(copies[0].read_bytes())
    data[len(data) // 2] ^= 0xFF
    copies[0].write_bytes(bytes(data))
    copies[1].unlink()
    r = requests.get(f"{web.base}/studies/{ds.StudyInstanceUID}",
                     headers={"Accept": 'multipart/related; type="application/dicom"'}, timeout=30)
    assert r.status_code == 200
    got = sorted(data for _t, data in split_parts(r))
    assert got == sorted(p.read_bytes() for p in study if p != study[1])
    deadline = time.monotonic() + 10   # recorded when the transfer ends, just after the last byte went out
    while True:
        audit = [json.loads(line) for line in (web.server.data_dir / "audit" / "audit.log").read_text().splitlines()]
        sent = [a for a in audit if a.get("details", {}).get("op") == "wado-rs"]
        if sent or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert sent and sent[-1]["details"]["completed"] == 2 and sent[-1]["details"]["failed"] == 1


def _big_instance(src: Path, out: Path, frames: int) -> Path:
    """A multi-frame copy of a CT instance with new UIDs: ``frames`` times its pixel data."""
    from pydicom.uid import generate_uid

    ds = dcmread(src)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.NumberOfFrames = frames
    ds.PixelData = bytes(ds.PixelData) * frames
    ds.save_as(out, enforce_file_format=True)
    return out


def test_instance_larger_than_one_piece_is_streamed_byte_identical(web: Web, corpus: list[Path],
                                                                   tmp_path: Path) -> None:
    from vna.web.wado import _ONE_PIECE

    src = next(p for p in corpus if p.name.startswith("ct-"))
    big = _big_instance(src, tmp_path / "big.dcm", frames=_ONE_PIECE // len(src.read_bytes()) * 2 + 3)
    assert big.stat().st_size > 2 * _ONE_PIECE
    body, ctype = multipart_body([src, big], BOUNDARY)
    assert _post(web, body, ctype).status_code == 200
    study = dcmread(src, stop_before_pixels=True).StudyInstanceUID
    accept = {"Accept": 'multipart/related; type="application/dicom"'}
    with requests.get(f"{web.base}/studies/{study}", headers=accept, timeout=30, stream=True) as gone:
        assert gone.status_code == 200
        next(gone.iter_content(65536))   # a client that reads a little, then goes away
    r = requests.get(f"{web.base}/studies/{study}", headers=accept, timeout=30)
    assert r.status_code == 200
    assert sorted(data for _t, data in split_parts(r)) == sorted([src.read_bytes(), big.read_bytes()])


def test_retrieve_sends_the_good_copy_and_quarantines_a_damaged_one(web: Web, corpus: list[Path]) -> None:
    """A hot copy whose bytes differ from the index is never sent: the other copy is, and the damaged copy
    read is quarantined. One instance has its first copy damaged, another its second, so whichever order the
    server reads copies in, one damaged copy is read first."""
    study = [p for p in corpus if p.name.startswith("ct-7-0001")]
    assert len(study) >= 2
    body, ctype = multipart_body(study, BOUNDARY)
    assert _post(web, body, ctype).status_code == 200
    damaged: list[Path] = []
    for which, path in enumerate(study[:2]):
        copies = sorted(_blobs(web, str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)))
        assert len(copies) == 2
        data = bytearray(copies[which].read_bytes())
        data[-1] ^= 0xFF   # same size, other bytes: only the digest tells
        copies[which].write_bytes(bytes(data))
        damaged.append(copies[which])
    ds = dcmread(study[0], stop_before_pixels=True)
    r = requests.get(f"{web.base}/studies/{ds.StudyInstanceUID}",
                     headers={"Accept": 'multipart/related; type="application/dicom"'}, timeout=30)
    assert r.status_code == 200
    assert sorted(data for _t, data in split_parts(r)) == sorted(p.read_bytes() for p in study)
    assert any(not p.exists() for p in damaged)   # read first, found damaged: moved to quarantine
