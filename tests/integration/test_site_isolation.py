"""Two sites sharing one index: each site's jobs touch only its own placements.

Site A and site B are two data directories (their own hot and cold tiers)
recording into one shared SQLite index, the way two datacenters share the
Cassandra keyspace. Every job runs through the ``vna`` CLI of one site; the
other site's placements must come out exactly as they went in.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom import dcmread

from benchmarks.corpus import write_corpus
from tests.conftest import ROOT, VNA
from vna.config import load_config
from vna.domain import Placement, PlacementState, Tier, site_of
from vna.index import open_index


@dataclass
class Site:
    id: str
    data: Path
    config: Path

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*VNA, *args, "--config", str(self.config), "--data-dir", str(self.data)],
                              capture_output=True, text=True, cwd=ROOT, timeout=120)

    def job(self, *args: str) -> tuple[int, dict]:  # type: ignore[type-arg]
        r = self.cli(*args, "--json")
        assert r.stdout, r.stderr
        return r.returncode, json.loads(r.stdout)


@pytest.fixture
def sites(tmp_path: Path) -> tuple[Site, Site, Path]:
    index = tmp_path / "shared-index.sqlite"
    out = []
    for sid in ("A", "B"):
        cfg = tmp_path / f"{sid}.toml"
        cfg.write_text(f'[archive]\nsite_id = "{sid}"\nmin_copies = 1\n[index]\nsqlite_path = "{index}"\n'
                       '[lifecycle]\nmin_age_days = 0\n')
        data = tmp_path / f"site-{sid}"
        data.mkdir()
        out.append(Site(sid, data, cfg))
    return out[0], out[1], index


def _ledger(site: Site) -> dict[tuple[str, str], Placement]:
    cfg = load_config(site.config, overrides={"archive": {"data_dir": str(site.data)}})
    index = open_index(cfg)
    try:
        return {(p.sop_uid, p.store_id): p for p in index.iter_placements()}
    finally:
        index.close()


def _store(site: Site, files: list[Path]) -> None:
    r = site.cli("store", *map(str, files))
    assert r.returncode == 0, r.stderr


def test_jobs_of_one_site_never_touch_the_other_sites_placements(sites: tuple[Site, Site, Path],
                                                                  tmp_path: Path) -> None:
    a, b, _ = sites
    write_corpus(tmp_path / "ca", "ct", studies=1, per_study=2, seed=11)
    write_corpus(tmp_path / "cb", "mr", studies=1, per_study=2, seed=12)
    files_a = sorted((tmp_path / "ca").glob("*.dcm"))
    files_b = sorted((tmp_path / "cb").glob("*.dcm"))
    _store(a, files_a)
    _store(b, files_b)
    uids_b = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files_b}

    before = _ledger(a)
    assert {site_of(sid) for _, sid in before} == {"A", "B"}, "every placement names its site"
    assert all(sid.endswith("@B") for uid, sid in before if uid in uids_b)
    b_rows = {k: v for k, v in before.items() if site_of(k[1]) == "B"}
    assert len(b_rows) == 4 and all(p.state is PlacementState.OK for p in b_rows.values())

    # B damages one of its copies (deleted blob): only B's scrubber may find it
    victim = sorted(p for p in (b.data / "hot" / "r1").rglob("*.dcm"))[0]
    victim.unlink()

    code, rep = a.job("integrity", "scrub")
    assert code == 0, rep
    assert rep["examined"] == 4 and rep["failures"] == 0  # A's 2 instances x 2 hot replicas only
    assert set(rep["stores"]) == {"hot-1@A", "hot-2@A"}
    code, rep = a.job("integrity", "repair")
    assert code == 0 and rep["examined"] == 0 and rep["done"] == 0, rep  # B's instances are not re-replicated here
    code, rep = a.job("integrity", "report")
    assert set(rep["stores"]) == {"hot-1@A", "hot-2@A"} and rep["findings"] == 0, rep
    code, rep = a.job("integrity", "orphans")
    assert code == 0, rep

    # A's lifecycle moves A's study to A's cold tier and purges only A's hot copies
    code, rep = a.job("lifecycle", "run")
    assert code == 0 and rep["done"] == 1, rep
    after = _ledger(a)
    assert {k: v for k, v in after.items() if site_of(k[1]) == "B"} == b_rows, "A's jobs changed B's placements"
    a_rows = {k: v for k, v in after.items() if site_of(k[1]) == "A"}
    assert {(p.tier, p.store_id) for p in a_rows.values()} == {(Tier.COLD, "cold-1@A")}

    # B's own scrubber finds the damage, B's repairer rebuilds it; A's rows are untouched
    code, rep = b.job("integrity", "scrub")
    assert code == 1 and rep["findings"] == 1, rep
    code, rep = b.job("integrity", "repair")
    assert code == 0 and rep["done"] == 1, rep
    final = _ledger(b)
    assert {k: v for k, v in final.items() if site_of(k[1]) == "A"} == a_rows
    assert all(p.state is PlacementState.OK for k, p in final.items() if site_of(k[1]) == "B")


def test_retrieve_of_another_sites_instance_is_unavailable_without_federation(
        sites: tuple[Site, Site, Path], tmp_path: Path) -> None:
    """Without [[federation.site]] B's copies cannot be fetched from A: a clear error, nothing marked."""
    from vna.archive import Archive
    from vna.errors import SiteUnavailable

    a, b, _ = sites
    write_corpus(tmp_path / "cb", "mr", studies=1, per_study=1, seed=13)
    files = sorted((tmp_path / "cb").glob("*.dcm"))
    _store(b, files)
    uid = str(dcmread(files[0], stop_before_pixels=True).SOPInstanceUID)
    before = _ledger(a)
    archive = Archive(load_config(a.config, overrides={"archive": {"data_dir": str(a.data)}}))
    try:
        with pytest.raises(SiteUnavailable):
            with archive.retrieve.open_verified(uid):
                pass
        assert not archive.is_committed(uid)
    finally:
        archive.close()
    assert _ledger(a) == before
