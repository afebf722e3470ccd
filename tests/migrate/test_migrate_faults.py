"""Faults during a migration from a real Orthanc: the source killed -9 mid-study, a study held longer than a lease,
a runner killed -9 or frozen mid-study. A :class:`HoldingRelay` between Orthanc and vna's receiver lets one
instance of the study through and holds the next, so "mid-study" is a state the test waits for, not a race.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

from benchmarks.corpus import write_corpus
from tests.conftest import DCMTK_ENV, ROOT, VNA, VnaServer, free_port, stop_process, uid_of
from tests.migrate.conftest import HoldingRelay, cli_json, source_config
from tests.migrate.test_migrate_dcmqrscp import assert_byte_identical, open_archive
from tests.migrate.test_migrate_orthanc import start_orthanc

from vna.migrate.ledger import SqliteLedger, new_owner


class Rig:
    """vna, a relay that holds the source's C-STOREs after about one instance, and Orthanc (the source)."""

    def __init__(self, make_server: Callable[..., VnaServer], relay: Callable[[int, int], HoldingRelay],
                 work: Path, files: list[Path], **extra: Any) -> None:
        self.files = files
        self.work = work
        self.srv = make_server(start=False, config="")
        big = max(f.stat().st_size for f in files)
        self.relay = relay(self.srv.port, big + big // 2)   # the first instance passes, the second cannot
        self.port = free_port()
        self.srv.config.write_text(source_config(self.port, max_associations=1, **extra))
        self.srv.start()
        self.orthanc = self.start_source()
        r = subprocess.run(["storescu", "-aec", "PACS", "127.0.0.1", str(self.port), *map(str, files)],
                           capture_output=True, env=DCMTK_ENV, timeout=120)
        assert r.returncode == 0, r.stderr
        assert cli_json(self.srv, "plan", "--source", "PACS")[0] == 0

    def start_source(self) -> subprocess.Popen[bytes]:
        self.orthanc = start_orthanc(self.work / "orthanc", self.relay.port, limit=0, port=self.port)[0]
        return self.orthanc

    def run(self, *args: str) -> subprocess.Popen[str]:
        """``vna migrate run --json`` in the background."""
        return subprocess.Popen([*VNA, "migrate", "run", "--json", *args, "--config", str(self.srv.config),
                                 "--data-dir", str(self.srv.data_dir)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ})

    def held(self, study_uid: str, archive: Any = None) -> int:
        """Instances of the study vna holds with their digest."""
        if archive is not None:
            return sum(1 for i in archive.index.study_instances(study_uid) if i.content_sha256)
        archive = open_archive(self.srv)
        try:
            return self.held(study_uid, archive)
        finally:
            archive.close()

    def wait_mid_study(self, study_uid: str, proc: subprocess.Popen[str]) -> None:
        """Until vna holds the study's first instance (the relay then holds the second)."""
        deadline = time.monotonic() + 120
        archive = open_archive(self.srv)
        try:
            while self.held(study_uid, archive) == 0:
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < deadline, "no instance of the study arrived"
                time.sleep(0.05)
        finally:
            archive.close()

    def ledger(self) -> SqliteLedger:
        return SqliteLedger(self.srv.data_dir / "index.sqlite")

    def close(self) -> None:
        stop_process(self.orthanc, 10)


def report_of(proc: subprocess.Popen[str]) -> tuple[int, dict[str, Any]]:
    out, err = proc.communicate(timeout=180)
    assert out.strip(), err
    return proc.returncode, json.loads(out)


def one_study(tmp_path: Path, n: int = 4, seed: int = 31) -> tuple[list[Path], str]:
    files = write_corpus(tmp_path / "corpus", "ct", studies=1, per_study=n, seed=seed)
    return files, uid_of(files[0], "StudyInstanceUID")


def test_source_killed_mid_study_then_restarted_completes_without_duplicates(
        make_server: Callable[..., VnaServer], holding_relay: Callable[[int, int], HoldingRelay],
        tmp_path: Path) -> None:
    files, study = one_study(tmp_path)
    rig = Rig(make_server, holding_relay, tmp_path, files, **{"migrate.retry_seconds": 0})
    try:
        run = rig.run("--limit", "1")
        rig.wait_mid_study(study, run)
        rig.orthanc.send_signal(signal.SIGKILL)   # the source dies while the study moves
        rig.orthanc.wait(10)
        rig.relay.release()
        rc, report = report_of(run)
        (detail,) = report["details"]
        assert rc == 1 and detail["state"] == "failed" and detail["missing"]   # never done early
        assert 1 <= rig.held(study) < len(files)
        led = rig.ledger()
        row = led.get("PACS", study)
        led.close()
        assert row is not None and row.state == "failed" and row.missing and row.attempts == 1

        rig.start_source()   # same port, same storage
        rc, report, err = cli_json(rig.srv, "run")
        assert rc == 0, err
        assert [d["state"] for d in report["details"]] == ["done"]
        rc, rep, _ = cli_json(rig.srv, "report")
        assert rc == 0 and rep["studies"][0]["archived_instances"] == len(files) == \
            rep["studies"][0]["expected_instances"]
        assert_byte_identical(rig.srv, files)   # version 1 of each, nothing duplicated
    finally:
        rig.close()


def test_a_study_held_longer_than_its_lease_is_not_taken_over(
        make_server: Callable[..., VnaServer], holding_relay: Callable[[int, int], HoldingRelay],
        tmp_path: Path) -> None:
    files, study = one_study(tmp_path)
    lease = 2.0
    rig = Rig(make_server, holding_relay, tmp_path, files, **{"migrate.lease_seconds": lease})
    try:
        run = rig.run()
        rig.wait_mid_study(study, run)
        seen = time.time()   # the lease was taken before this, so it expired by seen + lease unless renewed
        led = rig.ledger()
        try:
            while time.time() < seen + 2 * lease:
                time.sleep(0.1)
            assert led.claim("PACS", new_owner(), lease, time.time(), 10, 5) == []   # another runner
        finally:
            led.close()
        rig.relay.release()
        rc, report = report_of(run)
        assert rc == 0 and [d["state"] for d in report["details"]] == ["done"]
        assert_byte_identical(rig.srv, files)
    finally:
        rig.close()


def test_a_runner_killed_mid_study_is_taken_over(
        make_server: Callable[..., VnaServer], holding_relay: Callable[[int, int], HoldingRelay],
        tmp_path: Path) -> None:
    files, study = one_study(tmp_path)
    rig = Rig(make_server, holding_relay, tmp_path, files)   # lease_seconds: the default (600)
    try:
        run = rig.run()
        rig.wait_mid_study(study, run)
        run.send_signal(signal.SIGKILL)
        run.communicate(timeout=30)
        rig.relay.release()
        rc, report, err = cli_json(rig.srv, "run")   # the dead runner's lease is taken over at once
        assert rc == 0, err
        assert [d["state"] for d in report["details"]] == ["done"]
        assert_byte_identical(rig.srv, files)
    finally:
        rig.close()


def test_a_frozen_runner_loses_its_expired_lease_to_another(
        make_server: Callable[..., VnaServer], holding_relay: Callable[[int, int], HoldingRelay],
        tmp_path: Path) -> None:
    """A runner that stops renewing (frozen, or on a host that is gone) loses the study when its lease
    expires; when it wakes up its outcome is refused, and the study is done once."""
    files, study = one_study(tmp_path)
    lease = 2.0
    rig = Rig(make_server, holding_relay, tmp_path, files, **{"migrate.lease_seconds": lease})
    try:
        frozen = rig.run()
        rig.wait_mid_study(study, frozen)
        frozen.send_signal(signal.SIGSTOP)
        try:
            stopped = time.time()
            rig.relay.release()
            while time.time() < stopped + 2 * lease:
                time.sleep(0.1)
            rc, report, err = cli_json(rig.srv, "run")
            assert rc == 0, err
            assert [d["state"] for d in report["details"]] == ["done"]
        finally:
            frozen.send_signal(signal.SIGCONT)
        rc, late = report_of(frozen)
        assert [d["state"] for d in late["details"]] == ["lost-lease"]
        led = rig.ledger()
        row = led.get("PACS", study)
        led.close()
        assert row is not None and row.state == "done" and row.attempts == 1
        assert_byte_identical(rig.srv, files)
    finally:
        rig.close()
