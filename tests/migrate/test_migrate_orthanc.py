"""Migration from a real Orthanc with ``LimitFindResults`` set low (adaptive window splitting), via the CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from benchmarks.corpus import write_corpus
from tests.conftest import DCMTK_ENV, VnaServer, free_port, stop_process, uid_of
from tests.migrate.conftest import cli_json, source_config
from tests.migrate.test_migrate_dcmqrscp import assert_byte_identical


def start_orthanc(work: Path, vna_port: int, limit: int, aet: str = "PACS",
                  port: int | None = None) -> tuple[subprocess.Popen[bytes], int]:
    """An Orthanc (DICOM ``port``, free when None) whose storage is under ``work`` (kept across restarts),
    sending C-MOVE sub-operations for ``VNA`` to ``vna_port``."""
    exe = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
    if not Path(exe).exists():
        pytest.fail("Orthanc is missing: run `make system-deps`")
    port, http = port or free_port(), free_port()
    cfg = {"Name": "legacy", "StorageDirectory": str(work / "storage"), "IndexDirectory": str(work / "index"),
           "DicomAet": aet, "DicomPort": port, "HttpPort": http, "DicomCheckCalledAet": False,
           "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "Plugins": [],
           "LimitFindResults": limit, "DicomAlwaysAllowFind": True, "DicomAlwaysAllowMove": True,
           "DicomAlwaysAllowGet": True, "DicomModalities": {"vna": ["VNA", "127.0.0.1", vna_port]}}
    work.mkdir(parents=True, exist_ok=True)
    (work / "orthanc.json").write_text(json.dumps(cfg))
    log = open(work / "orthanc.log", "wb")
    proc = subprocess.Popen([exe, str(work / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT,
                            env=DCMTK_ENV, cwd=work)
    log.close()
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http}/system", timeout=2):
                return proc, port
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((work / "orthanc.log").read_text()[-2000:]) from None
            time.sleep(0.1)


@pytest.fixture
def orthanc_source(make_server: Callable[..., VnaServer], tmp_path: Path) -> Iterator[tuple[VnaServer, list[Path]]]:
    files = (write_corpus(tmp_path / "more", "small", studies=10, per_study=2, seed=21)
             + write_corpus(tmp_path / "more", "ct", studies=2, per_study=2, seed=22))
    srv = make_server(start=False, config="")
    proc, port = start_orthanc(tmp_path / "orthanc", srv.port, limit=3)
    try:
        srv.config.write_text(source_config(port, max_associations=2))
        srv.start()
        r = subprocess.run(["storescu", "-aec", "PACS", "127.0.0.1", str(port), *map(str, files)],
                           capture_output=True, env=DCMTK_ENV, timeout=120)
        assert r.returncode == 0, r.stderr
        yield srv, files
    finally:
        stop_process(proc, 10)


def test_capped_orthanc_is_planned_completely_and_migrated(orthanc_source: Any) -> None:
    srv, files = orthanc_source
    studies = {uid_of(f, "StudyInstanceUID") for f in files}
    rc, plan, err = cli_json(srv, "plan", "--source", "PACS")
    assert rc == 0, err
    assert plan["studies"] == len(studies) and plan["queries"] > len(studies) // 3   # windows were split
    rc, report, err = cli_json(srv, "run")
    assert rc == 0, err
    assert report["done"] == len(studies)
    rc, rep, _ = cli_json(srv, "report")
    assert rc == 0 and all(s["expected_instances"] == s["archived_instances"] for s in rep["studies"])
    assert_byte_identical(srv, files)
