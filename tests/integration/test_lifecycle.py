"""Lifecycle: aged studies move to compressed cold bundles, come back bit-exact, holds are honoured, crashes are survivable."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable

import pytest
from pydicom import dcmread

from tests.conftest import ROOT, VNA, StoreScp, VnaServer, dataset_bytes
from tests.faults.test_storage_faults import mount, remount  # noqa: F401  (fixture)
from tests.integration import scu
from vna.archive import Archive
from vna.config import S3Config
from vna.storage.bundle import BundleEntry, load_manifest
from vna.storage.s3 import S3BlobStore

Factory = Callable[..., VnaServer]

LIFECYCLE = "[archive]\nmin_copies = 1\n[lifecycle]\nmin_age_days = 0\n"  # every hot copy retired


def _json(srv: VnaServer, *args: str) -> dict:  # type: ignore[type-arg]
    r = srv.cli(*args, "--json")
    assert r.returncode in (0, 1), r.stderr
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def _hot_files(srv: VnaServer) -> list[Path]:
    return [p for p in (srv.data_dir / "hot").rglob("*.dcm") if ".tmp" not in p.parts and ".quarantine" not in p.parts]


def _get_study(srv: VnaServer, path: Path) -> tuple[object, dict[str, bytes]]:
    ds = dcmread(path, stop_before_pixels=True)
    _, final, raw = scu.get(srv.port, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": ds.StudyInstanceUID},
                            [str(ds.SOPClassUID)])
    return final, raw


def _assert_every_study_recalls(srv: VnaServer, corpus: list[Path]) -> None:
    """A C-GET of each study in ``corpus`` succeeds and returns each instance it sends byte for byte."""
    for first in {dcmread(p, stop_before_pixels=True).StudyInstanceUID: p for p in corpus}.values():
        final, raw = _get_study(srv, first)
        assert final.Status == 0  # type: ignore[attr-defined]
        for p in corpus:
            d = dcmread(p, stop_before_pixels=True)
            if str(d.SOPInstanceUID) in raw:
                assert raw[str(d.SOPInstanceUID)] == dataset_bytes(p)


def test_migrate_recall_and_nearline(make_server: Factory, corpus: list[Path], storescp: StoreScp) -> None:
    srv = make_server(LIFECYCLE + f'[[dicom.remote]]\nae_title = "DEST"\nhost = "127.0.0.1"\nport = {storescp.port}\n')
    assert all(r.Status == 0 for r in scu.store(srv.port, corpus))
    plan = _json(srv, "lifecycle", "plan")
    assert len(plan["studies"]) == 4 and plan["hot_bytes"] > 0
    assert plan["estimated_cold_bytes"] < plan["hot_bytes"]

    report = _json(srv, "lifecycle", "run")
    assert report["done"] == 4 and report["failures"] == 0
    stats = _json(srv, "index", "stats")
    assert stats["instances"] == len(corpus)
    assert stats["tiers"]["cold"]["by_state"] == {"OK": len(corpus)}
    assert "hot" not in stats["tiers"] or stats["tiers"]["hot"]["placements"] == 0
    assert _hot_files(srv) == []
    cold_bytes = stats["tiers"]["cold"]["stored_bytes"]
    assert cold_bytes < stats["content_bytes"]  # compressed

    rows, _ = scu.find(srv.port, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "", "InstanceAvailability": ""})
    assert {r.InstanceAvailability for r in rows} == {"NEARLINE"}

    # recall over C-GET (every study) and C-MOVE (one study), bit-exact
    _assert_every_study_recalls(srv, corpus)
    ds = dcmread(corpus[0], stop_before_pixels=True)
    _, final = scu.move(srv.port, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": ds.StudyInstanceUID}, "DEST")
    assert final.Status == 0 and final.NumberOfCompletedSuboperations == 3
    # a second run has nothing to do
    assert _json(srv, "lifecycle", "run")["done"] == 0


def test_legal_hold_blocks_migration(make_server: Factory, corpus: list[Path]) -> None:
    srv = make_server(LIFECYCLE)
    assert all(r.Status == 0 for r in scu.store(srv.port, corpus))
    held = str(dcmread(corpus[0], stop_before_pixels=True).StudyInstanceUID)
    r = srv.cli("lifecycle", "hold", held, "--reason", "litigation 2026-17")
    assert r.returncode == 0, r.stderr
    assert srv.cli("lifecycle", "hold", "../etc").returncode == 2
    assert srv.cli("lifecycle", "hold", "1.2.3.4.5").returncode == 1  # unknown study
    assert _json(srv, "lifecycle", "run")["done"] == 3
    stats = _json(srv, "index", "stats")
    assert stats["tiers"]["hot"]["by_state"] == {"OK": 6}  # the held study's 3 instances, 2 replicas
    assert srv.cli("lifecycle", "release", held).returncode == 0
    assert _json(srv, "lifecycle", "run")["done"] == 1
    assert _hot_files(srv) == []


def test_cold_store_failure_leaves_hot_untouched_and_rerun_completes(
        make_server: Factory, corpus: list[Path], mount: Callable[..., Path]) -> None:  # noqa: F811
    cold = mount("cold", "64k")
    srv = make_server(LIFECYCLE + f'[cold]\npath = "{cold}"\n')
    ct = [p for p in corpus if p.name.startswith("ct-7-0000")]
    assert all(r.Status == 0 for r in scu.store(srv.port, ct))
    report = _json(srv, "lifecycle", "run")
    assert report["failures"] == 1 and report["done"] == 0
    stats = _json(srv, "index", "stats")
    assert stats["tiers"]["hot"]["by_state"] == {"OK": 6}
    assert stats["tiers"]["cold"]["by_state"] == {"PENDING": 3}  # intent recorded, nothing claimed
    final, raw = _get_study(srv, ct[0])
    assert final.Status == 0 and len(raw) == 3  # type: ignore[attr-defined]
    subprocess.run(["mount", "-o", "remount,size=64m", str(cold)], check=True)
    report = _json(srv, "lifecycle", "run")
    assert report["done"] == 1 and report["failures"] == 0
    stats = _json(srv, "index", "stats")
    assert stats["tiers"]["cold"]["by_state"] == {"OK": 3}
    assert _hot_files(srv) == []
    assert len([p for p in cold.rglob("*.bundle")]) == 1  # no duplicate bundle
    final, raw = _get_study(srv, ct[0])
    assert final.Status == 0 and all(raw[str(dcmread(p, stop_before_pixels=True).SOPInstanceUID)] == dataset_bytes(p)
                                     for p in ct)  # type: ignore[attr-defined]


def test_kill_9_during_migration_then_rerun(make_server: Factory, tmp_path: Path) -> None:
    from benchmarks.corpus import write_corpus

    files = write_corpus(tmp_path / "c", "ct", studies=4, per_study=8, seed=21)
    srv = make_server(LIFECYCLE + "lease_seconds = 2\n")
    assert all(r.Status == 0 for r in scu.store(srv.port, files))
    proc = subprocess.Popen([*VNA, "lifecycle", "run", "--config", str(srv.config), "--data-dir", str(srv.data_dir)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not list((srv.data_dir / "cold").rglob("*.bundle")):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    time.sleep(2.5)  # the dead worker's lease expires
    report = _json(srv, "lifecycle", "run")
    assert report["failures"] == 0
    stats = _json(srv, "index", "stats")
    assert stats["tiers"]["cold"]["by_state"] == {"OK": len(files)}
    assert _hot_files(srv) == []
    bundles = list((srv.data_dir / "cold").rglob("*.bundle"))
    # a half-finished bundle whose frames were already claimed stays (its frames are in use);
    # one no placement refers to was removed: nothing on the cold tier is an orphan
    assert 4 <= len(bundles) <= 5
    orphans = _json(srv, "integrity", "orphans", "--grace", "0")
    assert orphans["findings"] == 0, orphans
    for study_first in files[::8]:
        final, raw = _get_study(srv, study_first)
        assert final.Status == 0 and len(raw) == 8  # type: ignore[attr-defined]
    for f in files:
        assert raw.get(str(dcmread(f, stop_before_pixels=True).SOPInstanceUID), dataset_bytes(f)) == dataset_bytes(f)


def test_lifecycle_daemon_in_serve(make_server: Factory, corpus: list[Path]) -> None:
    srv = make_server("[archive]\nmin_copies = 1\n[lifecycle]\nenabled = true\nmin_age_days = 0\n"
                      "interval_seconds = 0.5\n")
    assert all(r.Status == 0 for r in scu.store(srv.port, corpus[:3]))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        stats = _json(srv, "index", "stats")
        if stats["tiers"].get("cold", {}).get("by_state") == {"OK": 3} and not _hot_files(srv):
            break
        time.sleep(0.3)
    assert stats["tiers"]["cold"]["by_state"] == {"OK": 3}
    final, raw = _get_study(srv, corpus[0])
    assert final.Status == 0 and raw  # type: ignore[attr-defined]


def test_cold_tier_on_s3(make_server: Factory, corpus: list[Path], s3_config: S3Config,
                         s3_store: S3BlobStore) -> None:
    c = s3_config
    srv = make_server(LIFECYCLE + f'[cold]\nbackend = "s3"\n[cold.s3]\nendpoint_url = "{c.endpoint_url}"\n'
                      f'bucket = "{c.bucket}"\naccess_key = "{c.access_key}"\nsecret_key = "{c.secret_key}"\n')
    mr = [p for p in corpus if p.name.startswith("mr-")]
    assert all(r.Status == 0 for r in scu.store(srv.port, mr))
    report = _json(srv, "lifecycle", "run")
    assert report["done"] == 1 and report["failures"] == 0
    keys = list(s3_store.iter_keys())
    assert len(keys) == 1 and keys[0].endswith(".bundle")
    assert _hot_files(srv) == []
    final, raw = _get_study(srv, mr[0])
    assert final.Status == 0  # type: ignore[attr-defined]
    assert [raw[str(dcmread(p, stop_before_pixels=True).SOPInstanceUID)] for p in mr] == [dataset_bytes(p) for p in mr]
    # the config shows the secret masked
    shown = srv.cli("config", "show").stdout
    assert c.secret_key not in shown and "***" in shown


def test_age_by_last_access(make_server: Factory, corpus: list[Path]) -> None:
    srv = make_server("[lifecycle]\nmin_age_days = 0.0001\nage_basis = \"last_access\"\n")  # ~9 s
    ct0 = [p for p in corpus if p.name.startswith("ct-7-0000")]
    ct1 = [p for p in corpus if p.name.startswith("ct-7-0001")]
    assert all(r.Status == 0 for r in scu.store(srv.port, ct0 + ct1))
    time.sleep(9)
    final, _ = _get_study(srv, ct1[0])  # read: ct1 is "recently used" again
    assert final.Status == 0  # type: ignore[attr-defined]
    plan = _json(srv, "lifecycle", "plan")
    assert [s["study_uid"] for s in plan["studies"]] == [str(dcmread(ct0[0], stop_before_pixels=True).StudyInstanceUID)]


def test_cold_codec_px3_migrates_and_recalls_bit_exact(make_server: Factory, corpus: list[Path]) -> None:
    """``cold.codec = "dicom-px3"``: every bundle frame is px3 (greyscale pixels in version 3 frames),
    and every instance comes back over C-GET byte for byte."""
    from vna import pixelcodec, pixelcodec_native
    from vna.storage.bundle import decode_frame, read_manifest

    if not pixelcodec_native.available():
        import pytest

        pytest.skip("vna_native is not installed")
    srv = make_server(LIFECYCLE + '[cold]\ncodec = "dicom-px3"\n')
    shown = srv.cli("config", "show")
    assert shown.returncode == 0 and "dicom-px3" in shown.stdout, shown.stdout
    assert all(r.Status == 0 for r in scu.store(srv.port, corpus))
    report = _json(srv, "lifecycle", "run")
    assert report["done"] == 4 and report["failures"] == 0
    assert _hot_files(srv) == []
    versions: set[int] = set()
    for bundle in (srv.data_dir / "cold").rglob("*.bundle"):
        blob = bundle.read_bytes()
        for entry in read_manifest(blob):
            assert entry.codec == pixelcodec.CODEC_NAME_PX3
            frame = blob[entry.offset : entry.offset + entry.length]
            versions.add(pixelcodec.frame_info(frame).version)
            decode_frame(frame, entry)
    assert pixelcodec.FORMAT_VERSION_PX3 in versions
    _assert_every_study_recalls(srv, corpus)


@pytest.mark.parametrize("workers", [1, 2])
def test_serial_and_pooled_migration_write_the_same_verified_bundles(tmp_path: Path, workers: int) -> None:
    """cold.encode_workers = 1 runs the per-study pipeline inline, more runs it on a pool: either way
    every instance lands in its series' bundle, claimed once its frame restores it, its hot copies purged."""
    from benchmarks.corpus import write_corpus
    from vna.config import load_config
    from vna.domain import PlacementState, Tier
    from vna.storage.bundle import decode_frame

    files = write_corpus(tmp_path / "c", "mr", studies=2, per_study=5, seed=3)
    files += write_corpus(tmp_path / "c", "small", studies=1, per_study=3, seed=4)
    cfg = load_config(env={}, overrides={"archive": {"data_dir": str(tmp_path / "data"), "min_copies": 1},
                                         "lifecycle": {"min_age_days": 0}, "cold": {"encode_workers": workers}})
    archive = Archive(cfg)
    try:
        results = [archive.ingest.ingest_file(f) for f in files]
        report = archive.migrator().run_once()
        assert (report.done, report.failures) == (3, 0)
        bundles: set[str] = set()
        for f, r in zip(files, results):
            rows = archive.index.placements(r.sop_uid, r.version)
            assert [(p.tier, p.state) for p in rows] == [(Tier.COLD, PlacementState.OK)]
            cold = rows[0]
            assert cold.offset is not None and cold.length is not None
            frame = b"".join(archive.cold.stores[0].open(cold.blob_key, cold.offset, cold.length))
            entry = next(e for e in _manifest(archive, cold.blob_key) if e.sop_uid == r.sop_uid)
            assert decode_frame(frame, entry) == f.read_bytes()
            bundles.add(cold.blob_key)
        assert len(bundles) == 3
        assert not [p for p in (tmp_path / "data" / "hot").rglob("*.dcm") if ".tmp" not in p.parts]
    finally:
        archive.close()


def _manifest(archive: Archive, key: str) -> list[BundleEntry]:
    store = archive.cold.stores[0]
    size = store.stat(key).size
    return load_manifest(lambda off, n: b"".join(store.open(key, off, n)), size)
