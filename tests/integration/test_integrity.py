"""`vna integrity scrub|repair|orphans|report` against a real `vna serve`: verify levels, verified_at,
oldest-first order, rate limits, orphans and the grace period, re-replication, fixity queries, scrubbing
while ingest runs; and (in process, real files and SQLite) cold-bundle placements."""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest
from pydicom import dcmread

from benchmarks.corpus import write_corpus
from tests.conftest import VnaServer, dataset_bytes
from tests.integration import scu

Factory = Callable[..., VnaServer]
LEVELS = ("exists", "size", "stored", "content")


# -- helpers shared with tests/faults/test_integrity_faults.py ---------------------------------------
def run(srv: VnaServer, *args: str) -> tuple[int, Any, str]:
    """``vna integrity <args> --json``: (exit code, parsed JSON or None, stderr)."""
    r = srv.cli("integrity", *args, "--json")
    try:
        data = json.loads(r.stdout)
    except json.JSONDecodeError:
        data = None
    return r.returncode, data, r.stderr


def blobs(root: Path) -> list[Path]:
    """The live blobs of a replica directory (temp and quarantine areas excluded)."""
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.relative_to(root).parts[0].startswith("."))


def blob_of(root: Path, sop_uid: str) -> Path:
    """The one live blob of the instance in a replica directory."""
    found = [p for p in blobs(root) if p.name.startswith(sop_uid + ".v")]
    assert len(found) == 1, found
    return found[0]


def header(path: Path) -> Any:
    return dcmread(path, stop_before_pixels=True)


def get_bytes(srv: VnaServer, path: Path) -> tuple[bytes | None, int]:
    """C-GET one instance; (the dataset bytes received or None, final status)."""
    ds = header(path)
    _, final, raw = scu.get(srv.port, {"QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": ds.StudyInstanceUID,
                                       "SeriesInstanceUID": ds.SeriesInstanceUID,
                                       "SOPInstanceUID": ds.SOPInstanceUID}, [str(ds.SOPClassUID)])
    return raw.get(str(ds.SOPInstanceUID)), int(final.Status) if "Status" in final else -1


def assert_retrieves_bit_exact(srv: VnaServer, paths: list[Path]) -> None:
    for p in paths:
        got, status = get_bytes(srv, p)
        assert status == 0 and got == dataset_bytes(p), f"{p.name}: status 0x{status:04X}"


def stored_archive(make_server: Factory, files: list[Path], config: str = "") -> VnaServer:
    srv = make_server(config)
    assert all(r.Status == 0 for r in scu.store(srv.port, files))
    return srv


def imported_archive(make_server: Factory, files: list[Path], config: str = "") -> VnaServer:
    """An archive filled with `vna store` (bulk import), no server running: for tests that need no DIMSE."""
    srv = make_server(config, start=False)
    r = srv.cli("store", *map(str, files))
    assert r.returncode == 0, r.stderr
    return srv


def hot(srv: VnaServer, n: int) -> Path:
    return srv.data_dir / "hot" / f"r{n}"


def placements_db(srv: VnaServer) -> list[sqlite3.Row]:
    """The placement rows, read straight from the real SQLite index file."""
    conn = sqlite3.connect(f"file:{srv.data_dir / 'index.sqlite'}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute("SELECT sop_uid, store_id, state, blob_key, verified_at FROM placements").fetchall()
    finally:
        conn.close()


@pytest.fixture
def ct(corpus: list[Path]) -> list[Path]:
    """Two CT studies of three instances each."""
    return [p for p in corpus if p.name.startswith("ct-")]


# -- scrub --------------------------------------------------------------------------------------------
def test_clean_archive_scrubs_clean_at_every_level_and_records_verified_at(make_server: Factory,
                                                                          corpus: list[Path]) -> None:
    srv = imported_archive(make_server, corpus)
    study = str(header(corpus[0]).StudyInstanceUID)
    before = max(r["verified_at"] for r in placements_db(srv))
    n = 2 * len(corpus)
    for level in LEVELS:
        code, rep, err = run(srv, "scrub", "--level", level)
        assert code == 0, err
        assert (rep["level"], rep["examined"], rep["done"], rep["findings"], rep["failures"]) == (level, n, n, 0, 0)
        assert (rep["bytes"] > 0) == (level in ("stored", "content"))
    code, after, _ = run(srv, "report", "--study", study)
    assert code == 0 and after["outcome"] == "OK"
    assert after["last_verified_at"] > before
    assert all(c["state"] == "OK" for i in after["instance_fixity"] for c in i["copies"])
    code, rep, _ = run(srv, "report")
    assert code == 0 and rep["findings"] == 0
    assert rep["tiers"]["hot"]["verified"]["<1d"] == n and rep["tiers"]["hot"]["by_state"] == {"OK": n}
    assert rep["under_replicated"]["count"] == rep["lost"]["count"] == rep["damaged"]["count"] == 0


def test_scrub_goes_oldest_verified_first_within_limit(make_server: Factory, ct: list[Path]) -> None:
    srv = imported_archive(make_server, ct)
    rows = placements_db(srv)
    order = sorted(rows, key=lambda r: (r["verified_at"], r["sop_uid"], r["store_id"]))
    t0 = max(r["verified_at"] for r in rows)
    for batch in range(3):
        code, rep, _ = run(srv, "scrub", "--limit", "4", "--level", "size")
        assert code == 0 and rep["examined"] == 4
        fresh = {(r["sop_uid"], r["store_id"]) for r in placements_db(srv) if r["verified_at"] > t0}
        expected = {(r["sop_uid"], r["store_id"]) for r in order[: 4 * (batch + 1)]}
        assert fresh == expected  # each run took the 4 least recently verified copies


def test_rate_limits_pace_the_scrub(make_server: Factory, ct: list[Path]) -> None:
    srv = imported_archive(make_server, ct)
    code, rep, _ = run(srv, "scrub", "--level", "exists", "--limit", "6", "--objects-per-second", "10")
    assert code == 0 and rep["examined"] == 6
    assert rep["elapsed"] >= 0.45  # 6 objects at 10/s: 5 intervals of 0.1 s
    size = ct[0].stat().st_size
    code, rep, _ = run(srv, "scrub", "--level", "content", "--limit", "4", "--bytes-per-second", str(4 * size))
    assert code == 0 and rep["bytes"] >= 4 * size * 0.99
    assert rep["elapsed"] >= 0.6  # ~4 objects' bytes at 4 objects' bytes per second, first chunk free


# -- orphans ------------------------------------------------------------------------------------------
def test_orphans_grace_period_temp_files_and_explicit_actions(make_server: Factory, ct: list[Path]) -> None:
    srv = imported_archive(make_server, ct[:3], "[integrity]\norphan_grace_seconds = 60\n")
    r1 = hot(srv, 1)
    old = time.time() - 3600
    stray = r1 / "stray" / "old.dcm"
    stray.parent.mkdir()
    stray.write_bytes(b"left behind by a crash")
    os.utime(stray, (old, old))
    young = r1 / "stray" / "young.dcm"
    young.write_bytes(b"being ingested right now")
    tmp = r1 / ".tmp" / "abandoned.part"
    tmp.write_bytes(b"partial")
    os.utime(tmp, (old, old))
    gone = blob_of(hot(srv, 2), str(header(ct[1]).SOPInstanceUID))
    gone.unlink()  # an OK placement whose blob is gone

    code, rep, _ = run(srv, "orphans")
    assert code == 1 and rep["findings"] == 2
    kinds = {(d["kind"], d.get("key")) for d in rep["details"]}
    assert ("orphan-blob", "stray/old.dcm") in kinds
    assert any(k == "placement-without-blob" for k, _ in kinds)
    assert not any(key and ("young" in key or "abandoned" in key) for _, key in kinds)

    code, rep, err = run(srv, "orphans", "--quarantine")
    assert code == 2 and "--yes" in err and stray.exists()  # a plan, nothing changed
    assert rep["dry_run"] and any(d.get("action") == "would quarantine" for d in rep["details"])

    code, rep, _ = run(srv, "orphans", "--quarantine", "--yes")
    assert code == 1 and rep["done"] == 1 and not stray.exists()
    assert [p.read_bytes() for p in (r1 / ".quarantine" / "stray").iterdir()] == [b"left behind by a crash"]
    assert young.exists() and tmp.exists()  # too young / temp area: never touched

    os.utime(young, (old, old))
    code, rep, _ = run(srv, "orphans", "--delete", "--yes")
    assert code == 1 and rep["done"] == 1 and not young.exists()
    assert tmp.exists() and len(blobs(r1)) == 3 and len(blobs(hot(srv, 2))) == 2  # registered blobs untouched


# -- repair: re-replication ---------------------------------------------------------------------------
def test_added_replica_is_filled_by_rereplication(make_server: Factory, ct: list[Path]) -> None:
    srv = imported_archive(make_server, ct)
    srv.config.write_text('[hot]\nreplicas = ["hot/r1", "hot/r2", "hot/r3"]\nwrite_quorum = 2\n')
    code, rep, _ = run(srv, "repair", "--dry-run")
    assert code == 1 and rep["findings"] == 6 and rep["done"] == 0 and not blobs(hot(srv, 3))
    code, rep, err = run(srv, "repair", "--limit", "4")
    assert code == 0, err
    assert rep["done"] == 4 and len(blobs(hot(srv, 3))) == 4
    code, rep, _ = run(srv, "repair")
    assert code == 0 and rep["done"] == 2 and {d["outcome"] for d in rep["details"]} == {"replicated"}
    assert len(blobs(hot(srv, 3))) == 6
    code, rep, _ = run(srv, "scrub")
    assert code == 0 and rep["examined"] == 18 and rep["stores"]["hot-3"] == {"VERIFIED": 6}
    rows = placements_db(srv)
    assert len(rows) == 18 and {r["state"] for r in rows} == {"OK"}


# -- concurrency --------------------------------------------------------------------------------------
def test_scrub_and_orphans_while_ingest_runs_report_nothing(make_server: Factory, tmp_path: Path) -> None:
    files = write_corpus(tmp_path / "live", "small", studies=1, per_study=60, seed=23)
    srv = make_server()
    done = threading.Event()
    statuses: list[int] = []

    def ingest() -> None:
        try:
            statuses.extend(int(r.Status) for r in scu.store(srv.port, files))
        finally:
            done.set()

    t = threading.Thread(target=ingest)
    t.start()
    runs = overlapped = 0
    try:
        while not done.is_set() or runs < 2:
            overlapped += not done.is_set()
            for args in (("scrub",), ("orphans", "--grace", "5")):
                code, rep, err = run(srv, *args)
                assert code == 0 and rep["findings"] == 0 and rep["failures"] == 0, (args, rep, err)
            runs += 1
    finally:
        t.join(60)
    assert statuses == [0] * len(files) and overlapped >= 1
    code, rep, _ = run(srv, "scrub")
    assert code == 0 and rep["examined"] == 2 * len(files) and rep["findings"] == 0


# -- fixity & usage -----------------------------------------------------------------------------------
def test_instance_fixity_and_usage_errors(make_server: Factory, ct: list[Path]) -> None:
    srv = imported_archive(make_server, ct[:1])
    sop = str(header(ct[0]).SOPInstanceUID)
    code, fix, _ = run(srv, "report", "--instance", sop)
    assert code == 0 and fix["outcome"] == "OK" and len(fix["copies"]) == 2
    text = srv.cli("integrity", "report", "--instance", sop)
    assert text.returncode == 0 and "hot/hot-1: OK" in text.stdout
    assert run(srv, "report", "--study", "1.2.3.4")[0] == 1  # unknown study
    assert srv.cli("integrity").returncode == 2
    assert srv.cli("integrity", "scrub", "--level", "thorough").returncode == 2
    assert srv.cli("integrity", "scrub", "--limit", "0").returncode == 2
    assert srv.cli("integrity", "orphans", "--quarantine", "--delete", "--yes").returncode == 2
    srv.config.write_text('[integrity]\nverify_level = "thorough"\n')
    bad = srv.cli("integrity", "scrub")
    assert bad.returncode == 2 and "verify_level" in bad.stderr


# -- cold placements (tier-agnostic code, in process: real files, real SQLite) -------------------------
def test_cold_bundle_frames_are_scrubbed_and_repaired(tmp_path: Path, ct: list[Path]) -> None:
    from vna.codec import IdentityCodec, ZstdCodec
    from vna.domain import InstanceRecord, Placement, PlacementState, Tier
    from vna.index.sqlite import SqliteIndex
    from vna.integrity import Repairer, Scrubber
    from vna.storage.accessor import TierAccessor
    from vna.storage.filesystem import FilesystemBlobStore

    index = SqliteIndex(tmp_path / "index.sqlite")
    index.migrate()
    hot1 = FilesystemBlobStore("hot-1", tmp_path / "h1", fsync=False)
    cold = FilesystemBlobStore("cold-1", tmp_path / "cold", fsync=False)
    tiers = {Tier.HOT: TierAccessor(Tier.HOT, [hot1], 1, IdentityCodec()),
             Tier.COLD: TierAccessor(Tier.COLD, [cold], 1, ZstdCodec())}
    import hashlib

    frames: list[bytes] = []
    records = []
    for f in ct[:3]:
        data = f.read_bytes()
        ds = header(f)
        records.append((str(ds.SOPInstanceUID), data, ds))
        frames.append(b"".join(ZstdCodec().encode([data])))
    cold.put("bundles/s1.zst", [b"".join(frames)])
    offset = 0
    now = time.time() - 100
    for i, (sop, data, ds) in enumerate(records):
        sha = hashlib.sha256(data).hexdigest()
        rec = InstanceRecord(sop, str(ds.SeriesInstanceUID), str(ds.StudyInstanceUID), str(ds.SOPClassUID),
                             "1.2.840.10008.1.2.1", 1, sha, len(data), now, "TEST")
        ps = [Placement(sop, 1, Tier.COLD, "cold-1", "bundles/s1.zst", "zstd", sha, len(data),
                        hashlib.sha256(frames[i]).hexdigest(), len(frames[i]), PlacementState.OK, now, now,
                        offset, len(frames[i]))]
        if i < 2:  # the third instance is only in the bundle
            hot1.put(f"st/se/{sop}.v1.x.dcm", [data])
            ps.append(Placement(sop, 1, Tier.HOT, "hot-1", f"st/se/{sop}.v1.x.dcm", "identity", sha, len(data), sha,
                                len(data), PlacementState.OK, now, now))
        index.register(rec, ps)
        offset += len(frames[i])
    try:
        assert Scrubber(index, tiers).run_once().findings == 0
        bundle = tmp_path / "cold" / "bundles" / "s1.zst"
        raw = bytearray(bundle.read_bytes())
        raw[len(frames[0]) + 200] ^= 0xFF  # inside the second frame
        raw[len(frames[0]) + len(frames[1]) + 200] ^= 0xFF  # inside the third (no other copy)
        bundle.write_bytes(bytes(raw))
        for level in ("size", "exists"):
            assert Scrubber(index, tiers, level=level).run_once().findings == 0
        rep = Scrubber(index, tiers, level="stored").run_once()
        assert rep.findings == 2 and rep.stores["cold-1"] == {"VERIFIED": 1, "CORRUPT": 2}
        assert all(d["quarantine"].startswith("skipped") for d in rep.details)
        assert bundle.exists()  # a shared bundle is never moved for one bad frame
        rep = Repairer(index, tiers, tmp_path / "spool").run_once()
        assert (rep.done, rep.failures) == (1, 1)
        outcomes = {d["sop_uid"]: d["outcome"] for d in rep.details}
        assert outcomes == {records[1][0]: "repaired", records[2][0]: "unrecoverable"}
        fixed = next(p for p in index.placements(records[1][0]) if p.tier is Tier.COLD)
        assert (fixed.state, fixed.codec, fixed.offset) == (PlacementState.OK, "zstd", None)
        assert fixed.blob_key.startswith("bundles/") and fixed.blob_key.endswith(".dcm.zstd")
        out = bytearray()
        tiers[Tier.COLD].read_verified(fixed, out.extend)
        assert bytes(out) == records[1][1]
        rep = Scrubber(index, tiers).run_once()
        assert rep.findings == 0 and rep.examined == 4  # the lost frame stays CORRUPT, untouched
        assert next(p for p in index.placements(records[2][0])).state is PlacementState.CORRUPT
    finally:
        for accessor in tiers.values():
            accessor.close()
        index.close()


def test_stale_pending_copy_is_redone_without_orphans(tmp_path: Path, ct: list[Path]) -> None:
    """A re-replication killed after its write (PENDING row + blob) is finished by the next run."""
    import hashlib
    from vna.codec import IdentityCodec
    from vna.domain import InstanceRecord, Placement, PlacementState, Tier
    from vna.index.sqlite import SqliteIndex
    from vna.integrity import OrphanFinder, Repairer
    from vna.storage.accessor import TierAccessor
    from vna.storage.filesystem import FilesystemBlobStore

    index = SqliteIndex(tmp_path / "index.sqlite")
    index.migrate()
    stores = [FilesystemBlobStore(f"hot-{i}", tmp_path / f"h{i}", fsync=False) for i in (1, 2)]
    tiers = {Tier.HOT: TierAccessor(Tier.HOT, stores, 1, IdentityCodec())}
    data = ct[0].read_bytes()
    ds = header(ct[0])
    sop, sha, old = str(ds.SOPInstanceUID), hashlib.sha256(data).hexdigest(), time.time() - 7200
    stores[0].put("a/b/one.dcm", [data])
    index.register(InstanceRecord(sop, str(ds.SeriesInstanceUID), str(ds.StudyInstanceUID), str(ds.SOPClassUID),
                                  "1.2.840.10008.1.2.1", 1, sha, len(data), old, "TEST"),
                   [Placement(sop, 1, Tier.HOT, "hot-1", "a/b/one.dcm", "identity", sha, len(data), sha, len(data),
                              PlacementState.OK, old, old)])
    index.add_placements([Placement(sop, 1, Tier.HOT, "hot-2", "a/b/crashed.dcm", "identity", sha, len(data), "", 0,
                                    PlacementState.PENDING, old)])
    stores[1].put("a/b/crashed.dcm", [data[:1000]])  # the crash left a partial copy under the recorded key
    try:
        fresh = Repairer(index, tiers, tmp_path / "spool", stale_pending_seconds=10_000).run_once()
        assert fresh.examined == 0  # not stale yet: somebody may still be writing it
        rep = Repairer(index, tiers, tmp_path / "spool", stale_pending_seconds=3600).run_once()
        assert (rep.done, rep.failures) == (1, 0)
        p2 = next(p for p in index.placements(sop) if p.store_id == "hot-2")
        assert p2.state is PlacementState.OK and p2.blob_key != "a/b/crashed.dcm"
        assert sorted(stores[1].iter_keys()) == [p2.blob_key]
        assert OrphanFinder(index, tiers, grace_seconds=0).run_once().findings == 0
    finally:
        tiers[Tier.HOT].close()
        index.close()


def test_marks_and_repairs_lose_to_concurrent_changes(tmp_path: Path, ct: list[Path]) -> None:
    """Compare-and-set: a copy that changed between check and mark is not marked; a repair whose row
    changed meanwhile removes its new blob. The injected clock makes the concurrent change at that instant."""
    import hashlib
    from dataclasses import replace
    from vna.codec import IdentityCodec
    from vna.domain import InstanceRecord, Placement, PlacementState, Tier
    from vna.index.sqlite import SqliteIndex
    from vna.integrity import Repairer, Scrubber
    from vna.storage.accessor import TierAccessor
    from vna.storage.filesystem import FilesystemBlobStore

    index = SqliteIndex(tmp_path / "index.sqlite")
    index.migrate()
    stores = [FilesystemBlobStore(f"hot-{i}", tmp_path / f"h{i}", fsync=False) for i in (1, 2)]
    tiers = {Tier.HOT: TierAccessor(Tier.HOT, stores, 1, IdentityCodec())}
    data = ct[0].read_bytes()
    ds = header(ct[0])
    sop, sha, t = str(ds.SOPInstanceUID), hashlib.sha256(data).hexdigest(), time.time()
    rows = []
    for s in stores:
        s.put("k/one.dcm", [data])
        rows.append(Placement(sop, 1, Tier.HOT, s.store_id, "k/one.dcm", "identity", sha, len(data), sha, len(data),
                              PlacementState.OK, t, t))
    index.register(InstanceRecord(sop, str(ds.SeriesInstanceUID), str(ds.StudyInstanceUID), str(ds.SOPClassUID),
                                  "1.2.840.10008.1.2.1", 1, sha, len(data), t, "TEST"), rows)
    bad = tmp_path / "h2" / "k" / "one.dcm"
    bad.write_bytes(data[:-1] + b"!")

    def concurrently_retired() -> float:  # another job moves the copy on just before the scrubber marks it
        index.transition(rows[1], PlacementState.TO_DELETE)
        return time.time()

    try:
        rep = Scrubber(index, tiers, clock=concurrently_retired, store_id="hot-2").run_once()
        assert (rep.findings, rep.details[0]["outcome"]) == (0, "CHANGED")
        assert bad.exists() and index.placements(sop)[1].state is PlacementState.TO_DELETE  # not marked, not moved
        retired = replace(rows[1], state=PlacementState.TO_DELETE)
        assert index.replace_placement(retired, replace(rows[1], state=PlacementState.CORRUPT))

        calls = 0

        def concurrently_repaired() -> float:  # another repairer wins the row while we verify our copy
            nonlocal calls
            calls += 1
            if calls == 1:
                damaged = replace(rows[1], state=PlacementState.CORRUPT)
                assert index.replace_placement(damaged, replace(rows[1], blob_key="k/theirs.dcm"))
            return time.time()

        rep = Repairer(index, tiers, tmp_path / "spool", clock=concurrently_repaired).run_once()
        assert (rep.done, rep.details[0]["outcome"]) == (0, "skipped")
        assert index.placements(sop)[1].blob_key == "k/theirs.dcm"
        assert sorted(stores[1].iter_keys()) == ["k/one.dcm"]  # our new copy was removed
    finally:
        tiers[Tier.HOT].close()
        index.close()


def test_scrub_and_repair_daemons_in_serve(make_server: Callable[..., VnaServer], corpus: list[Path]) -> None:
    from tests.conftest import dataset_bytes
    from tests.integration import scu as _scu

    srv = make_server("[integrity]\nscrub_enabled = true\nrepair_enabled = true\n"
                      "scrub_interval_seconds = 0.5\nrepair_interval_seconds = 0.5\n")
    assert _scu.store(srv.port, [corpus[0]])[0].Status == 0
    blob = next(p for p in (srv.data_dir / "hot" / "r1").rglob("*.dcm") if ".quarantine" not in p.parts)
    data = bytearray(blob.read_bytes())
    data[-10] ^= 0x01
    blob.write_bytes(bytes(data))
    deadline = time.monotonic() + 60
    live: list[Path] = []
    while time.monotonic() < deadline:
        time.sleep(0.5)
        live = [p for p in (srv.data_dir / "hot" / "r1").rglob("*.dcm") if ".quarantine" not in p.parts]
        stats = json.loads(srv.cli("index", "stats", "--json").stdout)
        if stats["tiers"]["hot"]["by_state"] == {"OK": 2} and live and blob not in live:
            break
    assert blob not in live and len(live) == 1, srv.log.read_text()[-2000:]  # scrubbed away, repaired anew
    assert live[0].read_bytes() == corpus[0].read_bytes() or dataset_bytes(live[0]) == dataset_bytes(corpus[0])
    ds = dcmread(corpus[0], stop_before_pixels=True)
    _, final, raw = _scu.get(srv.port, {"QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": ds.StudyInstanceUID,
                                        "SeriesInstanceUID": ds.SeriesInstanceUID,
                                        "SOPInstanceUID": ds.SOPInstanceUID}, [str(ds.SOPClassUID)])
    assert final.Status == 0 and raw[str(ds.SOPInstanceUID)] == dataset_bytes(corpus[0])
