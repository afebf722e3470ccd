"""Re-sent instances (issue 17) on real `vna serve` processes, with DCMTK storescu/getscu/dcmconv and `vna store`.

- Success means durable: a lost instance (every copy damaged, scrubbed, LastVerifiedCopyLost) re-sent from
  the source is rewritten, reported healthy and retrieves bit-exact; when W verified copies cannot be
  written the re-send is refused, never acknowledged.
- Identity follows the data set: the same data set sent by two paths (`vna store`, storescu) or in another
  uncompressed transfer syntax is a duplicate (Success, stored bytes kept); a changed attribute is still a
  conflict (0x0111 under policy reject, a new version under policy version).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any, Callable

import pytest
from pydicom import dcmread

from tests import conftest
from tests.conftest import DCMTK_ENV, VnaServer, dataset_bytes
from tests.integration.test_integrity import blob_of, blobs, hot, run

Factory = Callable[..., VnaServer]
#: run vna without the capabilities that let root ignore file permissions, so a read-only directory bites
NO_DAC = ["setpriv", "--inh-caps=-dac_override,-dac_read_search", "--bounding-set=-dac_override,-dac_read_search"]
_STATUS = re.compile(r"DIMSE Status\s*:\s*0x([0-9A-Fa-f]{4})")
_COMMENT = re.compile(r"\[([^\]]*)\][^\n]*ErrorComment")


@pytest.fixture
def ct(corpus: list[Path]) -> list[Path]:
    """Two CT studies of three instances each."""
    return [p for p in corpus if p.name.startswith("ct-")]


def uid(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def storescu(srv: VnaServer, files: list[Path], *opts: str) -> list[tuple[int, str]]:
    """Send ``files`` on one association with DCMTK storescu; per file (DIMSE status, error comment)."""
    r = subprocess.run(["storescu", "-d", "-nh", *opts, "-aec", "VNA", "127.0.0.1", str(srv.port), *map(str, files)],
                       capture_output=True, text=True, env=DCMTK_ENV, timeout=120)
    out = r.stdout + r.stderr
    answers = [m for m in re.split(r"Received Store Response", out)[1:]]
    assert len(answers) == len(files), out[-3000:]
    result = []
    for a in answers:
        status = _STATUS.search(a)
        comment = _COMMENT.search(a.split("Sending Store Request")[0])
        assert status is not None, a[:2000]
        result.append((int(status.group(1), 16), comment.group(1) if comment else ""))
    return result


def dcmconv(src: Path, dst: Path, *opts: str) -> Path:
    subprocess.run(["dcmconv", *opts, str(src), str(dst)], check=True, capture_output=True, env=DCMTK_ENV)
    return dst


def report(srv: VnaServer, sop_uid: str) -> dict[str, Any]:
    code, rep, err = run(srv, "report", "--instance", sop_uid)
    assert rep is not None, err
    return dict(rep)


def lose(srv: VnaServer, path: Path) -> None:
    """Damage both replica copies, scrub (CORRUPT) and repair (LastVerifiedCopyLost): the instance is LOST."""
    for n in (1, 2):
        blob = blob_of(hot(srv, n), uid(path))
        data = bytearray(blob.read_bytes())
        data[len(data) // 2] ^= 0xFF
        blob.write_bytes(bytes(data))
    code, rep, _ = run(srv, "scrub")
    assert code == 1 and {(d["sop_uid"], d["outcome"]) for d in rep["details"]} == {(uid(path), "CORRUPT")}
    code, rep, err = run(srv, "repair")
    assert code == 1 and {d["outcome"] for d in rep["details"]} == {"unrecoverable"}
    assert "LastVerifiedCopyLost" in err
    assert report(srv, uid(path))["outcome"] == "LOST"


def assert_healthy(srv: VnaServer, path: Path) -> None:
    """Reported OK, every copy OK, and each replica's live blob holds the data set as sent."""
    fix = report(srv, uid(path))
    assert fix["outcome"] == "OK" and [c["state"] for c in fix["copies"]] == ["OK", "OK"], fix
    for n in (1, 2):
        assert dataset_bytes(blob_of(hot(srv, n), uid(path))) == dataset_bytes(path)


def getscu_bytes(srv: VnaServer, path: Path, out: Path) -> bytes:
    """C-GET one instance with DCMTK getscu; the data set bytes received."""
    ds = dcmread(path, stop_before_pixels=True)
    out.mkdir()
    r = subprocess.run(["getscu", "-S", "-aec", "VNA", "-od", str(out), "-k", "QueryRetrieveLevel=IMAGE",
                        "-k", f"StudyInstanceUID={ds.StudyInstanceUID}", "-k",
                        f"SeriesInstanceUID={ds.SeriesInstanceUID}", "-k", f"SOPInstanceUID={ds.SOPInstanceUID}",
                        "127.0.0.1", str(srv.port)], env=DCMTK_ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    got = list(out.iterdir())
    assert len(got) == 1, r.stderr
    return dataset_bytes(got[0])


# -- Success means durable -------------------------------------------------------------------------------
def test_lost_instance_resent_by_vna_store_is_rewritten(make_server: Factory, ct: list[Path], tmp_path: Path) -> None:
    srv = make_server(start=False)
    assert srv.cli("store", str(ct[0])).returncode == 0
    lose(srv, ct[0])
    evidence = sorted(p.read_bytes() for n in (1, 2) for p in (hot(srv, n) / ".quarantine").rglob("*") if p.is_file())

    r = srv.cli("store", str(ct[0]))
    assert r.returncode == 0 and r.stdout.startswith("duplicate"), r.stdout + r.stderr
    assert_healthy(srv, ct[0])
    assert run(srv, "scrub")[0] == 0  # the rewritten copies verify
    # the quarantined evidence of the damage is untouched
    assert sorted(p.read_bytes() for n in (1, 2) for p in (hot(srv, n) / ".quarantine").rglob("*")
                  if p.is_file()) == evidence
    srv.start()
    assert getscu_bytes(srv, ct[0], tmp_path / "got") == dataset_bytes(ct[0])


def test_lost_instance_resent_by_storescu_is_rewritten(make_server: Factory, ct: list[Path], tmp_path: Path) -> None:
    srv = make_server()
    assert storescu(srv, ct[:2]) == [(0, ""), (0, "")]
    lose(srv, ct[1])

    assert storescu(srv, [ct[1]]) == [(0, "")]
    assert_healthy(srv, ct[1])
    assert getscu_bytes(srv, ct[1], tmp_path / "got") == dataset_bytes(ct[1])
    assert report(srv, uid(ct[0]))["outcome"] == "OK"  # the other instance was never touched


def test_resend_refused_when_w_verified_copies_cannot_be_written(make_server: Factory, ct: list[Path],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(conftest, "VNA", [*NO_DAC, *conftest.VNA])  # server and CLI: root without DAC override
    srv = make_server()
    assert storescu(srv, [ct[0]]) == [(0, "")]
    lose(srv, ct[0])
    r2 = hot(srv, 2)
    dirs = [r2, *(p for p in r2.rglob("*") if p.is_dir())]
    try:
        for d in dirs:
            d.chmod(0o555)  # replica 2 takes no write: W = 2 cannot be reached
        [(status, comment)] = storescu(srv, [ct[0]])
        assert status == 0xA700 and comment.startswith("not durable: 1 of 2 verified copies"), (hex(status), comment)
        r = srv.cli("store", str(ct[0]))
        assert r.returncode == 1 and "not durable" in r.stderr
        fix = report(srv, uid(ct[0]))
        # the copy written on replica 1 is verified and kept; replica 2's stays damaged: not acknowledged
        assert fix["outcome"] == "DAMAGED"
        assert sorted((c["store"], c["state"]) for c in fix["copies"]) == [("hot-1", "OK"), ("hot-2", "CORRUPT")]
    finally:
        for d in dirs:
            d.chmod(0o755)
    assert storescu(srv, [ct[0]]) == [(0, "")]  # replica 2 writable again: the re-send completes the instance
    assert_healthy(srv, ct[0])


# -- identity follows the data set -----------------------------------------------------------------------
def test_vna_store_then_storescu_and_back_are_duplicates(make_server: Factory, ct: list[Path]) -> None:
    srv = make_server()
    r = srv.cli("store", str(ct[0]), str(ct[1]))
    assert r.returncode == 0, r.stderr
    stored = {p: p.read_bytes() for n in (1, 2) for p in blobs(hot(srv, n))}

    assert storescu(srv, ct[:2]) == [(0, ""), (0, "")]  # other File Meta (implementation, source AE)
    assert storescu(srv, ct[:2], "-xi") == [(0, ""), (0, "")]  # and converted to implicit VR little endian
    assert {p: p.read_bytes() for n in (1, 2) for p in blobs(hot(srv, n))} == stored  # the first bytes kept

    assert storescu(srv, [ct[2]]) == [(0, "")]
    r = srv.cli("store", str(ct[2]))
    assert r.returncode == 0 and r.stdout.startswith("duplicate"), r.stdout + r.stderr
    for p in ct[:3]:
        assert report(srv, uid(p))["outcome"] == "OK"
    assert len(blobs(hot(srv, 1))) == 3 and len(blobs(hot(srv, 2))) == 3


def test_resend_in_other_uncompressed_syntaxes_is_a_duplicate(make_server: Factory, ct: list[Path],
                                                              tmp_path: Path) -> None:
    srv = make_server()
    assert storescu(srv, [ct[0]]) == [(0, "")]
    stored = {p: p.read_bytes() for n in (1, 2) for p in blobs(hot(srv, n))}
    implicit = dcmconv(ct[0], tmp_path / "implicit.dcm", "+ti")
    big = dcmconv(ct[0], tmp_path / "big.dcm", "+tb")
    deflated = dcmconv(ct[0], tmp_path / "deflated.dcm", "+td")
    assert storescu(srv, [implicit, big]) == [(0, ""), (0, "")]  # sent as they are
    for f in (implicit, big, deflated):
        r = srv.cli("store", str(f))
        assert r.returncode == 0 and r.stdout.startswith("duplicate"), r.stdout + r.stderr
    assert {p: p.read_bytes() for n in (1, 2) for p in blobs(hot(srv, n))} == stored
    assert getscu_bytes(srv, ct[0], tmp_path / "got") == dataset_bytes(ct[0])


def test_changed_attribute_is_still_a_conflict(make_server: Factory, ct: list[Path], tmp_path: Path) -> None:
    srv = make_server()
    assert srv.cli("store", str(ct[0])).returncode == 0
    stored = {p: p.read_bytes() for n in (1, 2) for p in blobs(hot(srv, n))}
    ds = dcmread(ct[0])
    ds.PatientName = "Other^Patient"
    changed = tmp_path / "changed.dcm"
    ds.save_as(changed)
    for opts in ((), ("-xi",)):
        [(status, comment)] = storescu(srv, [changed], *opts)
        assert status == 0x0111 and comment.startswith("already stored with different content"), (status, comment)
    r = srv.cli("store", str(changed))
    assert r.returncode == 1 and "different content" in r.stderr
    assert {p: p.read_bytes() for n in (1, 2) for p in blobs(hot(srv, n))} == stored


def test_policy_version_keeps_equivalent_resends_as_one_version(make_server: Factory, ct: list[Path],
                                                                tmp_path: Path) -> None:
    srv = make_server('[archive]\nduplicate_policy = "version"\n')
    assert storescu(srv, [ct[0]]) == [(0, "")]
    assert storescu(srv, [ct[0]], "-xi") == [(0, "")]  # the same data set: no new version
    assert len(blobs(hot(srv, 1))) == 1
    ds = dcmread(ct[0])
    ds.PatientName = "Other^Patient"
    ds.save_as(tmp_path / "changed.dcm")
    assert storescu(srv, [tmp_path / "changed.dcm"]) == [(0, "")]  # a real change: version 2
    assert len(blobs(hot(srv, 1))) == 2 and report(srv, uid(ct[0]))["version"] == 2


def test_equivalent_resend_of_a_lost_instance_is_refused_and_of_a_damaged_one_rewrites_it(
        make_server: Factory, ct: list[Path], tmp_path: Path) -> None:
    srv = make_server()
    assert storescu(srv, ct[:2]) == [(0, ""), (0, "")]
    implicit = dcmconv(ct[0], tmp_path / "implicit.dcm", "+ti")
    lose(srv, ct[0])
    # other bytes and no verified stored copy to compare them with: not provable, refused (not 0x0111)
    [(status, comment)] = storescu(srv, [implicit])
    assert status not in (0x0000, 0x0111) and status >= 0xA000, hex(status)
    assert comment.startswith("stored instance has no verified copy"), comment
    assert report(srv, uid(ct[0]))["outcome"] == "LOST"
    assert storescu(srv, [ct[0]]) == [(0, "")]  # the identical bytes restore it
    assert_healthy(srv, ct[0])

    # one copy of the other instance damaged (1 verified < W = 2): an equivalent re-send rewrites the damaged
    # copy from the verified stored copy (the stored bytes, not the re-sent ones)
    blob = blob_of(hot(srv, 2), uid(ct[1]))
    blob.write_bytes(blob.read_bytes()[:-10])
    assert run(srv, "scrub")[0] == 1
    assert report(srv, uid(ct[1]))["outcome"] == "DAMAGED"
    assert storescu(srv, [dcmconv(ct[1], tmp_path / "implicit1.dcm", "+ti")]) == [(0, "")]
    assert_healthy(srv, ct[1])


def test_resend_of_a_migrated_instance_is_compared_with_its_cold_copy(make_server: Factory, ct: list[Path],
                                                                      tmp_path: Path) -> None:
    srv = make_server("[archive]\nmin_copies = 1\n[lifecycle]\nmin_age_days = 0\n")  # every hot copy retired
    assert storescu(srv, ct[:3]) == [(0, "")] * 3
    r = srv.cli("lifecycle", "run")
    assert r.returncode == 0, r.stderr
    assert blobs(hot(srv, 1)) == [] and blobs(hot(srv, 2)) == []

    # the same data set in implicit VR: compared with the verified cold copy, a duplicate; one cold copy is
    # fewer than W = 2 verified copies, so both hot replicas get the stored bytes back from the cold copy
    assert storescu(srv, [dcmconv(ct[0], tmp_path / "implicit.dcm", "+ti")]) == [(0, "")]
    fix = report(srv, uid(ct[0]))
    assert fix["outcome"] == "OK" and sorted((c["tier"], c["state"]) for c in fix["copies"]) == [
        ("cold", "OK"), ("hot", "OK"), ("hot", "OK")]
    for n in (1, 2):
        assert dataset_bytes(blob_of(hot(srv, n), uid(ct[0]))) == dataset_bytes(ct[0])

    ds = dcmread(ct[1])
    ds.PatientName = "Other^Patient"
    ds.save_as(tmp_path / "changed.dcm")
    [(status, comment)] = storescu(srv, [tmp_path / "changed.dcm"])
    assert status == 0x0111 and "different content" in comment
    assert [c["tier"] for c in report(srv, uid(ct[1]))["copies"]] == ["cold"]  # nothing written for a conflict

    assert getscu_bytes(srv, ct[0], tmp_path / "got0") == dataset_bytes(ct[0])
    assert getscu_bytes(srv, ct[1], tmp_path / "got1") == dataset_bytes(ct[1])


def test_rewritten_copy_is_relocated_when_its_directory_takes_no_write(make_server: Factory, ct: list[Path],
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(conftest, "VNA", [*NO_DAC, *conftest.VNA])
    srv = make_server()
    assert storescu(srv, [ct[0]]) == [(0, "")]
    series_dir = blob_of(hot(srv, 2), uid(ct[0])).parent
    lose(srv, ct[0])
    series_dir.chmod(0o555)
    try:
        assert storescu(srv, [ct[0]]) == [(0, "")]
    finally:
        series_dir.chmod(0o755)
    assert_healthy(srv, ct[0])
    assert blob_of(hot(srv, 2), uid(ct[0])).relative_to(hot(srv, 2)).parts[0] == "relocated"
    assert blob_of(hot(srv, 1), uid(ct[0])).parent == hot(srv, 1) / series_dir.relative_to(hot(srv, 2))


def test_cold_copy_counts_as_its_store_declares(make_server: Factory, ct: list[Path], tmp_path: Path) -> None:
    # a cold store declaring redundancy 2 lets the lifecycle retire every hot copy; that one copy counts 2 = W
    srv = make_server("[cold]\nredundancy = 2\n[lifecycle]\nmin_age_days = 0\n")
    assert storescu(srv, [ct[0]]) == [(0, "")]
    assert srv.cli("lifecycle", "run").returncode == 0
    assert blobs(hot(srv, 1)) == [] and blobs(hot(srv, 2)) == []
    assert storescu(srv, [ct[0], dcmconv(ct[0], tmp_path / "implicit.dcm", "+ti")]) == [(0, ""), (0, "")]
    assert blobs(hot(srv, 1)) == [] and blobs(hot(srv, 2)) == []  # durable as it is: nothing written back
    assert [c["tier"] for c in report(srv, uid(ct[0]))["copies"]] == ["cold"]
