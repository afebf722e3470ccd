"""DICOMweb against a real `vna serve`, with dicomweb-client (PyPI) as the client and DIMSE as the reference."""

from __future__ import annotations

import http.client
import json
import subprocess
from pathlib import Path
from typing import Any, Callable

import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames

from tests.integration import scu
from tests.web.conftest import Web, multipart_body, split_parts

pytestmark = pytest.mark.dcmtk

#: pydicom's own test files (shipped with it): native, implicit VR, RLE multi-frame, JPEG baseline, JPEG 2000
PYDICOM_FILES = ["CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "rtdose_rle.dcm", "SC_rgb_jpeg_dcmtk.dcm",
                 "JPEG2000.dcm"]


def _pydicom_files() -> list[Path]:
    return [Path(str(get_testdata_file(n))) for n in PYDICOM_FILES]


def _stow(web: Web, files: list[Path], study: str | None = None) -> requests.Response:
    body, ctype = multipart_body(files)
    url = f"{web.base}/studies" + (f"/{study}" if study else "")
    return requests.post(url, data=body, headers={"Content-Type": ctype, "Accept": "application/dicom+json"},
                         timeout=60)


def _uids(path: Path) -> tuple[str, str, str]:
    ds = dcmread(path, stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)


def _count(web: Web) -> int:
    return len(requests.get(f"{web.base}/instances", timeout=30).json())


def test_stow_then_wado_is_byte_identical(web: Web, corpus: list[Path]) -> None:
    files = corpus + _pydicom_files()
    r = _stow(web, files)
    assert r.status_code == 200, r.text
    body = r.json()
    assert "00081198" not in body
    assert len(body["00081199"]["Value"]) == len(files)
    again = _stow(web, files[:2])  # a re-send is a duplicate, answered as stored (same policy as C-STORE)
    assert again.status_code == 200 and len(again.json()["00081199"]["Value"]) == 2
    for f in files:
        study, series, sop = _uids(f)
        resp = requests.get(f"{web.base}/studies/{study}/series/{series}/instances/{sop}", timeout=30,
                            headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
        assert resp.status_code == 200
        parts = split_parts(resp)
        assert len(parts) == 1 and parts[0][0].startswith("application/dicom")
        assert parts[0][1] == f.read_bytes(), f.name
    client = DICOMwebClient(web.base)
    study = _uids(corpus[0])[0]
    got = client.retrieve_study(study)
    assert sorted(d.SOPInstanceUID for d in got) == sorted(_uids(f)[2] for f in corpus if _uids(f)[0] == study)


def test_qido_answers_equal_c_find(web: Web, corpus: list[Path]) -> None:
    r = subprocess.run(["storescu", "-aec", "VNA", "127.0.0.1", str(web.server.port), *map(str, corpus)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    client = DICOMwebClient(web.base)
    sample = dcmread(corpus[0], stop_before_pixels=True)
    keys = ["StudyInstanceUID", "PatientID", "PatientName", "StudyDate", "ModalitiesInStudy",
            "NumberOfStudyRelatedInstances", "AccessionNumber"]
    name = str(sample.PatientName)
    queries: list[dict[str, str]] = [
        {}, {"PatientID": str(sample.PatientID)}, {"PatientName": name[:2] + "*"},
        {"PatientName": name.lower()}, {"StudyDate": "19000101-20991231"}, {"ModalitiesInStudy": "MR"},
    ]
    for q in queries:
        ident: dict[str, Any] = {k: "" for k in keys}
        ident.update(q)
        ident["QueryRetrieveLevel"] = "STUDY"
        found, status = scu.find(web.server.port, ident)
        assert status == 0
        want = {str(d.StudyInstanceUID): {k: str(d.get(k, "") or "") for k in keys} for d in found}
        rows = client.search_for_studies(search_filters=q, fields=keys)
        got = {}
        for row in rows:
            ds = Dataset.from_json(row)
            got[str(ds.StudyInstanceUID)] = {k: str(ds.get(k, "") or "") for k in keys}
        assert set(got) == set(want), q
        for uid in want:
            for k in keys:
                if want[uid][k]:
                    assert got[uid][k] == want[uid][k], (q, k)
    series = client.search_for_series(search_filters={"Modality": "CT"})
    ident = {"QueryRetrieveLevel": "SERIES", "Modality": "CT", "SeriesInstanceUID": "", "StudyInstanceUID": ""}
    found, _ = scu.find(web.server.port, ident)
    assert {s["0020000E"]["Value"][0] for s in series} == {str(d.SeriesInstanceUID) for d in found}
    everything = client.search_for_instances()
    assert len(everything) == len(corpus)
    page = client.search_for_instances(limit=2, offset=1)
    assert [p["00080018"] for p in page] == [e["00080018"] for e in everything[1:3]]
    for row in client.search_for_studies():
        assert all("Value" in v for v in row.values())  # attributes without value are left out


def test_metadata_round_trips_through_pydicom(web: Web, corpus: list[Path]) -> None:
    files = [corpus[0], *_pydicom_files()]
    assert _stow(web, files).status_code == 200
    client = DICOMwebClient(web.base)
    for f in files:
        study, series, sop = _uids(f)
        meta = client.retrieve_instance_metadata(study, series, sop)
        original = dcmread(f)

        def bulk(_tag: str, _vr: str, uri: str) -> bytes:
            resp = requests.get(web.root + uri, timeout=30)
            assert resp.status_code == 200, uri
            return split_parts(resp)[0][1]

        ds = Dataset.from_json(meta, bulk_data_uri_handler=bulk)
        for elem in original:
            if elem.tag == 0x7FE00010:
                continue
            assert elem.tag in ds, (f.name, elem.tag)
            if elem.VR != "SQ":
                assert ds[elem.tag].value == elem.value, (f.name, elem.tag)
        assert "7FE00010" in meta and "BulkDataURI" in meta["7FE00010"] if "PixelData" in original else True


def test_frames_equal_pixel_data_pydicom_extracts(web: Web, corpus: list[Path]) -> None:
    files = [corpus[0], *_pydicom_files()]
    assert _stow(web, files).status_code == 200
    client = DICOMwebClient(web.base)
    for f in files:
        ds = dcmread(f)
        if "PixelData" not in ds:
            continue
        study, series, sop = _uids(f)
        n = int(ds.get("NumberOfFrames", 1) or 1)
        if ds.file_meta.TransferSyntaxUID.is_compressed:
            want = list(generate_frames(ds.PixelData, number_of_frames=n))
            resp = requests.get(f"{web.base}/studies/{study}/series/{series}/instances/{sop}/frames/1",
                                headers={"Accept": "multipart/related; type=application/octet-stream; "
                                                   "transfer-syntax=*"}, timeout=30)
            assert resp.status_code == 200
            (ctype, data), = split_parts(resp)
            assert data == want[0], f.name
            assert ds.file_meta.TransferSyntaxUID in ctype
        else:
            frames = client.retrieve_instance_frames(study, series, sop, frame_numbers=[1])
            assert frames[0] == ds.PixelData[:len(frames[0])]
            assert len(frames[0]) == len(ds.PixelData) // n


def test_rendered_and_thumbnail_are_images(web: Web, corpus: list[Path]) -> None:
    assert _stow(web, [corpus[0]]).status_code == 200
    study, series, sop = _uids(corpus[0])
    inst = f"{web.base}/studies/{study}/series/{series}/instances/{sop}"
    jpeg = requests.get(f"{inst}/rendered", headers={"Accept": "image/jpeg"}, timeout=30)
    assert jpeg.status_code == 200 and jpeg.content[:2] == b"\xff\xd8"
    png = requests.get(f"{inst}/rendered?window=40,400", headers={"Accept": "image/png"}, timeout=30)
    assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"
    from io import BytesIO

    from PIL import Image

    thumb = requests.get(f"{web.base}/studies/{study}/thumbnail", headers={"Accept": "image/png"}, timeout=30)
    assert thumb.status_code == 200
    img = Image.open(BytesIO(thumb.content))
    assert max(img.size) <= 128
    assert requests.get(f"{inst}/rendered", headers={"Accept": "image/gif"}, timeout=30).status_code == 406


# -- bad input: clear 4xx, nothing stored ----------------------------------------------------------------------------

def test_malformed_multipart_and_wrong_content_type_store_nothing(web: Web, corpus: list[Path]) -> None:
    body, ctype = multipart_body(corpus[:2])
    truncated = body[: len(body) // 2]
    r = requests.post(f"{web.base}/studies", data=truncated, headers={"Content-Type": ctype}, timeout=30)
    assert r.status_code == 400 and "close delimiter" in r.text
    r = requests.post(f"{web.base}/studies", data=b"garbage", headers={"Content-Type": ctype}, timeout=30)
    assert r.status_code == 400
    r = requests.post(f"{web.base}/studies", data=body, headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 415
    r = requests.post(f"{web.base}/studies", data=body, timeout=30)
    assert r.status_code == 415
    bad = body.replace(b"Content-Type: application/dicom\r\n", b"Content-Type: text/plain\r\n", 1)
    r = requests.post(f"{web.base}/studies", data=bad, headers={"Content-Type": ctype}, timeout=30)
    assert r.status_code == 202  # one part refused (FailedSOPSequence), the other stored
    assert r.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xC000]
    assert _count(web) == 1
    junk = requests.post(f"{web.base}/studies", data=multipart_body([Path(__file__)])[0],
                         headers={"Content-Type": ctype}, timeout=30)
    assert junk.status_code == 409 and "00081198" in junk.json()
    other = _uids(corpus[-1])[0]
    mismatch = _stow(web, [corpus[0]], study=other if other != _uids(corpus[0])[0] else "1.2.3.4")
    assert mismatch.status_code == 409
    assert _count(web) == 1


def test_body_over_the_limit_is_refused(make_web: Callable[..., Web], corpus: list[Path]) -> None:
    web = make_web("[web]\nmax_body_bytes = 1048576\n")
    big = Path(web.server.data_dir.parent / "big.bin")
    big.write_bytes(b"\0" * (2 * 1024 * 1024))
    body, ctype = multipart_body([corpus[0], big])
    r = requests.post(f"{web.base}/studies", data=body, headers={"Content-Type": ctype}, timeout=30)
    assert r.status_code == 413
    chunked = requests.post(f"{web.base}/studies", data=iter([body[i:i + 65536] for i in range(0, len(body), 65536)]),
                            headers={"Content-Type": ctype}, timeout=30)
    assert chunked.status_code == 413
    assert _count(web) == 0
    assert not list((web.server.data_dir / "spool" / "web").iterdir())


def _raw_get(web: Web, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", web.port, timeout=30)
    conn.request("GET", path)
    resp = conn.getresponse()
    return resp.status, resp.read()


def test_traversal_in_path_parameters_is_refused(web: Web, corpus: list[Path]) -> None:
    assert _stow(web, [corpus[0]]).status_code == 200
    study, series, sop = _uids(corpus[0])
    for path in (f"/dicomweb/studies/..%2F..%2Fetc/series", f"/dicomweb/studies/{study}/series/..%2Fx",
                 f"/dicomweb/studies/{study}/series/{series}/instances/%2E%2E/frames/1",
                 f"/dicomweb/studies/{study}/series/{series}/instances/{sop}/bulkdata/../../../etc/passwd",
                 f"/dicomweb/studies/{study}/series/{series}/instances/{sop}/frames/1,x"):
        status, body = _raw_get(web, path)
        assert 400 <= status < 500, (path, status)
        assert b"root:" not in body
    status, body = _raw_get(web, "/viewer/..%2F..%2F..%2F..%2Fetc%2Fpasswd")
    assert b"root:" not in body
    assert _raw_get(web, f"/dicomweb/studies/{study}/series/1.2.3/instances")[1] == b"[]"


def test_viewer_missing_says_how_to_get_it_and_root_redirects(make_web: Callable[..., Web],
                                                               tmp_path: Path) -> None:
    empty = tmp_path / "no-viewer"
    empty.mkdir()
    web = make_web(f'[web]\nviewer_dir = "{empty}"\n')
    r = requests.get(web.root + "/", timeout=30)
    assert r.status_code == 503 and "make install" in r.text and r.url.endswith("/viewer/")
    assert requests.get(f"{web.base}/studies", timeout=30).json() == []


def test_non_loopback_bind_needs_tokens(make_web: Callable[..., Web], make_server: Callable[..., Any],
                                        corpus: list[Path]) -> None:
    srv = make_server("", env={"VNA_WEB_PORT": "18099", "VNA_WEB_HOST": "0.0.0.0"}, start=False)
    with pytest.raises(RuntimeError, match="exited 2"):
        srv.start()
    assert "needs bearer tokens" in srv.log.read_text()
    tokens = ('[[grpc.token]]\nname = "reader"\ntoken = "read-token-0123456789"\nrole = "read"\n'
              '[[grpc.token]]\nname = "writer"\ntoken = "write-token-0123456789"\nrole = "write"\n'
              '[web]\nhost = "0.0.0.0"\n')
    web = make_web(tokens)
    body, ctype = multipart_body([corpus[0]])
    assert requests.get(f"{web.base}/studies", timeout=30).status_code == 401
    bad = {"Authorization": "Bearer not-a-token-at-all"}
    assert requests.get(f"{web.base}/studies", headers=bad, timeout=30).status_code == 401
    reader = {"Authorization": "Bearer read-token-0123456789"}
    writer = {"Authorization": "Bearer write-token-0123456789"}
    r = requests.post(f"{web.base}/studies", data=body, headers={**reader, "Content-Type": ctype}, timeout=30)
    assert r.status_code == 403
    assert requests.get(f"{web.base}/instances", headers=reader, timeout=30).json() == []
    r = requests.post(f"{web.base}/studies", data=body, headers={**writer, "Content-Type": ctype}, timeout=30)
    assert r.status_code == 200
    assert len(requests.get(f"{web.base}/instances", headers=reader, timeout=30).json()) == 1
    audit = [json.loads(line) for line in (web.server.data_dir / "audit" / "audit.log").read_text().splitlines()]
    refused = [a for a in audit if a["event"] == "User Authentication"]
    assert [a["outcome"] for a in refused] == [4, 4, 4]  # no token, unknown token, read role posting
    assert {(a["event"], a["actor"]["id"]) for a in audit} >= {("Query", "reader"),
                                                               ("DICOM Instances Transferred", "writer")}


def test_cold_instances_are_recalled_transparently(make_web: Callable[..., Web], corpus: list[Path]) -> None:
    web = make_web("[archive]\nmin_copies = 1\n[lifecycle]\nmin_age_days = 0\n")  # every hot copy retired
    files = [p for p in corpus if p.name.startswith("ct-")]
    assert _stow(web, files).status_code == 200
    r = web.server.cli("lifecycle", "run", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["done"] >= 1, r.stdout + r.stderr
    client = DICOMwebClient(web.base)
    rows = client.search_for_studies(fields=["InstanceAvailability"])
    assert {row["00080056"]["Value"][0] for row in rows} == {"NEARLINE"}
    for f in files:
        study, series, sop = _uids(f)
        resp = requests.get(f"{web.base}/studies/{study}/series/{series}/instances/{sop}", timeout=30)
        assert resp.status_code == 200
        assert split_parts(resp)[0][1] == f.read_bytes()
    study, series, sop = _uids(files[0])
    frame = client.retrieve_instance_frames(study, series, sop, frame_numbers=[1])[0]
    assert frame == dcmread(files[0]).PixelData


def test_https_with_tls_cert_and_key(make_web: Callable[..., Web], tmp_path: Path, corpus: list[Path]) -> None:
    from tests.conftest import self_signed

    cert, key = self_signed(tmp_path, "localhost")
    web = make_web(f'[web]\ntls_cert = "{cert}"\ntls_key = "{key}"\n')
    base = f"https://localhost:{web.port}/dicomweb"
    assert requests.get(f"{base}/studies", verify=str(cert), timeout=30).json() == []
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(f"{web.base}/studies", timeout=30)  # plain HTTP on the TLS port gets no answer
    assert "https://127.0.0.1:" in web.server.log.read_text()
