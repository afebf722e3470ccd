"""Storage and index faults on real filesystems (tmpfs mounts): no Success without W durable copies and an index row."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Callable, Iterator

import pytest
from pydicom import dcmread

from tests.conftest import VnaServer, dataset_bytes
from tests.integration import scu

Factory = Callable[..., VnaServer]


@pytest.fixture
def mount(tmp_path: Path) -> Iterator[Callable[[str, str], Path]]:
    """Mount small tmpfs filesystems (root only); all unmounted at teardown."""
    mounted: list[Path] = []

    def do(name: str, size: str = "16m") -> Path:
        p = tmp_path / name
        p.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(p)], capture_output=True, text=True)
        assert r.returncode == 0, f"tmpfs mount needs root: {r.stderr}"
        mounted.append(p)
        return p

    yield do
    for p in reversed(mounted):
        subprocess.run(["umount", "-l", str(p)], capture_output=True)


def remount(path: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(path)], check=True)


def _stats(srv: VnaServer) -> dict:  # type: ignore[type-arg]
    r = srv.cli("index", "stats", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*.dcm") if ".tmp" not in p.parts]


def _config(r1: Path, r2: Path, quorum: int = 0, extra: str = "") -> str:
    return f'[hot]\nreplicas = ["{r1}", "{r2}"]\nwrite_quorum = {quorum}\n{extra}'


def test_read_only_replica_fails_the_store_with_w2(make_server: Factory, mount: Callable[..., Path],
                                                  corpus: list[Path]) -> None:
    r1, r2 = mount("r1"), mount("r2")
    srv = make_server(_config(r1, r2))
    assert scu.store(srv.port, [corpus[0]])[0].Status == 0
    remount(r2, "ro")
    rsp = scu.store(srv.port, [corpus[1]])[0]
    assert rsp.Status == 0xA700, rsp
    assert "1 of 2 replicas" in str(rsp.ErrorComment)
    assert _stats(srv)["instances"] == 1
    assert len(_files(r1)) == 1  # the compensating delete removed the copy on r1
    remount(r2, "rw")
    assert scu.store(srv.port, [corpus[1]])[0].Status == 0  # the sender's retry succeeds
    assert _stats(srv)["instances"] == 2


def test_full_replica_with_w1_succeeds_and_records_missing(make_server: Factory, mount: Callable[..., Path],
                                                            corpus: list[Path]) -> None:
    r1, r2 = mount("r1"), mount("r2", "200k")
    srv = make_server(_config(r1, r2, quorum=1))
    ct = [p for p in corpus if p.name.startswith("ct-")][:2]
    rsps = scu.store(srv.port, ct)
    assert all(r.Status == 0 for r in rsps)
    stats = _stats(srv)
    assert stats["instances"] == 2
    assert stats["tiers"]["hot"]["by_state"] == {"OK": 2, "MISSING": 2}
    assert _files(r2) == [] and not list((r2 / ".tmp").iterdir())  # no partial file left on the full disk
    ds = dcmread(ct[0], stop_before_pixels=True)
    _, final, raw = scu.get(srv.port, {"QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": ds.StudyInstanceUID,
                                       "SeriesInstanceUID": ds.SeriesInstanceUID, "SOPInstanceUID": ds.SOPInstanceUID},
                            [str(ds.SOPClassUID)])
    assert final.Status == 0 and raw[str(ds.SOPInstanceUID)] == dataset_bytes(ct[0])


def test_all_replicas_full_fails_cleanly(make_server: Factory, mount: Callable[..., Path], corpus: list[Path]) -> None:
    r1, r2 = mount("r1", "200k"), mount("r2", "200k")
    srv = make_server(_config(r1, r2, quorum=1))
    ct = [p for p in corpus if p.name.startswith("ct-")][0]
    assert scu.store(srv.port, [ct])[0].Status == 0xA700
    assert _stats(srv)["instances"] == 0
    assert _files(r1) == [] and _files(r2) == []
    assert scu.echo(srv.port)


def test_index_failure_fails_the_store_and_removes_blobs(make_server: Factory, mount: Callable[..., Path],
                                                         corpus: list[Path], tmp_path: Path) -> None:
    idx = mount("index")
    r1, r2 = tmp_path / "h1", tmp_path / "h2"
    srv = make_server(_config(r1, r2, extra=f'[index]\nsqlite_path = "{idx}/index.sqlite"\n'))
    assert scu.store(srv.port, [corpus[0]])[0].Status == 0
    filler = idx / "filler"
    with open(filler, "wb") as fh:  # the index disk fills up
        try:
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()
        except OSError:
            pass
    rsp = scu.store(srv.port, [corpus[1]])[0]
    assert rsp.Status == 0xA700, rsp
    assert len(_files(r1)) == 1 and len(_files(r2)) == 1  # only the first instance's copies
    filler.unlink()
    assert scu.store(srv.port, [corpus[1]])[0].Status == 0
    assert _stats(srv)["instances"] == 2
    assert scu.echo(srv.port)
