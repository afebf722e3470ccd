"""Migration from a real DIMSE source (DCMTK dcmqrscp) into a real vna server, through the ``vna`` CLI."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from benchmarks.corpus import write_corpus
from tests.conftest import ROOT, VNA, VnaServer, dataset_bytes, free_port, uid_of
from tests.migrate.conftest import QrScp, cli_json, source_config


def open_archive(srv: VnaServer) -> Any:
    from vna.archive import Archive
    from vna.config import load_config

    return Archive(load_config(srv.config, overrides={"archive": {"data_dir": str(srv.data_dir)}}))


def assert_byte_identical(srv: VnaServer, files: list[Path]) -> None:
    """Every source file is in vna once (version 1), its data set byte-identical to what vna stored."""
    archive = open_archive(srv)
    try:
        for f in files:
            sop = uid_of(f)
            rec = archive.index.get_instance(sop)
            assert rec is not None and rec.version == 1 and rec.content_sha256, sop
            with archive.retrieve.open_verified(sop) as v:
                assert dataset_bytes(v.path) == dataset_bytes(f), sop
        studies = {uid_of(f, "StudyInstanceUID") for f in files}
        held = sum(len(archive.index.study_instances(s)) for s in studies)
        assert held == len(files)   # nothing duplicated, nothing extra
    finally:
        archive.close()


@pytest.fixture
def migration(make_server: Callable[..., VnaServer],
              make_qrscp: Callable[..., QrScp]) -> Iterator[Callable[..., tuple[VnaServer, QrScp]]]:
    def setup(files: list[Path], **extra: Any) -> tuple[VnaServer, QrScp]:
        qr_port = free_port()
        srv = make_server(source_config(qr_port, **extra))
        return srv, make_qrscp(files, srv.port, qr_port)
    yield setup


def test_plan_then_run_migrates_every_study_byte_identically(migration: Any, corpus: list[Path]) -> None:
    srv, qr = migration(corpus, max_associations=2)
    rc, plan, err = cli_json(srv, "plan", "--source", "PACS")
    assert rc == 0, err
    studies = {uid_of(f, "StudyInstanceUID") for f in corpus}
    assert plan["studies"] == len(studies) and plan["new"] == len(studies)
    rc, report, err = cli_json(srv, "run")
    assert rc == 0, err
    assert report["done"] == len(studies) and report["findings"] == 0
    assert_byte_identical(srv, qr.files)

    rc, status, _ = cli_json(srv, "status")
    assert rc == 0
    (row,) = status
    assert (row["source"], row["studies"], row["studies_done"], row["instances_done"]) == \
        ("PACS", len(studies), len(studies), len(corpus))
    assert row["instances_remaining"] == 0 and row["eta_seconds"] == 0
    assert row["bytes_done"] > 0

    rc, rep, _ = cli_json(srv, "report")
    assert rc == 0 and rep["not_done"] == 0
    for s in rep["studies"]:
        assert s["state"] == "done" and s["missing"] == [] and s["archived_instances"] == s["expected_instances"]

    # idempotent: a new plan finds nothing new, a new run has nothing to do
    rc, plan, _ = cli_json(srv, "plan", "--source", "PACS")
    assert rc == 0 and plan["new"] == 0
    rc, report, _ = cli_json(srv, "run")
    assert rc == 0 and report["examined"] == 0


def test_plan_window_restricts_by_study_date(migration: Any, corpus: list[Path]) -> None:
    srv, _ = migration(corpus)
    dates = sorted({uid_of(f, "StudyDate") for f in corpus})
    rc, plan, err = cli_json(srv, "plan", "--source", "PACS", "--from", dates[0], "--to", dates[0])
    assert rc == 0, err
    assert plan["studies"] == len({uid_of(f, "StudyInstanceUID") for f in corpus
                                   if uid_of(f, "StudyDate") == dates[0]})


def test_study_the_source_cannot_send_completely_is_reported_not_done(migration: Any, corpus: list[Path]) -> None:
    srv, qr = migration(corpus, **{"migrate.max_attempts": 1})
    assert cli_json(srv, "plan", "--source", "PACS")[0] == 0
    broken = qr.files[0]
    broken_study = uid_of(broken, "StudyInstanceUID")
    broken.unlink()   # still listed by C-FIND (its index), but its C-MOVE sub-operation fails
    rc, report, _ = cli_json(srv, "run")
    assert rc == 1 and report["findings"] == 1
    rc, rep, _ = cli_json(srv, "report")
    assert rc == 1 and rep["not_done"] == 1
    (bad,) = [s for s in rep["studies"] if s["state"] != "done"]
    assert bad["study_uid"] == broken_study and bad["state"] == "failed"
    assert bad["missing"] == [uid_of(corpus[0])]
    assert bad["dimse_status"] is not None and bad["dimse_status"] != "0x0000"
    assert bad["archived_instances"] == bad["expected_instances"] - 1
    text = srv.cli("migrate", "report")
    assert text.returncode == 1 and uid_of(corpus[0]) in text.stdout
    rc, status, _ = cli_json(srv, "status")
    assert status[0]["studies_failed"] == 1 and status[0]["studies_done"] == len(rep["studies"]) - 1
    # max_attempts reached: a new run does not retry it, and it is never marked done
    rc, report, _ = cli_json(srv, "run")
    assert report["examined"] == 0
    assert_byte_identical(srv, [f for f in qr.files if f.exists()])


def test_kill_9_mid_run_then_run_again_completes_without_duplicates(migration: Any, tmp_path: Path) -> None:
    files = write_corpus(tmp_path / "big", "small", studies=8, per_study=3, seed=11)
    srv, qr = migration(files, max_associations=1, instances_per_second=6.0)
    assert cli_json(srv, "plan", "--source", "PACS")[0] == 0
    proc = subprocess.Popen([*VNA, "migrate", "run", "--config", str(srv.config), "--data-dir", str(srv.data_dir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT, env={**os.environ})
    deadline = time.monotonic() + 120
    done = 0
    while time.monotonic() < deadline and proc.poll() is None:
        rc, status, _ = cli_json(srv, "status")
        done = status[0]["studies_done"] if status else 0
        if done >= 2:
            break
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    rc, status, _ = cli_json(srv, "status")
    assert 2 <= status[0]["studies_done"] < 8
    rc, report, err = cli_json(srv, "run")
    assert rc == 0, err
    rc, rep, _ = cli_json(srv, "report")
    assert rc == 0 and rep["done"] == 8
    assert_byte_identical(srv, qr.files)
    rc, status, _ = cli_json(srv, "status")
    assert status[0]["instances_done"] == len(files)


def test_unknown_source_is_a_usage_error(migration: Any, corpus: list[Path]) -> None:
    srv, _ = migration(corpus)
    r = srv.cli("migrate", "plan", "--source", "NOPE")
    assert r.returncode == 2 and "NOPE" in r.stderr
    r = srv.cli("migrate", "run", "--limit", "0")
    assert r.returncode == 2


def test_c_get_source_is_migrated_byte_identically(migration: Any, corpus: list[Path]) -> None:
    srv, qr = migration(corpus, method="get", max_associations=2)
    assert cli_json(srv, "plan", "--source", "PACS")[0] == 0
    rc, report, err = cli_json(srv, "run")
    assert rc == 0, err
    assert report["done"] == len({uid_of(f, "StudyInstanceUID") for f in corpus})
    assert_byte_identical(srv, qr.files)
    archive = open_archive(srv)
    try:
        assert {archive.index.get_instance(uid_of(f)).source_ae for f in corpus} == {"PACS"}  # type: ignore[union-attr]
    finally:
        archive.close()


def test_daemon_in_vna_serve_migrates_planned_studies(migration: Any, corpus: list[Path]) -> None:
    srv, qr = migration(corpus, **{"migrate.enabled": True, "migrate.interval_seconds": 0.5})
    assert cli_json(srv, "plan", "--source", "PACS")[0] == 0
    studies = len({uid_of(f, "StudyInstanceUID") for f in corpus})
    deadline = time.monotonic() + 120
    done = 0
    while time.monotonic() < deadline and done < studies:
        done = cli_json(srv, "status")[1][0]["studies_done"]
    assert done == studies
    assert srv.cli("migrate", "report").returncode == 0
    assert_byte_identical(srv, qr.files)
