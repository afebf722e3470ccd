"""``vna store``: a batch with bad entries (issue 20): each reported, the batch goes on, one summary; parallel,
resumable after kill -9, a JSON report, DICOMDIRs (issue 22)."""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Callable

from pydicom import dcmread

from benchmarks.corpus import write_corpus
from tests.conftest import ROOT, VNA, VnaServer

Factory = Callable[..., VnaServer]


def test_a_batch_with_missing_truncated_and_duplicate_files(tmp_path: Path, corpus: list[Path]) -> None:
    first, second = tmp_path / "first.dcm", tmp_path / "second.dcm"
    shutil.copy(corpus[0], first)
    shutil.copy(corpus[1], second)
    short = tmp_path / "short.dcm"
    short.write_bytes(corpus[2].read_bytes()[:100])  # cut inside the preamble
    text = tmp_path / "notes.dcm"
    text.write_text("not DICOM at all, but long enough to hold a preamble\n" * 4)
    missing = tmp_path / "missing.dcm"
    env = {k: v for k, v in os.environ.items() if not k.startswith("VNA_")}
    r = subprocess.run([*VNA, "store", "--data-dir", str(tmp_path / "data"),
                        str(first), str(missing), str(short), str(text), str(second), str(first)],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    out, err = r.stdout, r.stderr
    assert r.returncode == 1, (out, err)
    assert "Traceback" not in err and "force=True" not in err and "Warning" not in err, err
    assert f"stored {first}" in out and f"stored {second}" in out  # the batch went on after the missing file
    assert f"duplicate {first}" in out
    failed = [ln for ln in err.splitlines() if ln.startswith("failed ")]
    assert len(failed) == 3, err
    assert f"failed {missing}: no such file" in err
    assert any(ln.startswith(f"failed {short}: ") and "truncated" in ln for ln in failed), failed
    assert any(ln.startswith(f"failed {text}: ") and "not a DICOM" in ln for ln in failed), failed
    summary = "2 stored, 1 duplicate, 3 failed"
    assert (out + err).count(summary) == 1 and out.rstrip().endswith(summary), (out, err)


# -- issue 22: parallel, resumable, a report, DICOMDIR ---------------------------------------------------
def _lines(out: str, verb: str) -> dict[str, str]:
    """``verb PATH UID`` lines of ``vna store``: path -> SOP Instance UID."""
    return {p: uid for v, p, uid in (ln.split(" ") for ln in out.splitlines() if ln.startswith(verb + " "))
            if v == verb}


def _instances(srv: VnaServer) -> int:
    r = srv.cli("index", "stats", "--json")
    assert r.returncode == 0, r.stderr
    return int(json.loads(r.stdout)["instances"])


def test_kill_9_then_run_again_stores_every_file_once_and_skips_what_was_recorded(
        make_server: Factory, tmp_path: Path) -> None:
    files = write_corpus(tmp_path / "tree" / "a", "small", studies=3, per_study=30, seed=21)
    files += write_corpus(tmp_path / "tree" / "b", "small", studies=2, per_study=30, seed=22)
    srv = make_server(start=False)
    with open(tmp_path / "first.err", "wb") as err:
        proc = subprocess.Popen([*VNA, "store", "--jobs", "2", "--config", str(srv.config), "--data-dir",
                                 str(srv.data_dir), str(tmp_path / "tree")],
                                stdout=subprocess.PIPE, stderr=err, cwd=ROOT, env=os.environ.copy(), text=True)
        assert proc.stdout is not None
        printed = []
        for line in proc.stdout:
            printed.append(line)
            if sum(ln.startswith("stored ") for ln in printed) == 10:
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait(60)
    assert proc.returncode == -signal.SIGKILL, (printed, (tmp_path / "first.err").read_text())
    first = _lines("".join(printed), "stored")
    assert len(first) == 10
    assert list((srv.data_dir / "imports").glob("*.journal")), "the killed run left its journal"

    r = srv.cli("store", "--jobs", "2", str(tmp_path / "tree"))
    assert r.returncode == 0, r.stderr
    skipped = _lines(r.stdout, "skipped")
    assert set(first.items()) <= set(skipped.items())  # every file the first run said stored is skipped
    again = _lines(r.stdout, "stored") | _lines(r.stdout, "duplicate")
    assert len(skipped) + len(again) == len(files) == 150 and not set(skipped) & set(again)
    assert f"; {len(skipped)} skipped (stored by an earlier run" in r.stdout.splitlines()[-1]
    assert _instances(srv) == 150  # each file stored once
    assert not (srv.data_dir / "imports").exists(), "a complete run deletes its journal"

    r = srv.cli("store", str(tmp_path / "tree"))  # the import is over: a new run sends every file again
    assert r.returncode == 0 and r.stdout.rstrip().endswith("0 stored, 150 duplicates, 0 failed"), r.stdout
    assert _instances(srv) == 150


def test_sigterm_lets_the_files_in_flight_finish_and_keeps_the_journal(make_server: Factory,
                                                                         tmp_path: Path) -> None:
    write_corpus(tmp_path / "tree", "small", studies=3, per_study=30, seed=23)
    srv = make_server(start=False)
    report = tmp_path / "report.json"
    proc = subprocess.Popen([*VNA, "store", "--jobs", "2", "--report", str(report), "--config", str(srv.config),
                             "--data-dir", str(srv.data_dir), str(tmp_path / "tree")],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=ROOT, env=os.environ.copy(),
                            text=True)
    assert proc.stdout is not None
    first = proc.stdout.readline()
    assert first.startswith("stored "), first
    proc.send_signal(signal.SIGTERM)
    out = first + proc.stdout.read()
    assert proc.wait(60) == 1
    assert re.search(r"; interrupted, \d+ of 90 files not examined: run again to resume$", out.rstrip()), out
    rep = json.loads(report.read_text())
    assert rep["interrupted"] and rep["totals"]["stored"] == len(_lines(out, "stored")) < 90
    assert list((srv.data_dir / "imports").glob("*.journal"))
    assert _instances(srv) == rep["totals"]["stored"]


def test_a_run_with_failures_keeps_its_journal_and_the_next_run_retries_only_those(
        make_server: Factory, tmp_path: Path, corpus: list[Path]) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    for f in corpus[:5]:
        shutil.copy(f, tree / f.name)
    bad = tree / corpus[5].name
    bad.write_bytes(corpus[5].read_bytes()[:60])
    srv = make_server(start=False)
    journal = tmp_path / "import.journal"
    r = srv.cli("store", "--journal", str(journal), str(tree))
    assert r.returncode == 1 and r.stdout.rstrip().endswith("5 stored, 0 duplicates, 1 failed"), r.stdout
    assert journal.exists()

    shutil.copy(corpus[5], bad)  # the operator fixes the file
    r = srv.cli("store", "--journal", str(journal), str(tree))
    assert r.returncode == 0, r.stderr
    assert len(_lines(r.stdout, "skipped")) == 5 and list(_lines(r.stdout, "stored")) == [str(bad)], r.stdout
    assert not journal.exists() and not list(tmp_path.glob("import.journal*"))
    assert _instances(srv) == 6


def test_two_imports_with_one_journal_the_second_is_refused(make_server: Factory, tmp_path: Path,
                                                            corpus: list[Path]) -> None:
    srv = make_server(start=False)
    journal = tmp_path / "import.journal"
    with open(tmp_path / "import.journal.lock", "wb") as held:  # as a running vna store holds it
        fcntl.flock(held, fcntl.LOCK_EX)
        r = srv.cli("store", "--journal", str(journal), str(corpus[0]))
    assert r.returncode == 1 and f"another vna store is running with the import journal {journal}" in r.stderr
    assert "stored" not in r.stdout


def test_report_gives_each_refused_file_its_reason_and_dimse_status(make_server: Factory, tmp_path: Path,
                                                                   corpus: list[Path]) -> None:
    srv = make_server(start=False)
    good = tmp_path / "good.dcm"
    shutil.copy(corpus[0], good)
    assert srv.cli("store", str(good)).returncode == 0
    ds = dcmread(good)
    ds.PatientName = "Other^Patient"
    changed = tmp_path / "changed.dcm"
    ds.save_as(changed)
    text = tmp_path / "notes.txt"
    text.write_text("not DICOM at all, but long enough to hold a preamble\n" * 4)
    second = tmp_path / "second.dcm"
    shutil.copy(corpus[1], second)
    report = tmp_path / "report.json"
    r = srv.cli("store", "--report", str(report), str(changed), str(text), str(tmp_path / "missing.dcm"),
                str(second))
    assert r.returncode == 1, r.stderr
    rep = json.loads(report.read_text())
    assert rep["totals"] | {"bytes": 0} == {"files": 4, "examined": 4, "stored": 1, "duplicates": 0, "skipped": 0,
                                            "failed": 3, "ignored": 0, "bytes": 0}
    by_path = {f["path"]: f for f in rep["failed"]}
    assert by_path[str(changed)]["dimse_status"] == "0x0111"
    assert by_path[str(changed)]["category"] == "Failure: Duplicate SOP Instance"
    assert "different content" in by_path[str(changed)]["reason"]
    assert by_path[str(text)]["dimse_status"] == "0xC000"
    assert by_path[str(text)]["reason"].startswith("not a DICOM Part 10 file")
    assert by_path[str(tmp_path / "missing.dcm")] == {"path": str(tmp_path / "missing.dcm"),
                                                       "reason": "no such file or directory", "dimse_status": None,
                                                       "category": "Unreadable file"}
    assert not rep["complete"] and rep["ignored"] == []


def _cd(tmp_path: Path) -> tuple[Path, list[Path]]:
    """A patient CD: a DICOMDIR made by DCMTK dcmmkdir over IMAGES/IMnnnnnn, then names lowercased (as a CD
    mounted with lowercase names shows them), plus a viewer that is not DICOM."""
    src = write_corpus(tmp_path / "src", "small", studies=2, per_study=3, seed=31)
    cd = tmp_path / "cd"
    (cd / "IMAGES").mkdir(parents=True)
    for i, f in enumerate(src, 1):
        shutil.copy(f, cd / "IMAGES" / f"IM{i:06d}")
    r = subprocess.run(["dcmmkdir", "+r", "-Pgp", "--invent", "IMAGES"], cwd=cd, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and (cd / "DICOMDIR").exists(), r.stderr
    (cd / "IMAGES").rename(cd / "images")
    images = []
    for f in sorted((cd / "images").iterdir()):
        images.append(f.rename(f.with_name(f.name.lower())))
    (cd / "VIEWER").mkdir()
    (cd / "VIEWER" / "VIEWER.EXE").write_bytes(b"MZ" + bytes(300))
    (cd / "AUTORUN.INF").write_text("[autorun]\nopen=VIEWER\\VIEWER.EXE\n")
    return cd, images


def test_a_cd_with_a_dicomdir_imports_its_files_and_ignores_the_viewer(make_server: Factory,
                                                                        tmp_path: Path) -> None:
    cd, images = _cd(tmp_path)
    srv = make_server(start=False)
    report = tmp_path / "report.json"
    r = srv.cli("store", "--report", str(report), str(cd))
    assert r.returncode == 0, r.stderr
    assert sorted(_lines(r.stdout, "stored")) == sorted(map(str, images))
    assert str(cd / "DICOMDIR") not in r.stdout + r.stderr  # neither stored nor failed: read
    assert r.stdout.rstrip().endswith("6 stored, 0 duplicates, 0 failed; 2 ignored (not DICOM, not referenced "
                                      "by the DICOMDIR)"), r.stdout
    assert sorted(i["path"] for i in json.loads(report.read_text())["ignored"]) == [
        str(cd / "AUTORUN.INF"), str(cd / "VIEWER" / "VIEWER.EXE")]
    assert _instances(srv) == 6


def test_a_dicomdir_given_as_the_path_imports_what_it_references(make_server: Factory, tmp_path: Path) -> None:
    cd, images = _cd(tmp_path)
    images[2].unlink()
    srv = make_server(start=False)
    r = srv.cli("store", str(cd / "DICOMDIR"))
    assert r.returncode == 1
    assert sorted(_lines(r.stdout, "stored")) == sorted(map(str, images[:2] + images[3:]))
    failed = [ln for ln in r.stderr.splitlines() if ln.startswith("failed ")]
    assert len(failed) == 1 and f"no such file or directory (referenced by {cd / 'DICOMDIR'})" in failed[0], r.stderr
    assert not [ln for ln in r.stderr.splitlines() if ln.startswith("ignored ")]  # the viewer: not even looked at
    assert _instances(srv) == 5


def test_a_damaged_dicomdir_is_reported_and_the_files_beside_it_are_imported(
        make_server: Factory, tmp_path: Path, corpus: list[Path]) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "dicomdir").write_bytes(bytes(128) + b"DICM" + b"\x02\x00\x10\x00UI\xff\x7f")  # cut in its meta
    shutil.copy(corpus[0], tree / "IMAGE1")
    srv = make_server(start=False)
    r = srv.cli("store", str(tree))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert list(_lines(r.stdout, "stored")) == [str(tree / "IMAGE1")]
    assert f"failed {tree / 'dicomdir'}: not a readable DICOMDIR: " in r.stderr, r.stderr
    assert r.stdout.rstrip().endswith("1 stored, 0 duplicates, 1 failed"), r.stdout


NO_DAC = ["setpriv", "--inh-caps=-dac_override,-dac_read_search", "--bounding-set=-dac_override,-dac_read_search"]


def test_an_unreadable_directory_and_file_are_failed_not_skipped_silently(make_server: Factory, tmp_path: Path,
                                                                           corpus: list[Path]) -> None:
    tree = tmp_path / "tree"
    (tree / "locked").mkdir(parents=True)
    shutil.copy(corpus[0], tree / "a.dcm")
    shutil.copy(corpus[1], tree / "locked" / "b.dcm")
    shutil.copy(corpus[2], tree / "c.dcm")
    srv = make_server(start=False)
    (tree / "locked").chmod(0)
    (tree / "c.dcm").chmod(0)
    try:  # as root without the capabilities that read through permissions
        r = subprocess.run([*NO_DAC, *VNA, "store", "--config", str(srv.config), "--data-dir", str(srv.data_dir),
                            str(tree)], capture_output=True, text=True, cwd=ROOT, env=os.environ.copy(), timeout=120)
    finally:
        (tree / "locked").chmod(0o755)
        (tree / "c.dcm").chmod(0o644)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert list(_lines(r.stdout, "stored")) == [str(tree / "a.dcm")]
    assert f"failed {tree / 'locked'}: directory not readable: permission denied" in r.stderr, r.stderr
    assert f"failed {tree / 'c.dcm'}: permission denied" in r.stderr, r.stderr
    assert r.stdout.rstrip().endswith("1 stored, 0 duplicates, 2 failed"), r.stdout
