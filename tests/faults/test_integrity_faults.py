"""Integrity faults on real files under a real `vna serve`: each is detected by `vna integrity scrub`,
repaired by `vna integrity repair` where a good copy exists (the instance then retrieves bit-exact over
C-GET), and reported as unrecoverable (LastVerifiedCopyLost, data untouched) where none does."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Callable

import pytest

from tests import conftest
from tests.conftest import VnaServer, dataset_bytes
from tests.faults.test_storage_faults import mount  # noqa: F401  (fixture)
from tests.integration import scu
from tests.integration.test_integrity import (assert_retrieves_bit_exact, blob_of, blobs, get_bytes, header, hot,
                                              placements_db, run, stored_archive)

from vna.config import S3Config
from vna.storage.s3 import S3BlobStore

Factory = Callable[..., VnaServer]
#: run vna without the capabilities that let root ignore file permissions, so chmod 000 bites
NO_DAC = ["setpriv", "--inh-caps=-dac_override,-dac_read_search", "--bounding-set=-dac_override,-dac_read_search"]


@pytest.fixture
def ct(corpus: list[Path]) -> list[Path]:
    """Two CT studies of three instances each (study 0 first)."""
    return [p for p in corpus if p.name.startswith("ct-")]


def flip(path: Path, offset: int | None = None) -> bytes:
    """Invert one byte of the file in place; returns the damaged bytes."""
    with open(path, "r+b") as fh:
        size = fh.seek(0, 2)
        at = size // 2 if offset is None else offset
        fh.seek(at)
        b = fh.read(1)
        fh.seek(at)
        fh.write(bytes([b[0] ^ 0xFF]))
    return path.read_bytes()


def quarantined(root: Path) -> list[Path]:
    return sorted(p for p in (root / ".quarantine").rglob("*") if p.is_file())


def sop(path: Path) -> str:
    return str(header(path).SOPInstanceUID)


def test_flipped_byte_in_one_replica(make_server: Factory, ct: list[Path]) -> None:
    srv = stored_archive(make_server, ct)
    bad = blob_of(hot(srv, 2), sop(ct[0]))
    damaged = flip(bad)

    code, rep, _ = run(srv, "scrub", "--level", "size")
    assert code == 0 and rep["findings"] == 0  # same size: a size check cannot see it
    code, rep, _ = run(srv, "scrub", "--dry-run")
    assert code == 1 and rep["findings"] == 1 and bad.exists()  # found, but nothing changed
    assert {r["state"] for r in placements_db(srv)} == {"OK"}

    code, rep, _ = run(srv, "scrub", "--level", "stored")
    assert code == 1 and (rep["findings"], rep["failures"], rep["done"]) == (1, 0, 11)
    d = rep["details"][0]
    assert (d["sop_uid"], d["store"], d["outcome"], d["action"]) == (sop(ct[0]), "hot-2", "CORRUPT", "marked CORRUPT")
    assert not bad.exists() and [q.read_bytes() for q in quarantined(hot(srv, 2))] == [damaged]

    code, rep, _ = run(srv, "repair")
    assert code == 0 and (rep["done"], rep["failures"]) == (1, 0) and rep["details"][0]["source"] == "hot-1"
    repaired = blob_of(hot(srv, 2), sop(ct[0]))
    assert repaired.name != bad.name and [q.read_bytes() for q in quarantined(hot(srv, 2))] == [damaged]
    blob_of(hot(srv, 1), sop(ct[0])).unlink()  # now only the repaired copy can serve it
    assert_retrieves_bit_exact(srv, ct[:3])


def test_truncated_replica(make_server: Factory, ct: list[Path]) -> None:
    srv = stored_archive(make_server, ct)
    bad = blob_of(hot(srv, 1), sop(ct[1]))
    with open(bad, "r+b") as fh:
        fh.truncate(bad.stat().st_size // 2)

    code, rep, _ = run(srv, "scrub", "--level", "size")
    assert code == 1 and rep["findings"] == 1
    assert (rep["details"][0]["store"], rep["details"][0]["outcome"]) == ("hot-1", "CORRUPT")
    assert "size" in rep["details"][0]["reason"]
    code, rep, _ = run(srv, "repair")
    assert code == 0 and rep["done"] == 1 and rep["details"][0]["source"] == "hot-2"
    assert len(quarantined(hot(srv, 1))) == 1
    assert_retrieves_bit_exact(srv, [ct[1]])  # hot-1 (the repaired copy) is read first


def test_deleted_replica(make_server: Factory, ct: list[Path]) -> None:
    srv = stored_archive(make_server, ct)
    blob_of(hot(srv, 2), sop(ct[2])).unlink()

    code, rep, _ = run(srv, "scrub", "--level", "exists")
    assert code == 1 and rep["findings"] == 1 and rep["details"][0]["outcome"] == "MISSING"
    assert rep["bytes"] == 0
    code, rep, _ = run(srv, "repair")
    assert code == 0 and rep["done"] == 1
    blob_of(hot(srv, 1), sop(ct[2])).unlink()  # only the rebuilt copy is left to serve it
    assert_retrieves_bit_exact(srv, [ct[2]])


def test_unreadable_replica_directory(make_server: Factory, ct: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(conftest, "VNA", [*NO_DAC, *conftest.VNA])  # server and CLI: root without DAC override
    srv = stored_archive(make_server, ct)
    r1, r2 = hot(srv, 1), hot(srv, 2)
    study0 = blob_of(r2, sop(ct[0])).parent.parent
    study1 = blob_of(r2, sop(ct[3])).parent.parent
    locked = [study0, study1]
    try:
        # the whole replica unreadable: it looks down, so nothing is marked (an outage is not damage)
        for d in locked:
            d.chmod(0)
        code, rep, _ = run(srv, "scrub")
        assert code == 1 and (rep["findings"], rep["failures"]) == (0, 6)
        assert {d["outcome"] for d in rep["details"]} == {"STORE_UNAVAILABLE"}
        assert {r["state"] for r in placements_db(srv)} == {"OK"}

        # one directory unreadable while the replica answers: its copies are proven unusable
        study1.chmod(0o755)
        code, rep, _ = run(srv, "scrub")
        assert code == 1 and (rep["findings"], rep["failures"]) == (3, 0)
        assert {(d["store"], d["outcome"]) for d in rep["details"]} == {("hot-2", "MISSING")}
        assert all(d["reason"].startswith("unreadable") for d in rep["details"])
        code, rep, _ = run(srv, "repair")
        assert code == 0 and rep["done"] == 3
        assert all(d["new_key"].startswith("relocated/") for d in rep["details"])  # around the broken directory
        code, rep, _ = run(srv, "scrub")
        assert code == 0 and (rep["examined"], rep["findings"]) == (12, 0)
        study0_r1 = blob_of(r1, sop(ct[0])).parent.parent
        study0_r1.chmod(0)
        locked.append(study0_r1)
        assert_retrieves_bit_exact(srv, ct[:3])  # served from the relocated copies on hot-2
    finally:
        for d in locked:
            d.chmod(0o755)
    code, rep, _ = run(srv, "orphans", "--grace", "0")
    assert code == 1 and rep["findings"] == 3 and all(d["kind"] == "orphan-blob" for d in rep["details"])
    assert len(blobs(r2)) == 9  # reported, never deleted without --delete --yes


def test_every_copy_of_one_instance_corrupt(make_server: Factory, ct: list[Path]) -> None:
    srv = stored_archive(make_server, ct)
    lost = ct[3]
    for n in (1, 2):
        flip(blob_of(hot(srv, n), sop(lost)), 1000 * n)

    code, rep, _ = run(srv, "scrub")
    assert code == 1 and rep["findings"] == 2 and {d["outcome"] for d in rep["details"]} == {"CORRUPT"}
    evidence = {n: [q.read_bytes() for q in quarantined(hot(srv, n))] for n in (1, 2)}
    rows = sorted((r["store_id"], r["state"], r["blob_key"]) for r in placements_db(srv) if r["sop_uid"] == sop(lost))

    code, rep, err = run(srv, "repair")
    assert code == 1 and (rep["done"], rep["failures"]) == (0, 2)
    assert {d["outcome"] for d in rep["details"]} == {"unrecoverable"}
    assert "ERROR vna.integrity.repair [MainThread] integrity.repair: LastVerifiedCopyLost" in err
    assert sop(lost) in err
    # data untouched: the quarantined evidence, the rows, no new blob
    assert {n: [q.read_bytes() for q in quarantined(hot(srv, n))] for n in (1, 2)} == evidence
    assert sorted((r["store_id"], r["state"], r["blob_key"]) for r in placements_db(srv)
                  if r["sop_uid"] == sop(lost)) == rows
    assert not [p for n in (1, 2) for p in blobs(hot(srv, n)) if p.name.startswith(sop(lost))]

    code, rep, _ = run(srv, "report", "--study", str(header(lost).StudyInstanceUID))
    assert code == 1 and rep["outcome"] == "LOST" and rep["by_outcome"] == {"OK": 2, "DAMAGED": 0, "LOST": 1}
    got, status = get_bytes(srv, lost)
    assert got is None and status != 0
    assert_retrieves_bit_exact(srv, ct[4:])


def test_replica_missed_during_ingest_is_rereplicated(make_server: Factory, mount: Callable[..., Path],
                                                      ct: list[Path]) -> None:
    r1, r2 = mount("r1"), mount("r2", "200k")
    srv = make_server(f'[hot]\nreplicas = ["{r1}", "{r2}"]\nwrite_quorum = 1\n')
    rsps = scu.store(srv.port, ct[:2])
    assert all(r.Status == 0 for r in rsps), [(hex(r.Status), r.get("ErrorComment")) for r in rsps]
    code, rep, _ = run(srv, "report")
    assert code == 1 and (rep["damaged"]["count"], rep["under_replicated"]["count"]) == (2, 2)
    subprocess.run(["mount", "-o", "remount,size=16m", str(r2)], check=True)  # the disk gets room again
    code, rep, _ = run(srv, "repair")
    assert code == 0 and rep["done"] == 2 and len(blobs(r2)) == 2
    for p in ct[:2]:
        blob_of(r1, sop(p)).unlink()
        got, status = get_bytes(srv, p)
        assert status == 0 and got == dataset_bytes(p)  # from the copy re-replicated to r2


def _cold_on_s3(make_server: Factory, s3_config: S3Config) -> VnaServer:
    c = s3_config
    return make_server(
        "[archive]\nmin_copies = 1\n[lifecycle]\nmin_age_days = 0\n"
        f'[cold]\nbackend = "s3"\n[cold.s3]\nendpoint_url = "{c.endpoint_url}"\nbucket = "{c.bucket}"\n'
        f'access_key = "{c.access_key}"\nsecret_key = "{c.secret_key}"\n')


def test_cold_object_in_seaweedfs_corrupted_or_deleted(make_server: Factory, ct: list[Path],
                                                       s3_config: S3Config, s3_store: S3BlobStore) -> None:
    import boto3

    srv = _cold_on_s3(make_server, s3_config)
    study0, study1 = ct[:3], ct[3:]
    assert all(r.Status == 0 for r in scu.store(srv.port, ct))
    assert json.loads(srv.cli("lifecycle", "run", "--json").stdout)["done"] == 2
    keys = sorted(s3_store.iter_keys())
    assert len(keys) == 2
    code, rep, _ = run(srv, "scrub", "--tier", "cold")
    assert code == 0 and rep["findings"] == 0
    s3 = boto3.client("s3", endpoint_url=s3_config.endpoint_url, aws_access_key_id=s3_config.access_key,
                      aws_secret_access_key=s3_config.secret_key, region_name=s3_config.region)
    by_study = {k.split("/")[0]: k for k in keys}
    # one byte flipped inside study 0's bundle (rewritten behind vna's back), study 1's bundle deleted
    key0 = by_study[str(header(study0[0]).StudyInstanceUID)]
    data = bytearray(b"".join(s3_store.open(key0)))
    data[len(data) // 2] ^= 0xFF
    s3.put_object(Bucket=s3_config.bucket, Key=key0, Body=bytes(data))
    s3.delete_object(Bucket=s3_config.bucket, Key=by_study[str(header(study1[0]).StudyInstanceUID)])
    code, rep, _ = run(srv, "scrub", "--tier", "cold")
    assert code == 1 and rep["findings"] == 4  # 1 corrupt frame + 3 missing
    stats = json.loads(srv.cli("index", "stats", "--json").stdout)
    assert stats["tiers"]["cold"]["by_state"] == {"OK": 2, "CORRUPT": 1, "MISSING": 3}
    # no other copy exists (the hot copies were retired): unrecoverable, reported, nothing touched
    code, rep, err = run(srv, "repair")
    assert code == 1 and rep["failures"] + rep["findings"] >= 4, (rep, err)
    assert json.loads(srv.cli("index", "stats", "--json").stdout)["tiers"]["cold"]["by_state"] == \
        {"OK": 2, "CORRUPT": 1, "MISSING": 3}
    # the two intact frames still retrieve bit-exact; the damaged ones fail their sub-operations
    ds = header(study0[0])
    _, final, raw = scu.get(srv.port, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": ds.StudyInstanceUID},
                            [str(ds.SOPClassUID)])
    assert final.NumberOfFailedSuboperations == 1 and final.NumberOfCompletedSuboperations == 2
    for p in study0:
        if sop(p) in raw:
            assert raw[sop(p)] == dataset_bytes(p)
