"""Patient identity domains end to end (issue 22): a real ``vna serve``, DIMSE senders, C-FIND, QIDO, C-GET.

Hospital A's PACS sends patient "12345" with IssuerOfPatientID HOSP_A in its
objects; hospital B's PACS sends another patient "12345" with no issuer, and
``[[dicom.sender]]`` assigns HOSP_B to what it sends. Two patients; each query by
(ID, issuer) finds only its studies; the stored bytes stay as sent. A study of
hospital A whose objects list B's ID in Other Patient IDs Sequence is found by B's ID.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path
from typing import Any, Callable

import pytest
import requests
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, build_role, evt
from pynetdicom.sop_class import PatientRootQueryRetrieveInformationModelGet

from benchmarks.corpus import StudySpec, make_study
from vna.index.query import ISSUER_ASSIGNED_KEY
from vna.index.sqlite import SqliteIndex

from tests.conftest import DCMTK_ENV, StoreScp, VnaServer, dataset_bytes, free_port
from tests.integration import scu

CONFIG = """
[[dicom.sender]]
ae_title = "PACS_B"
issuer_of_patient_id = "HOSP_B"
"""


def _write(out: Path, study_no: int, seed: int, **attrs: Any) -> list[Path]:
    paths = []
    for i, ds in enumerate(make_study(StudySpec(kind="small", instances=2, seed=seed), study_no)):
        for k, v in attrs.items():
            setattr(ds, k, v)
        p = out / f"s{seed}-{study_no}-{i}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


def _add_other_patient_id(paths: list[Path], patient_id: str, issuer: str) -> None:
    """Rewrite each file with one Other Patient IDs item: ``patient_id`` of ``issuer``."""
    for p in paths:
        ds = dcmread(p)
        item = Dataset()
        item.PatientID = patient_id
        item.IssuerOfPatientID = issuer
        ds.OtherPatientIDsSequence = Sequence([item])
        ds.save_as(p, enforce_file_format=True)


def _storescu(port: int, calling: str, paths: list[Path]) -> None:
    if shutil.which("storescu") is None:
        pytest.fail("DCMTK storescu is missing: run `make system-deps`")
    r = subprocess.run(["storescu", "-aet", calling, "-aec", "VNA", "127.0.0.1", str(port), *map(str, paths)],
                       capture_output=True, text=True, env=DCMTK_ENV, timeout=60)
    assert r.returncode == 0, r.stderr


def _find(port: int, level: str, patient_root: bool = False, **keys: str) -> list[Dataset]:
    ident: dict[str, Any] = {"QueryRetrieveLevel": level, "PatientID": "", "IssuerOfPatientID": ""}
    if level == "PATIENT":
        ident["NumberOfPatientRelatedStudies"] = ""
    else:
        ident["StudyInstanceUID"] = ""
    ident.update(keys)
    found, status = scu.find(port, ident, patient_root=patient_root)
    assert status == 0x0000, hex(status)
    return found


def _qido(base: str, **params: str) -> list[dict[str, Any]]:
    r = requests.get(f"{base}/studies", params={"includefield": "IssuerOfPatientID", **params},
                     headers={"Accept": "application/dicom+json"}, timeout=30)
    if r.status_code == 204:
        return []
    assert r.status_code == 200, (r.status_code, r.text)
    return list(r.json())


def _val(item: dict[str, Any], tag: str) -> str:
    v = item.get(tag, {}).get("Value", [""])
    return str(v[0])


def test_two_hospitals_same_patient_id_are_two_patients(make_server: Callable[..., VnaServer],
                                                        tmp_path: Path) -> None:
    web_port = free_port()
    srv = make_server(CONFIG, env={"VNA_WEB_PORT": str(web_port)})
    base = f"http://127.0.0.1:{web_port}/dicomweb"
    out = tmp_path / "sent"
    out.mkdir()
    a = _write(out, 0, 31, PatientID="12345", IssuerOfPatientID="HOSP_A", PatientName="ALPHA^ANNA")
    b = _write(out, 0, 32, PatientID="12345", PatientName="BETA^BERT")  # no issuer in the objects
    linked = _write(out, 0, 33, PatientID="A-1", IssuerOfPatientID="HOSP_A", PatientName="GAMMA^GUS")
    _add_other_patient_id(linked, "B-777", "HOSP_B")  # hospital A's study of a patient hospital B knows as B-777
    assert "IssuerOfPatientID" not in dcmread(b[0])
    _storescu(srv.port, "PACS_A", a + linked)
    _storescu(srv.port, "PACS_B", b)
    study_a, study_b, study_l = (str(dcmread(x[0]).StudyInstanceUID) for x in (a, b, linked))

    # PATIENT level (Patient Root): two patients "12345", each with its issuer
    rows = _find(srv.port, "PATIENT", patient_root=True, PatientID="12345")
    assert sorted((str(r.PatientID), str(r.IssuerOfPatientID), int(r.NumberOfPatientRelatedStudies))
                  for r in rows) == [("12345", "HOSP_A", 1), ("12345", "HOSP_B", 1)]
    rows = _find(srv.port, "PATIENT", patient_root=True, PatientID="12345", IssuerOfPatientID="HOSP_B")
    assert [(str(r.PatientID), str(r.IssuerOfPatientID)) for r in rows] == [("12345", "HOSP_B")]
    # STUDY level: (ID, issuer) finds only its studies; the ID alone finds both, each with its issuer
    for issuer, study in (("HOSP_A", study_a), ("HOSP_B", study_b)):
        rows = _find(srv.port, "STUDY", PatientID="12345", IssuerOfPatientID=issuer)
        assert [str(r.StudyInstanceUID) for r in rows] == [study], issuer
        assert [str(r.IssuerOfPatientID) for r in rows] == [issuer]
    rows = _find(srv.port, "STUDY", PatientID="12345")
    assert sorted((str(r.StudyInstanceUID), str(r.IssuerOfPatientID)) for r in rows) == sorted(
        [(study_a, "HOSP_A"), (study_b, "HOSP_B")])
    rows = _find(srv.port, "IMAGE", PatientID="12345", IssuerOfPatientID="HOSP_B", StudyInstanceUID=study_b,
                 SeriesInstanceUID="", SOPInstanceUID="")
    assert len(rows) == 2

    # QIDO-RS: the same
    got = _qido(base, PatientID="12345")
    assert sorted((_val(s, "0020000D"), _val(s, "00100021")) for s in got) == sorted(
        [(study_a, "HOSP_A"), (study_b, "HOSP_B")])
    got = _qido(base, PatientID="12345", IssuerOfPatientID="HOSP_B")
    assert [(_val(s, "0020000D"), _val(s, "00100021")) for s in got] == [(study_b, "HOSP_B")]

    # Other Patient IDs: hospital B's ID finds hospital A's study that lists it (answered with its own identity)
    rows = _find(srv.port, "STUDY", PatientID="B-777", IssuerOfPatientID="HOSP_B")
    assert [(str(r.StudyInstanceUID), str(r.PatientID), str(r.IssuerOfPatientID)) for r in rows] == [
        (study_l, "A-1", "HOSP_A")]
    assert _find(srv.port, "STUDY", PatientID="B-777", IssuerOfPatientID="HOSP_A") == []
    assert [_val(s, "0020000D") for s in _qido(base, PatientID="B-777")] == [study_l]

    # the stored bytes are exactly those sent (the assigned issuer is in the index only)
    sent = {str(dcmread(p).SOPInstanceUID): hashlib.sha256(dataset_bytes(p)).hexdigest() for p in a + b}
    for study in (study_a, study_b):
        _, final, raw = scu.get(srv.port, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study},
                                [str(dcmread(b[0]).SOPClassUID)], [str(dcmread(b[0]).file_meta.TransferSyntaxUID)])
        assert final.Status == 0x0000
        assert len(raw) == 2
        for sop, body in raw.items():
            assert hashlib.sha256(body).hexdigest() == sent[sop], sop
    # the index records the effective issuer and whether it was assigned
    idx = SqliteIndex(srv.data_dir / "index.sqlite")
    try:
        rec_b = idx.get_instance(str(dcmread(b[0]).SOPInstanceUID))
        rec_a = idx.get_instance(str(dcmread(a[0]).SOPInstanceUID))
        assert rec_a is not None and rec_b is not None
        assert (rec_b.source_ae, rec_b.attrs["IssuerOfPatientID"], rec_b.attrs.get(ISSUER_ASSIGNED_KEY)) == (
            "PACS_B", "HOSP_B", "Y")
        assert (rec_a.attrs["IssuerOfPatientID"], rec_a.attrs.get(ISSUER_ASSIGNED_KEY)) == ("HOSP_A", None)
    finally:
        idx.close()


def _get_patient_root(port: int, identifier: dict[str, str], sop_class: str) -> tuple[int, set[str]]:
    """A Patient Root C-GET; returns (final status, SOP Instance UIDs received)."""
    ae = AE(ae_title="TESTSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(PatientRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(sop_class, ALL_TRANSFER_SYNTAXES[:])
    got: set[str] = set()

    def on_store(event: Any) -> int:
        got.add(str(event.dataset.SOPInstanceUID))
        return 0

    ds = Dataset()
    for k, v in identifier.items():
        setattr(ds, k, v)
    assoc = ae.associate("127.0.0.1", port, ae_title="VNA", ext_neg=[build_role(sop_class, scp_role=True)],
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    final = -1
    try:
        for status, _ in assoc.send_c_get(ds, PatientRootQueryRetrieveInformationModelGet):
            if status is not None and "Status" in status and status.Status not in (0xFF00, 0xFF01):
                final = int(status.Status)
    finally:
        assoc.release()
    return final, got


def test_patient_level_retrieve_sends_only_the_patient_of_the_issuer(
        make_server: Callable[..., VnaServer], storescp: StoreScp, tmp_path: Path) -> None:
    """C-MOVE (DCMTK movescu) and C-GET at PATIENT level by (PatientID, IssuerOfPatientID) with two
    patients "12345" send only the requested one's instances, never a study that merely lists the ID
    in Other Patient IDs; an issuer alone is not a unique key (refused, nothing sent)."""
    srv = make_server(CONFIG + f'[[dicom.remote]]\nae_title = "DEST"\nhost = "127.0.0.1"\nport = {storescp.port}\n')
    out = tmp_path / "sent"
    out.mkdir()
    a = _write(out, 0, 41, PatientID="12345", IssuerOfPatientID="HOSP_A", PatientName="ALPHA^ANNA")
    b = _write(out, 0, 42, PatientID="12345", PatientName="BETA^BERT")  # HOSP_B assigned by [[dicom.sender]]
    linked = _write(out, 0, 43, PatientID="A-1", IssuerOfPatientID="HOSP_A", PatientName="GAMMA^GUS")
    _add_other_patient_id(linked, "12345", "HOSP_B")  # lists B's patient as another ID
    _storescu(srv.port, "PACS_A", a + linked)
    _storescu(srv.port, "PACS_B", b)
    sops = {name: {str(dcmread(p).SOPInstanceUID) for p in paths} for name, paths in
            (("a", a), ("b", b), ("linked", linked))}
    # a query follows the other ID (documented); a retrieve must not
    assert len(_find(srv.port, "STUDY", PatientID="12345", IssuerOfPatientID="HOSP_B")) == 2

    r = subprocess.run(["movescu", "-P", "-aec", "VNA", "-aem", "DEST", "-k", "QueryRetrieveLevel=PATIENT",
                        "-k", "PatientID=12345", "-k", "IssuerOfPatientID=HOSP_B", "127.0.0.1", str(srv.port)],
                       env=DCMTK_ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    moved = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in storescp.files()}
    assert moved == sops["b"]

    sop_class = str(dcmread(a[0]).SOPClassUID)
    for ident, want in (({"PatientID": "12345", "IssuerOfPatientID": "HOSP_A"}, sops["a"]),
                        ({"PatientID": "12345", "IssuerOfPatientID": "HOSP_B"}, sops["b"]),
                        ({"PatientID": "12345"}, sops["a"] | sops["b"]),
                        ({"PatientID": "A-1", "IssuerOfPatientID": "HOSP_A"}, sops["linked"])):
        status, got = _get_patient_root(srv.port, {"QueryRetrieveLevel": "PATIENT", **ident}, sop_class)
        assert (status, got) == (0x0000, want), ident
    status, got = _get_patient_root(srv.port, {"QueryRetrieveLevel": "PATIENT", "PatientID": "",
                                               "IssuerOfPatientID": "HOSP_A"}, sop_class)
    assert (status, got) == (0xA900, set()), hex(status)


def test_grpc_source_name_gets_no_assigned_issuer(make_server: Callable[..., VnaServer], tmp_path: Path) -> None:
    """The issuer of a [[dicom.sender]] is assigned by the calling AE of a DIMSE association only: a gRPC
    Store that names that AE as its free-form source gets none (unless the object carries one)."""
    from tests.integration.test_grpc import WRITE, grpc_config  # the gRPC test suite's server config
    from vna.api.client import VnaClient

    grpc_port = free_port()
    srv = make_server(CONFIG + grpc_config(grpc_port))
    out = tmp_path / "sent"
    out.mkdir()
    via_grpc = _write(out, 0, 51, PatientID="777", PatientName="DELTA^DORA")
    via_dimse = _write(out, 0, 52, PatientID="777", PatientName="DELTA^DORA")
    with VnaClient(f"127.0.0.1:{grpc_port}", WRITE, timeout=60) as client:
        for p in via_grpc:
            client.store(p, source_name="PACS_B")
    _storescu(srv.port, "PACS_B", via_dimse)
    study_grpc, study_dimse = (str(dcmread(x[0]).StudyInstanceUID) for x in (via_grpc, via_dimse))
    rows = _find(srv.port, "STUDY", PatientID="777")
    assert sorted((str(r.StudyInstanceUID), str(r.get("IssuerOfPatientID", ""))) for r in rows) == sorted(
        [(study_grpc, ""), (study_dimse, "HOSP_B")])
    assert [str(r.StudyInstanceUID) for r in _find(srv.port, "STUDY", PatientID="777",
                                                   IssuerOfPatientID="HOSP_B")] == [study_dimse]


def test_audit_trail_tells_two_patients_12345_apart(make_server: Callable[..., VnaServer], tmp_path: Path) -> None:
    """Stores, queries and retrieves name the patient ``ID^^^Issuer`` in the audit trail (the carried or
    the assigned issuer); `vna audit search --patient` finds one domain's, or by the bare ID both."""
    import json

    srv = make_server(CONFIG)
    out = tmp_path / "sent"
    out.mkdir()
    a = _write(out, 0, 61, PatientID="12345", IssuerOfPatientID="HOSP_A", PatientName="ALPHA^ANNA")
    b = _write(out, 0, 62, PatientID="12345", PatientName="BETA^BERT")  # HOSP_B assigned by [[dicom.sender]]
    _storescu(srv.port, "PACS_A", a)
    _storescu(srv.port, "PACS_B", b)
    study_b = str(dcmread(b[0]).StudyInstanceUID)
    assert len(_find(srv.port, "STUDY", PatientID="12345", IssuerOfPatientID="HOSP_B")) == 1
    _, final, _ = scu.get(srv.port, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study_b},
                          [str(dcmread(b[0]).SOPClassUID)])
    assert final.Status == 0x0000

    def search(patient: str) -> list[dict[str, Any]]:
        r = srv.cli("audit", "search", "--json", "--patient", patient)
        assert r.returncode == 0, r.stderr
        return list(json.loads(r.stdout))

    got_b = {(r["event_id"], r["action"]): r["patient_ids"] for r in search("12345^^^HOSP_B")}
    assert got_b == {("110104", "C"): ["12345^^^HOSP_B"], ("110112", "E"): ["12345^^^HOSP_B"],
                     ("110104", "R"): ["12345^^^HOSP_B"]}
    assert {tuple(r["patient_ids"]) for r in search("12345^^^HOSP_A")} == {("12345^^^HOSP_A",)}
    (stored_a,) = search("12345^^^HOSP_A")              # one association, one study: one record
    assert stored_a["details"]["count"] == len(a)
    assert len(search("12345")) == 4  # the two associations' stores, the query and the retrieve
