"""archive.min_copies: the lifecycle never leaves fewer verified copies than the minimum, the report warns below it."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import pytest
from pydicom import dcmread

from benchmarks.corpus import write_corpus
from tests.conftest import VnaServer, dataset_bytes
from tests.integration import scu
from vna.domain import PlacementState, Tier

Factory = Callable[..., VnaServer]


def _json(srv: VnaServer, *args: str) -> Any:
    r = srv.cli(*args, "--json")
    assert r.returncode in (0, 1), r.stdout + r.stderr
    return json.loads(r.stdout)


def _ct(corpus: list[Path]) -> list[Path]:
    return [p for p in corpus if p.name.startswith("ct-7-0000")]


def _sop(p: Path) -> str:
    return str(dcmread(p, stop_before_pixels=True).SOPInstanceUID)


def _copies(srv: VnaServer, sop_uid: str) -> list[tuple[str, str]]:
    """(tier, state) of every copy of one instance."""
    fixity = _json(srv, "integrity", "report", "--instance", sop_uid)
    return sorted((c["tier"], c["state"]) for c in fixity["copies"])


@pytest.mark.parametrize(("min_copies", "cold", "kept"), [
    (2, "", 1),                         # a cold directory counts 1: one hot copy stays
    (1, "", 0),                         # as before: every hot copy retired
    (2, "[cold]\nredundancy = 2\n", 0),  # a cold store declaring redundancy 2 covers the minimum alone
    (3, "", 2),                         # 2 hot + 1 cold = 3: no hot copy may go
])
def test_migration_keeps_hot_copies_until_min_copies_holds(make_server: Factory, corpus: list[Path],
                                                          min_copies: int, cold: str, kept: int) -> None:
    srv = make_server(f"[archive]\nmin_copies = {min_copies}\n[lifecycle]\nmin_age_days = 0\n{cold}")
    ct = _ct(corpus)
    assert all(r.Status == 0 for r in scu.store(srv.port, ct))

    r = srv.cli("lifecycle", "plan")
    assert r.returncode == 0, r.stderr
    counts = f"cold tier counts {2 if cold else 1} cop{'ies' if cold else 'y'}, archive.min_copies = {min_copies}"
    if kept:
        assert f"keeps {kept} hot cop{'y' if kept == 1 else 'ies'} per instance: {counts}" in r.stdout, r.stdout
    else:
        assert f"removes every hot copy: {counts}" in r.stdout, r.stdout
    assert _json(srv, "lifecycle", "plan")["hot_copies_kept"] == kept

    report = _json(srv, "lifecycle", "run")
    assert report["done"] == 1 and report["failures"] == 0 and report["findings"] == 0, report
    for p in ct:
        assert _copies(srv, _sop(p)) == sorted([("cold", "OK")] + [("hot", "OK")] * kept)
    hot_files = [f for f in (srv.data_dir / "hot").rglob("*.dcm") if ".tmp" not in f.parts]
    assert len(hot_files) == kept * len(ct)

    rep = _json(srv, "integrity", "report")
    assert rep["below_min_copies"] == {"count": 0, "min_copies": min_copies, "items": []}
    assert rep["under_replicated"]["count"] == 0 and rep["findings"] == 0, rep
    assert rep["single_copy"]["count"] == (len(ct) if min_copies == 1 or cold else 0)
    # nothing left to do: a second run neither migrates nor retires, repair does not rebuild the retired copies
    assert _json(srv, "lifecycle", "run")["examined"] == 0
    repair = _json(srv, "integrity", "repair")
    assert repair["done"] == 0 and repair["examined"] == 0, repair
    _, final, raw = scu.get(srv.port, {"QueryRetrieveLevel": "STUDY",
                                       "StudyInstanceUID": str(dcmread(ct[0], stop_before_pixels=True).StudyInstanceUID)},
                            [str(dcmread(ct[0], stop_before_pixels=True).SOPClassUID)])
    assert final.Status == 0 and all(raw[_sop(p)] == dataset_bytes(p) for p in ct)


def test_copies_marked_to_delete_earlier_are_not_purged_below_the_minimum(make_server: Factory,
                                                                         corpus: list[Path]) -> None:
    """A hot copy marked TO_DELETE (e.g. by a run under an older config) is verified and kept, not purged."""
    from vna.index.sqlite import SqliteIndex

    srv = make_server("[lifecycle]\nmin_age_days = 0\n")  # archive.min_copies defaults to 2
    ct = _ct(corpus)
    assert all(r.Status == 0 for r in scu.store(srv.port, ct))
    assert _json(srv, "lifecycle", "run")["done"] == 1
    index = SqliteIndex(srv.data_dir / "index.sqlite")
    try:
        for p in ct:
            (hot,) = [r for r in index.placements(_sop(p)) if r.tier is Tier.HOT]
            assert index.transition(hot, PlacementState.TO_DELETE)
    finally:
        index.close()
    assert _json(srv, "integrity", "report")["below_min_copies"]["count"] == len(ct)  # TO_DELETE is no copy

    r = srv.cli("lifecycle", "purge", "--yes", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    purge = json.loads(r.stdout)
    assert purge["done"] == 0 and purge["examined"] == len(ct), purge
    assert all(d["kept"] == "archive.min_copies = 2" for d in purge["details"])
    for p in ct:
        assert _copies(srv, _sop(p)) == [("cold", "OK"), ("hot", "OK")]
    assert len([f for f in (srv.data_dir / "hot").rglob("*.dcm") if ".tmp" not in f.parts]) == len(ct)
    rep = _json(srv, "integrity", "report")
    assert rep["below_min_copies"]["count"] == 0 and rep["findings"] == 0, rep


def test_report_warns_about_instances_below_min_copies(make_server: Factory, corpus: list[Path]) -> None:
    srv = make_server()
    ct = _ct(corpus)
    assert all(r.Status == 0 for r in scu.store(srv.port, ct))
    r = srv.cli("integrity", "report")
    assert r.returncode == 0 and "below archive.min_copies (2): 0" in r.stdout and "WARNING" not in r.stdout

    victim = sorted((srv.data_dir / "hot" / "r1").rglob("*.dcm"))[0]
    victim.unlink()
    assert srv.cli("integrity", "scrub").returncode == 1
    r = srv.cli("integrity", "report")
    assert r.returncode == 1
    assert "below archive.min_copies (2): 1" in r.stdout, r.stdout
    assert "WARNING: 1 instance version(s) have fewer than archive.min_copies = 2 verified copies" in r.stdout
    rep = _json(srv, "integrity", "report")
    (item,) = rep["below_min_copies"]["items"]
    assert item["copies"] == 1 and item["min_copies"] == 2

    # a stricter minimum: every instance (2 hot copies) is below 3
    srv.config.write_text("[archive]\nmin_copies = 3\n")
    rep = _json(srv, "integrity", "report")
    assert rep["below_min_copies"]["count"] == len(ct) and rep["findings"] >= len(ct)
    r = srv.cli("integrity", "report")
    assert f"WARNING: {len(ct)} instance version(s) have fewer than archive.min_copies = 3" in r.stdout


def test_serve_warns_when_the_stores_cannot_reach_min_copies(make_server: Factory) -> None:
    srv = make_server("[archive]\nmin_copies = 3\n")
    log = srv.log.read_text()
    assert "archive.min_copies = 3 cannot be met: the 2 hot replica(s) count 2 copies" in log, log[-2000:]
    ok = make_server("[archive]\nmin_copies = 3\n[lifecycle]\nenabled = true\n")
    log = ok.log.read_text()  # 2 hot + 1 cold once migrated: reachable, but not at ingest
    assert "cannot be met" not in log
    assert "archive.min_copies = 3: the 2 hot replica(s) count 2 copies; new instances are below the minimum " \
           "until the lifecycle migrates them" in log, log[-2000:]


def test_a_damaged_hot_copy_the_minimum_needs_is_left_for_the_repairer(make_server: Factory,
                                                                       corpus: list[Path]) -> None:
    srv = make_server("[archive]\nmin_copies = 3\n[lifecycle]\nmin_age_days = 0\n")  # 2 hot + 1 cold: all stay
    ct = _ct(corpus)
    assert all(r.Status == 0 for r in scu.store(srv.port, ct))
    victim = sorted((srv.data_dir / "hot" / "r2").rglob("*.dcm"))[0]
    victim.unlink()
    assert srv.cli("integrity", "scrub").returncode == 1
    assert _json(srv, "lifecycle", "run")["done"] == 1
    states = [_copies(srv, _sop(p)) for p in ct]
    assert sorted(states)[0] == [("cold", "OK"), ("hot", "MISSING"), ("hot", "OK")], states  # not retired
    repair = _json(srv, "integrity", "repair")
    assert repair["done"] == 1 and repair["failures"] == 0, repair
    for p in ct:
        assert _copies(srv, _sop(p)) == [("cold", "OK"), ("hot", "OK"), ("hot", "OK")]
    rep = _json(srv, "integrity", "report")
    assert rep["below_min_copies"]["count"] == 0 and rep["findings"] == 0, rep


def test_a_copy_kept_by_a_concurrent_purge_after_its_blob_was_deleted_is_marked_missing(tmp_path: Path) -> None:
    """Purge A deletes the blob of a TO_DELETE copy while purge B has just put that row back to OK:
    the row must not go on claiming a verified copy that is gone."""
    from vna.archive import Archive
    from vna.config import load_config
    from vna.lifecycle.migrator import Purger

    cfg = load_config(env={}, overrides={"archive": {"data_dir": str(tmp_path / "data"), "min_copies": 1}})
    archive = Archive(cfg)
    try:
        src = write_corpus(tmp_path / "corpus", "small", 1, 1)[0]
        result = archive.ingest.ingest_file(src)
        rows = archive.index.placements(result.sop_uid, result.version)
        first = next(p for p in rows if p.tier is Tier.HOT)
        assert archive.index.transition(first, PlacementState.TO_DELETE)
        stale = next(p for p in archive.index.placements(result.sop_uid, result.version)
                     if p.store_id == first.store_id)
        assert archive.index.transition(stale, PlacementState.OK, verified_at=time.time())  # purge B kept it
        purger = Purger(archive.index, archive.tiers, audit=archive.audit, copies=archive.copies)
        assert not purger.purge(stale, verify=False)  # purge A, working from the TO_DELETE row it read
        now = next(p for p in archive.index.placements(result.sop_uid, result.version)
                   if p.store_id == first.store_id)
        assert now.state is PlacementState.MISSING
    finally:
        archive.close()
