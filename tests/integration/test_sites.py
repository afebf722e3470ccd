"""Federated sites without Cassandra: two ``vna serve`` processes sharing one SQLite index file.

The fast companion of ``test_federation.py`` (which runs the same roles on a
real 2-datacenter Cassandra cluster): cross-site retrieve over gRPC and C-GET,
``local_only`` peers, DR copies with ``--limit``, a site that is down, and
configuration errors.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any, Callable

import grpc
import pytest
from pydicom import dcmread

from benchmarks.corpus import write_corpus
from tests.conftest import ROOT, VNA, StoreScp, VnaServer, dataset_bytes, free_port, uid_of
from tests.integration import scu
from vna.api.client import ApiError, VnaClient

TOKENS = {"A": "sites-a-token-0123456789", "B": "sites-b-token-0123456789"}


def _config(site: str, index: Path, grpc_ports: dict[str, int], extra: str = "") -> str:
    other = "B" if site == "A" else "A"
    return f"""
[archive]
site_id = "{site}"
[index]
sqlite_path = "{index}"
[grpc]
enabled = true
host = "127.0.0.1"
port = {grpc_ports[site]}
[[grpc.token]]
name = "all"
token = "{TOKENS[site]}"
role = "write"
[federation]
health_timeout = 1.0
health_cache_seconds = 0
[[federation.site]]
id = "{other}"
grpc_endpoint = "127.0.0.1:{grpc_ports[other]}"
token = "{TOKENS[other]}"
{extra}
"""


def _studies(srv: VnaServer) -> dict[str, str]:
    rows, final = scu.find(srv.port, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "",
                                      "InstanceAvailability": "", "RetrieveAETitle": ""})
    assert final == 0
    assert {str(r.RetrieveAETitle) for r in rows} == {srv.ae_title}
    return {str(r.StudyInstanceUID): str(r.InstanceAvailability) for r in rows}


def _json(srv: VnaServer, *args: str) -> tuple[int, Any]:
    r = srv.cli(*args, "--json")
    assert r.stdout, r.stderr
    return r.returncode, json.loads(r.stdout)


def test_cross_site_retrieve_dr_copy_and_a_site_down(make_server: Callable[..., VnaServer], storescp: StoreScp,
                                                     tmp_path: Path) -> None:
    index = tmp_path / "shared.sqlite"
    ports = {"A": free_port(), "B": free_port()}
    ct = write_corpus(tmp_path / "ct", "ct", studies=1, per_study=2, seed=41)
    mr = write_corpus(tmp_path / "mr", "mr", studies=1, per_study=2, seed=42)
    sa, sa2 = uid_of(ct[0], "StudyInstanceUID"), uid_of(mr[0], "StudyInstanceUID")
    a = make_server(_config("A", index, ports), ae_title="VNA_A")
    dest = f'[[dicom.remote]]\nae_title = "DEST"\nhost = "127.0.0.1"\nport = {storescp.port}\n'
    b = make_server(_config("B", index, ports, f'[[federation.copy]]\nfrom_site = "A"\nstudy_uids = ["{sa}"]\n'
                                               + dest), ae_title="VNA_B")
    assert all(int(r.Status) == 0 for r in scu.store(a.port, ct + mr))

    # B finds A's studies and retrieves them from A, verified, byte-identical
    assert _studies(b) == {sa: "ONLINE", sa2: "ONLINE"}
    with VnaClient(f"127.0.0.1:{ports['A']}", TOKENS["A"]) as ca, \
            VnaClient(f"127.0.0.1:{ports['B']}", TOKENS["B"]) as cb:
        at_a = {i.sop_instance_uid: i.data for i in ca.retrieve(study_uid=sa)}
        assert {i.sop_instance_uid: i.data for i in cb.retrieve(study_uid=sa)} == at_a
        with pytest.raises(ApiError) as err:  # a peer's request: B's own copies only, and B has none
            list(cb.retrieve_to(tmp_path / "x", study_uid=sa, local_only=True))
        assert err.value.code == grpc.StatusCode.NOT_FOUND
    ds = dcmread(mr[0], stop_before_pixels=True)
    _, final, raw = scu.get(b.port, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": sa2}, [str(ds.SOPClassUID)])
    assert int(final.Status) == 0 and raw == {uid_of(f): dataset_bytes(f) for f in mr}
    _, final = scu.move(b.port, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": sa}, "DEST")
    assert int(final.Status) == 0
    assert sorted(dataset_bytes(f) for f in storescp.files()) == sorted(dataset_bytes(f) for f in ct)

    # B pulls a DR copy of the study its rule names, bounded and idempotent
    r = b.cli("sites", "copy", "--limit", "1", "--dry-run", "--progress-every", "0")  # issue 20
    assert "federation.copy: copying instances: 1 of 1 instances" in r.stderr and "1 not examined" in r.stdout, r
    code, rep = _json(b, "sites", "copy", "--limit", "1")
    assert code == 0 and (rep["examined"], rep["done"], rep["not_examined"]) == (1, 1, 1), rep
    code, rep = _json(b, "sites", "copy")
    assert code == 0 and (rep["examined"], rep["done"]) == (1, 1), rep
    code, rep = _json(b, "sites", "copy")
    assert code == 0 and rep["examined"] == 0, rep
    code, st = _json(b, "sites", "status")
    assert code == 0 and st["holdings"]["B"] == {"instances": 2, "bytes": sum(
        len(i) for i in at_a.values()), "dr_copies": 2}, st

    # A goes down: B answers for everything, says which data it cannot reach, serves its DR copy
    a.stop()
    assert _studies(b) == {sa: "ONLINE", sa2: "UNAVAILABLE"}
    with VnaClient(f"127.0.0.1:{ports['B']}", TOKENS["B"]) as cb:
        page = cb.query_response("STUDY", {"InstanceAvailability": ""})
        assert list(page.unreachable_sites) == ["A"]
        assert {i.sop_instance_uid: i.data for i in cb.retrieve(study_uid=sa)} == at_a
        with pytest.raises(ApiError) as err:
            list(cb.retrieve(study_uid=sa2))
        assert err.value.code == grpc.StatusCode.UNAVAILABLE
    _, final, raw = scu.get(b.port, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": sa2}, [str(ds.SOPClassUID)])
    assert int(final.Status) == 0xA702 and not raw
    r = b.cli("grpc", "query", "study", "InstanceAvailability=", "--target", f"127.0.0.1:{ports['B']}",
              "--token", TOKENS["B"])
    assert r.returncode == 0 and "InstanceAvailability=UNAVAILABLE" in r.stdout, r.stdout + r.stderr
    assert "sites not reachable now: A" in r.stderr
    code, st = _json(b, "sites", "status")
    assert code == 1 and [(s["id"], s["reachable"]) for s in st["sites"]] == [("B", True), ("A", False)]

    # the modality sends A's study to B too: the same bytes, a duplicate, and now B keeps its own copies
    assert all(int(r.Status) == 0 for r in scu.store(b.port, mr))
    assert _studies(b) == {sa: "ONLINE", sa2: "ONLINE"}
    _, final, raw = scu.get(b.port, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": sa2}, [str(ds.SOPClassUID)])
    assert int(final.Status) == 0 and raw == {uid_of(f): dataset_bytes(f) for f in mr}
    code, st = _json(b, "sites", "status")
    assert st["holdings"]["B"]["instances"] == 4 and st["holdings"]["B"]["dr_copies"] == 2, st


@pytest.mark.parametrize("body, message", [
    ('[[federation.site]]\nid = "B"\ngrpc_endpoint = "h:1"\ntoken = "0123456789abcdef"\n', "archive.site_id"),
    ('[archive]\nsite_id = "A"\n[[federation.site]]\nid = "A"\ngrpc_endpoint = "h:1"\ntoken = "0123456789abcdef"\n',
     "this site's id"),
    ('[archive]\nsite_id = "A@x"\n', "archive.site_id"),
    ('[archive]\nsite_id = "A"\n[[federation.site]]\nid = "B"\ngrpc_endpoint = "nohost"\ntoken = "0123456789abcdef"\n',
     "host:port"),
    ('[archive]\nsite_id = "A"\n[[federation.copy]]\nfrom_site = "C"\n', "is not a [[federation.site]]"),
])
def test_bad_federation_config_is_a_usage_error(tmp_path: Path, body: str, message: str) -> None:
    cfg = tmp_path / "vna.toml"
    cfg.write_text(body)
    r = subprocess.run([*VNA, "config", "show", "--config", str(cfg), "--data-dir", str(tmp_path / "d")],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 2 and message in r.stderr, r.stderr
