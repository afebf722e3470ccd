"""Long jobs through the CLI (issue 20): progress (a bar on a terminal, log lines elsewhere), what a
limited run left, what a default hid, summaries printed once, read-only verbs that create nothing,
and the lifecycle's plan/release/estimate/bytes."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import termios
from pathlib import Path
from typing import Callable

import pytest

from tests.conftest import ROOT, VNA, VnaServer

Factory = Callable[..., VnaServer]

LIFECYCLE = "[archive]\nmin_copies = 1\n[lifecycle]\nmin_age_days = 0\n"


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("VNA_")}


@pytest.fixture
def archive(make_server: Factory, corpus: list[Path]) -> VnaServer:
    """An archive (not serving) holding the corpus: 12 instances, 2 hot replicas, 4 studies."""
    srv = make_server(LIFECYCLE, start=False)
    r = srv.cli("store", *map(str, corpus))
    assert r.returncode == 0, r.stderr
    return srv


def _on_terminal(srv: VnaServer, *args: str) -> tuple[int, str, str]:
    """Run a verb with stderr on a pseudo-terminal (100 columns): (exit code, terminal output, stdout)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen([*VNA, *args, "--config", str(srv.config), "--data-dir", str(srv.data_dir)],
                            stdout=subprocess.PIPE, stderr=slave, cwd=ROOT, env=_env())
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed its end
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    assert proc.stdout is not None
    out = proc.stdout.read().decode()
    return proc.wait(timeout=120), b"".join(chunks).decode(errors="replace"), out


def test_scrub_draws_a_bar_on_a_terminal(archive: VnaServer) -> None:
    code, term, out = _on_terminal(archive, "integrity", "scrub", "--limit", "5")
    assert code == 0, (term, out)
    assert re.search(r"integrity\.scrub: checking copies: .*\d/5 \[", term), term
    assert "copies/s" in term, term
    assert "Traceback" not in term


def test_store_of_a_directory_draws_a_bar_on_a_terminal(make_server: Factory, corpus_dir: Path) -> None:
    srv = make_server(start=False)
    code, term, out = _on_terminal(srv, "store", str(corpus_dir))
    assert code == 0, (term, out)
    assert re.search(r"store: storing files: .*\d+/12 \[", term), term
    assert out.rstrip().endswith("12 stored, 0 duplicates, 0 failed")


@pytest.mark.parametrize("verb", [("integrity", "scrub"), ("integrity", "repair"), ("integrity", "orphans"),
                                  ("lifecycle", "run")])
def test_jobs_log_progress_lines_when_not_on_a_terminal(archive: VnaServer, verb: tuple[str, str]) -> None:
    if verb[1] == "repair":  # two copies to rebuild
        for blob in sorted((archive.data_dir / "hot" / "r1").rglob("*.dcm"))[:2]:
            blob.unlink()
        assert archive.cli("integrity", "scrub").returncode == 1
    r = archive.cli(*verb, "--limit", "3", "--progress-every", "0")
    assert r.returncode == 0, r.stderr
    assert re.search(r"INFO vna\.progress .*: \d+ of 3 \w+ \([\d.]+/s", r.stderr), r.stderr


def test_store_logs_progress_lines_when_not_on_a_terminal(make_server: Factory, corpus_dir: Path) -> None:
    srv = make_server(start=False)
    r = srv.cli("store", "--progress-every", "0", str(corpus_dir))
    assert r.returncode == 0, r.stderr
    assert "store: storing files: 12 of 12 files" in r.stderr, r.stderr


def test_a_scrub_stopped_at_its_limit_says_how_much_is_left_and_prints_its_summary_once(
        archive: VnaServer) -> None:
    r = archive.cli("integrity", "scrub", "--limit", "5")
    assert r.returncode == 0, r.stderr
    assert "19 not examined, run again or raise integrity.batch_limit" in r.stdout, r.stdout
    assert r.stdout.count("integrity.scrub") == 1 and "integrity.scrub" not in r.stderr, (r.stdout, r.stderr)
    r = archive.cli("integrity", "scrub", "--limit", "5", "--json")
    assert json.loads(r.stdout)["not_examined"] == 19
    r = archive.cli("integrity", "scrub")
    assert "not examined" not in r.stdout, r.stdout


def test_a_lifecycle_run_stopped_at_its_limit_says_studies_are_left(archive: VnaServer) -> None:
    r = archive.cli("lifecycle", "run", "--limit", "1")
    assert r.returncode == 0, r.stderr
    assert "3 not examined, run again or raise lifecycle.batch_limit" in r.stdout, r.stdout


def test_orphans_say_how_many_blobs_the_grace_period_hid(archive: VnaServer) -> None:
    (archive.data_dir / "hot" / "r1" / "stray.dcm").write_bytes(b"x" * 10)
    r = archive.cli("integrity", "orphans")
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(r"1 blob younger than the grace period \(86400 s, integrity\.orphan_grace_seconds", r.stdout), \
        r.stdout
    r = archive.cli("integrity", "orphans", "--grace", "0")
    assert r.returncode == 1 and "orphan-blob" in r.stdout and "younger" not in r.stdout, r.stdout


@pytest.mark.parametrize("verb", [("integrity", "report"), ("lifecycle", "plan"), ("sites", "status"),
                                  ("sites", "copy"), ("audit", "verify"), ("audit", "search")])
def test_read_only_verbs_never_create_an_archive(tmp_path: Path, verb: tuple[str, str]) -> None:
    typo = tmp_path / "typo-dir"
    r = subprocess.run([*VNA, *verb, "--data-dir", str(typo)], capture_output=True, text=True, cwd=ROOT,
                       env=_env(), timeout=120)
    if verb[0] == "audit":  # a trail can be checked without its archive (a copy kept for forensics)
        assert r.returncode == 1 and "vna: no audit trail at" in r.stderr, (r.stdout, r.stderr)
    else:
        assert r.returncode == 2, (r.stdout, r.stderr)
        assert "no archive at archive.data_dir" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    assert not typo.exists()


def test_plan_lists_held_studies_and_release_of_an_unheld_study_says_so(archive: VnaServer,
                                                                         corpus: list[Path]) -> None:
    from tests.conftest import uid_of

    study = uid_of(corpus[0], "StudyInstanceUID")
    r = archive.cli("lifecycle", "hold", study, "--reason", "litigation")
    assert r.returncode == 0, r.stdout + r.stderr
    r = archive.cli("lifecycle", "plan")
    assert r.returncode == 0, r.stderr
    assert f"skipped study {study}: 3 instances, due but under legal hold" in r.stdout, r.stdout
    assert "1 held study skipped" in r.stdout
    plan = json.loads(archive.cli("lifecycle", "plan", "--json").stdout)
    assert plan["skipped"] == [{"study": study, "instances": 3, "reason": "legal hold"}]
    other = uid_of(corpus[-1], "StudyInstanceUID")
    r = archive.cli("lifecycle", "release", other)
    assert r.returncode == 1 and f"study {other}: not under legal hold, nothing changed" in r.stdout, r.stdout


def test_plan_and_run_print_bytes_the_same_way(archive: VnaServer) -> None:
    plan = archive.cli("lifecycle", "plan").stdout
    run = archive.cli("lifecycle", "run").stdout
    form = re.compile(r"\d+ bytes \(\d+\.\d [kMGT]?B\)")
    assert form.search(plan.splitlines()[-2]), plan
    assert form.search(run.splitlines()[-1]), run
