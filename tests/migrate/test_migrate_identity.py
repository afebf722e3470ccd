"""Two migration sources with colliding Patient IDs and different issuers (issue 22), real peers, via the CLI.

dcmqrscp (AE ``PACS``) holds hospital A's patient "12345" with IssuerOfPatientID HOSP_A in
its objects; Orthanc (AE ``PACS_B``) holds hospital B's patient "12345" with no issuer, and
its ``[[migrate.source]]`` entry assigns HOSP_B. After the migration: two patients, each
query by (ID, issuer) finds only its studies, every migrated data set byte-identical.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any, Callable

from pydicom import dcmread

from benchmarks.corpus import write_corpus
from tests.conftest import DCMTK_ENV, VnaServer, free_port, stop_process, uid_of
from tests.integration import scu
from tests.migrate.conftest import QrScp, cli_json
from tests.migrate.test_migrate_dcmqrscp import assert_byte_identical
from tests.migrate.test_migrate_orthanc import start_orthanc


def _corpus(out: Path, seed: int, **attrs: Any) -> list[Path]:
    files = write_corpus(out, "small", studies=2, per_study=2, seed=seed)
    for f in files:
        ds = dcmread(f)
        for k, v in attrs.items():
            setattr(ds, k, v)
        ds.save_as(f, enforce_file_format=True)
    return files


def _find(port: int, level: str, **keys: str) -> list[tuple[str, ...]]:
    ident: dict[str, Any] = {"QueryRetrieveLevel": level, "PatientID": "", "IssuerOfPatientID": ""}
    ident |= {"NumberOfPatientRelatedStudies": ""} if level == "PATIENT" else {"StudyInstanceUID": ""}
    found, status = scu.find(port, ident | keys, patient_root=level == "PATIENT")
    assert status == 0x0000, hex(status)
    last = "NumberOfPatientRelatedStudies" if level == "PATIENT" else "StudyInstanceUID"
    return sorted((str(d.PatientID), str(d.IssuerOfPatientID), str(d[last].value)) for d in found)


def test_two_sources_with_colliding_patient_ids_are_two_patients(
        make_server: Callable[..., VnaServer], make_qrscp: Callable[..., QrScp], tmp_path: Path) -> None:
    files_a = _corpus(tmp_path / "a", 41, PatientID="12345", IssuerOfPatientID="HOSP_A", PatientName="ALPHA^ANNA")
    files_b = _corpus(tmp_path / "b", 42, PatientID="12345", PatientName="BETA^BERT")
    srv = make_server(start=False)
    qr_port = free_port()
    proc, orthanc_port = start_orthanc(tmp_path / "orthanc", srv.port, limit=100, aet="PACS_B")
    try:
        srv.config.write_text(
            f'[[migrate.source]]\nae_title = "PACS"\nhost = "127.0.0.1"\nport = {qr_port}\n'
            f'[[migrate.source]]\nae_title = "PACS_B"\nhost = "127.0.0.1"\nport = {orthanc_port}\n'
            'issuer_of_patient_id = "HOSP_B"\n')
        srv.start()
        make_qrscp(files_a, srv.port, qr_port)
        r = subprocess.run(["storescu", "-aec", "PACS_B", "127.0.0.1", str(orthanc_port), *map(str, files_b)],
                           capture_output=True, env=DCMTK_ENV, timeout=120)
        assert r.returncode == 0, r.stderr
        for source in ("PACS", "PACS_B"):
            rc, plan, err = cli_json(srv, "plan", "--source", source)
            assert rc == 0 and plan["studies"] == 2, (source, plan, err)
        rc, report, err = cli_json(srv, "run")
        assert rc == 0 and report["done"] == 4, (report, err)

        studies_a = sorted({uid_of(f, "StudyInstanceUID") for f in files_a})
        studies_b = sorted({uid_of(f, "StudyInstanceUID") for f in files_b})
        assert _find(srv.port, "PATIENT", PatientID="12345") == [("12345", "HOSP_A", "2"), ("12345", "HOSP_B", "2")]
        assert _find(srv.port, "STUDY", PatientID="12345", IssuerOfPatientID="HOSP_A") == [
            ("12345", "HOSP_A", s) for s in studies_a]
        assert _find(srv.port, "STUDY", PatientID="12345", IssuerOfPatientID="HOSP_B") == [
            ("12345", "HOSP_B", s) for s in studies_b]
        assert _find(srv.port, "STUDY", PatientID="12345") == sorted(
            [("12345", "HOSP_A", s) for s in studies_a] + [("12345", "HOSP_B", s) for s in studies_b])
        assert_byte_identical(srv, files_a + files_b)  # the assigned issuer is in the index only
    finally:
        stop_process(proc, 10)
