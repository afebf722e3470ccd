"""The gRPC API against a real ``vna serve`` (DIMSE + gRPC in one process), over real channels.

Covers: Store/Retrieve bit-exact with client-side digest checks (and across
protocols: gRPC in, DIMSE C-GET out; DIMSE in, gRPC out), Query with the
C-FIND matching and paging, study metadata, the status table (INVALID_ARGUMENT,
NOT_FOUND, DATA_LOSS...), tokens and roles, TLS and mutual TLS, lifecycle and
integrity jobs, health, and the ``vna grpc`` verbs.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any, Callable

import grpc
import pytest
from pydicom import dcmread

from tests.conftest import ROOT, VNA, VnaServer, dataset_bytes, free_port, self_signed, stop_process, wait_port
from tests.integration import scu
from vna.api.client import ApiError, VnaClient
from vna.api._gen import archive_pb2 as pb
from vna.api._gen import archive_pb2_grpc as pb_grpc

Factory = Callable[..., VnaServer]

WRITE = "write-token-0123456789abcdef"
READ = "read-token-0123456789abcdef"


def grpc_config(port: int, extra: str = "", grpc_extra: str = "") -> str:
    return (f'[grpc]\nenabled = true\nhost = "127.0.0.1"\nport = {port}\n{grpc_extra}'
            f'[[grpc.token]]\nname = "writer"\ntoken = "{WRITE}"\nrole = "write"\n'
            f'[[grpc.token]]\nname = "reader"\ntoken = "{READ}"\nrole = "read"\n{extra}')


def start(make_server: Factory, extra: str = "", grpc_extra: str = "") -> tuple[VnaServer, int]:
    port = free_port()
    return make_server(grpc_config(port, extra, grpc_extra)), port


def client(port: int, token: str | None = WRITE, timeout: float | None = 60, **kwargs: Any) -> VnaClient:
    return VnaClient(f"127.0.0.1:{port}", token, timeout=timeout, **kwargs)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def uids(path: Path) -> Any:
    return dcmread(path, stop_before_pixels=True)


def test_store_retrieve_query_and_metadata(make_server: Factory, corpus: list[Path]) -> None:
    srv, port = start(make_server)
    via_grpc = [p for p in corpus if p.name.startswith("ct-")]
    via_dimse = [p for p in corpus if not p.name.startswith("ct-")]
    with client(port) as c:
        assert c.health() == "SERVING" and c.health("vna.v1.Archive") == "SERVING"
        results = [c.store(p) for p in via_grpc]
        assert [r.content_sha256 for r in results] == [sha(p) for p in via_grpc]
        assert not any(r.duplicate for r in results)
        assert c.store(via_grpc[0].read_bytes()).duplicate  # idempotent retry of the same bytes
        assert all(r.Status == 0 for r in scu.store(srv.port, via_dimse))

        # gRPC Retrieve, verified client-side: the files stored over gRPC come back bit-exact; those
        # stored over DIMSE (file meta written by the archive) with the dataset bytes that were sent
        for p in via_grpc:
            (inst,) = c.retrieve(sop_uid=str(uids(p).SOPInstanceUID))
            assert inst.data == p.read_bytes() and inst.content_sha256 == sha(p)
        for p in via_dimse:
            (inst,) = c.retrieve_to(srv.data_dir.parent / "from-dimse", sop_uid=str(uids(p).SOPInstanceUID))
            assert inst.path is not None and dataset_bytes(inst.path) == dataset_bytes(p)
            assert sha(inst.path) == inst.content_sha256
        # a whole study to disk
        study = str(uids(via_grpc[0]).StudyInstanceUID)
        got = list(c.retrieve_to(srv.data_dir.parent / "out", study_uid=study, chunk_size=10_000))
        mine = sorted((p for p in via_grpc if str(uids(p).StudyInstanceUID) == study), key=lambda p: p.name)
        assert len(got) == 3 and sorted(i.sop_instance_uid for i in got) == sorted(
            str(uids(p).SOPInstanceUID) for p in mine)
        for inst in got:
            assert inst.path is not None and sha(inst.path) == inst.content_sha256
        # stored over gRPC, retrieved over DIMSE C-GET: the same dataset bytes
        ds = uids(via_grpc[0])
        _, final, raw = scu.get(srv.port, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study},
                                [str(ds.SOPClassUID)])
        assert final.Status == 0 and len(raw) == 3
        for p in mine:
            assert raw[str(uids(p).SOPInstanceUID)] == dataset_bytes(p)

        # Query: C-FIND matching, the same answers as DIMSE, paged
        ident = {"PatientName": "test^patient0000", "StudyInstanceUID": "", "ModalitiesInStudy": ""}
        rows = list(c.query("STUDY", ident))
        dimse, status = scu.find(srv.port, {"QueryRetrieveLevel": "STUDY", **ident})
        assert status == 0
        assert sorted(r["StudyInstanceUID"] for r in rows) == sorted(str(d.StudyInstanceUID) for d in dimse)
        assert len(rows) == 3 and {r["ModalitiesInStudy"] for r in rows} == {"CT", "MR", "OT"}
        page, token = c.query_page("INSTANCE", {"Modality": "CT"}, page_size=4)
        assert len(page) == 4 and token
        page2, token2 = c.query_page("INSTANCE", {"Modality": "CT"}, page_size=4, page_token=token)
        assert len(page2) == 2 and token2 == ""
        assert {r["SOPInstanceUID"] for r in page + page2} == {str(uids(p).SOPInstanceUID) for p in via_grpc}
        assert len(list(c.query("INSTANCE", {}, page_size=5))) == len(corpus)
        everything = c.query_page("SERIES", {})[0][0]
        assert {"SeriesInstanceUID", "StudyInstanceUID", "PatientName", "NumberOfSeriesRelatedInstances"} <= set(
            everything)
        with pytest.raises(ApiError) as bad_token:
            c.query_page("INSTANCE", {"Modality": "MR"}, page_token=token)
        assert bad_token.value.code == grpc.StatusCode.INVALID_ARGUMENT

        meta = c.study_metadata(study)
        assert meta.availability == "ONLINE" and meta.attributes["PatientName"] == "TEST^PATIENT0000"
        (series,) = meta.series
        assert series.attributes["Modality"] == "CT"
        assert {i.sop_instance_uid: i.content_sha256 for i in series.instances} == {
            str(uids(p).SOPInstanceUID): sha(p) for p in mine}


def test_error_statuses_and_server_keeps_serving(make_server: Factory, corpus: list[Path], tmp_path: Path) -> None:
    srv, port = start(make_server)
    good = corpus[0]
    with client(port) as c:
        not_dicom = b"this is not DICOM" * 100
        with pytest.raises(ApiError) as err:
            c.store(not_dicom)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "cannot be parsed" in err.value.details
        assert err.value.error == "InvalidDataset"
        truncated = good.read_bytes()[:-5000]
        with pytest.raises(ApiError) as err:
            c.store(truncated)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "truncated" in err.value.details
        # a digest that does not match the bytes: refused before anything is stored
        stub = pb_grpc.ArchiveStub(c.channel)
        msgs = [pb.StoreRequest(header=pb.StoreHeader(content_sha256="0" * 64)),
                pb.StoreRequest(chunk=good.read_bytes())]
        with pytest.raises(grpc.RpcError) as rpc:
            stub.Store(iter(msgs), metadata=(("authorization", f"Bearer {WRITE}"),), timeout=30)
        assert rpc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert c.store(good).duplicate is False  # the server kept serving and stored nothing before
        with pytest.raises(ApiError) as err:
            list(c.retrieve(sop_uid="1.2.3.4.5.6.7"))
        assert err.value.code == grpc.StatusCode.NOT_FOUND
        with pytest.raises(ApiError) as err:
            list(c.retrieve(sop_uid="../../etc/passwd"))
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(ApiError) as err:
            c.study_metadata("1.2.3.4.5.6.7")
        assert err.value.code == grpc.StatusCode.NOT_FOUND
        with pytest.raises(ApiError) as err:
            c.query_page("STUDY", {"NotAKeyword": "x"})
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT

        # every copy of an instance corrupted: DATA_LOSS, and nothing wrong is sent as good
        sop = str(uids(good).SOPInstanceUID)
        for blob in (srv.data_dir / "hot").rglob(f"{sop}.v*"):
            data = bytearray(blob.read_bytes())
            data[-10] ^= 0xFF
            blob.write_bytes(bytes(data))
        with pytest.raises(ApiError) as err:
            list(c.retrieve(sop_uid=sop))
        assert err.value.code == grpc.StatusCode.DATA_LOSS and err.value.error == "LastVerifiedCopyLost"
        assert c.health() == "SERVING"
        assert c.store(corpus[1]).sop_instance_uid == str(uids(corpus[1]).SOPInstanceUID)


def test_tokens_and_roles(make_server: Factory, corpus: list[Path]) -> None:
    _, port = start(make_server)
    with client(port, token=None) as anonymous:
        assert anonymous.health() == "SERVING"  # probes need no token
        with pytest.raises(ApiError) as err:
            anonymous.query_page("STUDY", {})
        assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(ApiError) as err:
            anonymous.store(corpus[0])
        assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
    with client(port, token="not-a-configured-token-at-all") as stranger:
        with pytest.raises(ApiError) as err:
            list(stranger.retrieve(sop_uid="1.2.3"))
        assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
    with client(port, token=READ) as reader:
        with pytest.raises(ApiError) as err:
            reader.store(corpus[0])
        assert err.value.code == grpc.StatusCode.PERMISSION_DENIED and "write" in err.value.details
        with pytest.raises(ApiError) as err:
            reader.lifecycle_run()
        assert err.value.code == grpc.StatusCode.PERMISSION_DENIED
        assert reader.query_page("STUDY", {})[0] == []  # nothing was stored by the refused calls
    with client(port, token=WRITE) as writer:
        writer.store(corpus[0])
    with client(port, token=READ) as reader:
        (inst,) = reader.retrieve(sop_uid=str(uids(corpus[0]).SOPInstanceUID))
        assert inst.data == corpus[0].read_bytes()


def test_tls_and_mutual_tls(make_server: Factory, corpus: list[Path], tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path, "server")
    ccert, ckey = self_signed(tmp_path, "client")
    srv, port = start(make_server, grpc_extra=f'tls_cert = "{cert}"\ntls_key = "{key}"\n')
    with client(port, root_certificates=cert.read_bytes()) as c:
        assert c.health() == "SERVING"
        assert c.store(corpus[0]).content_sha256 == sha(corpus[0])
    with client(port, timeout=None) as plain:  # a plaintext client gets no answer from the TLS port
        with pytest.raises(ApiError) as err:
            plain._call(plain.health_stub.Check, _health_request())  # noqa: SLF001
        assert err.value.code == grpc.StatusCode.UNAVAILABLE
    srv.stop()

    srv2, port2 = start(make_server, grpc_extra=f'tls_cert = "{cert}"\ntls_key = "{key}"\nclient_ca = "{ccert}"\n')
    with client(port2, root_certificates=cert.read_bytes(), certificate_chain=ccert.read_bytes(),
                private_key=ckey.read_bytes()) as mutual:
        assert mutual.store(corpus[1]).content_sha256 == sha(corpus[1])
    with client(port2, root_certificates=cert.read_bytes()) as no_cert:
        with pytest.raises(ApiError) as err:
            no_cert.query_page("STUDY", {})
        assert err.value.code == grpc.StatusCode.UNAVAILABLE
    shown = srv2.cli("config", "show").stdout
    assert WRITE not in shown and READ not in shown and '"***"' in shown


def _health_request() -> Any:
    from grpc_health.v1 import health_pb2

    return health_pb2.HealthCheckRequest(service="")


def test_lifecycle_over_grpc(make_server: Factory, corpus: list[Path]) -> None:
    _, port = start(make_server, extra="[archive]\nmin_copies = 1\n[lifecycle]\nmin_age_days = 0\n")
    files = [p for p in corpus if p.name.startswith("ct-")]
    held, other = sorted({str(uids(p).StudyInstanceUID) for p in files})
    with client(port) as c:
        for p in files:
            c.store(p)
        plan = c.lifecycle_plan()
        assert {s.study_instance_uid for s in plan.studies} == {held, other} and plan.instances == 6
        status = c.set_hold(held, True, "litigation 2026-17")
        assert status.held and status.hot_instances == 3 and status.availability == "ONLINE"
        assert [s.study_instance_uid for s in c.lifecycle_plan().studies] == [other]
        dry = c.lifecycle_run(dry_run=True)
        assert dry.dry_run and dry.examined == 1 and dry.done == 0
        report = c.lifecycle_run(limit=10)
        assert report.job == "lifecycle" and report.done == 1 and report.failures == 0
        moved = c.lifecycle_status(other)
        assert (moved.cold_instances, moved.hot_instances, moved.availability) == (3, 0, "NEARLINE")
        assert c.study_metadata(other).availability == "NEARLINE"
        kept = c.lifecycle_status(held)
        assert kept.held and kept.hot_instances == 3 and kept.cold_instances == 0
        for p in files:  # recalled from the cold bundle, verified, bit-exact
            if str(uids(p).StudyInstanceUID) == other:
                (inst,) = c.retrieve(sop_uid=str(uids(p).SOPInstanceUID))
                assert inst.data == p.read_bytes()
        assert not c.set_hold(held, False).held
        assert c.lifecycle_run().done == 1
        with pytest.raises(ApiError) as err:
            c.set_hold("1.2.3.4.5", True)
        assert err.value.code == grpc.StatusCode.NOT_FOUND


def test_integrity_over_grpc(make_server: Factory, corpus: list[Path]) -> None:
    srv, port = start(make_server)
    files = [p for p in corpus if p.name.startswith("small-")]
    with client(port) as c:
        for p in files:
            c.store(p)
        report = c.integrity_report()
        assert report.findings == 0 and report.instance_versions == 4
        (hot,) = report.tiers
        assert hot.name == "hot" and hot.by_state["OK"] == 8 and hot.verified["<1d"] == 8
        assert json.loads(report.report_json)["instance_versions"] == 4

        victim = str(uids(files[0]).SOPInstanceUID)
        (blob,) = (srv.data_dir / "hot" / "r2").rglob(f"{victim}.v*")
        data = bytearray(blob.read_bytes())
        data[200] ^= 0x01
        blob.write_bytes(bytes(data))
        first = c.scrub(limit=5)
        assert first.job == "integrity.scrub" and first.examined == 5 and first.level == "content"
        rest = c.scrub(limit=100)
        assert rest.examined == 8 - first.findings  # every copy still OK, oldest verified first
        assert first.findings + rest.findings == 1
        details = [dict(d.fields) for d in (*first.details, *rest.details)]
        assert [(d["sop_uid"], d["store"], d["outcome"]) for d in details] == [(victim, "hot-2", "CORRUPT")]
        report = c.integrity_report()
        assert report.damaged.count == 1 and report.damaged.items[0].sop_instance_uid == victim
        assert report.damaged.items[0].fields["store"] == "hot-2"
        assert report.under_replicated.count == 1 and report.findings == 3  # + 1 below archive.min_copies
        (inst,) = c.retrieve(sop_uid=victim)  # the other replica still verifies
        assert inst.data == files[0].read_bytes()
        with pytest.raises(ApiError) as err:
            c.scrub(limit=1, level="thorough")
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with client(port, token=READ) as reader:
        assert reader.integrity_report().damaged.count == 1
        with pytest.raises(ApiError) as err:
            reader.scrub(limit=1)
        assert err.value.code == grpc.StatusCode.PERMISSION_DENIED


def test_cli_verbs(make_server: Factory, corpus: list[Path], tmp_path: Path) -> None:
    srv, port = start(make_server)
    files = [p for p in corpus if p.name.startswith("mr-")]
    r = srv.cli("grpc", "health")
    assert r.returncode == 0 and r.stdout.strip() == "SERVING", r.stderr
    r = srv.cli("grpc", "store", *map(str, files), "--token", WRITE)
    assert r.returncode == 0 and "2 stored, 0 failed" in r.stdout, r.stderr
    r = srv.cli("grpc", "store", str(files[0]), "--token", READ)
    assert r.returncode == 1 and "PERMISSION_DENIED" in r.stderr
    r = srv.cli("grpc", "query", "instance", "Modality=MR", "SOPInstanceUID=", "--json", "--page-size", "1",
                "--token", READ)
    assert r.returncode == 0, r.stderr
    assert sorted(row["SOPInstanceUID"] for row in json.loads(r.stdout)) == sorted(
        str(uids(p).SOPInstanceUID) for p in files)
    study = str(uids(files[0]).StudyInstanceUID)
    out = tmp_path / "retrieved"
    r = srv.cli("grpc", "retrieve", study, "--level", "study", "-o", str(out), "--token", READ)
    assert r.returncode == 0 and "2 instances retrieved and verified" in r.stdout, r.stderr
    for p in files:
        assert (out / f"{uids(p).SOPInstanceUID}.dcm").read_bytes() == p.read_bytes()
    r = srv.cli("grpc", "metadata", study, "--token", READ)
    assert r.returncode == 0 and json.loads(r.stdout)["availability"] == "ONLINE"
    r = srv.cli("grpc", "retrieve", "1.2.3.4", "-o", str(out), "--token", READ)
    assert r.returncode == 1 and "NOT_FOUND" in r.stderr
    r = srv.cli("grpc", "query", "study", "nonsense", "--token", READ)
    assert r.returncode == 2
    assert srv.stop() == 0
    assert "gRPC API listening on 127.0.0.1:" in srv.log.read_text()


def test_grpc_in_every_worker_process(make_server: Factory, corpus: list[Path]) -> None:
    srv, port = start(make_server, extra="[dicom]\nworkers = 2\n")
    assert "2 worker processes" in srv.log.read_text()
    assert srv.log.read_text().count(f"gRPC API listening on 127.0.0.1:{port}") == 2
    files = [p for p in corpus if p.name.startswith("small-")]
    for p in files:  # a channel per call: the kernel spreads connections over the workers (SO_REUSEPORT)
        with client(port) as c:
            assert c.store(p).content_sha256 == sha(p)
    with client(port, token=READ) as c:
        assert len(list(c.query("INSTANCE", {"Modality": "OT"}))) == 4
    assert srv.stop() == 0


def test_serve_grpc_only(tmp_path: Path, corpus: list[Path]) -> None:
    port = free_port()
    config = tmp_path / "grpc-only.toml"
    config.write_text(grpc_config(port))
    log = tmp_path / "serve.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([*VNA, "serve", "--no-dicom", "--config", str(config), "--data-dir",
                                 str(tmp_path / "data")], stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        wait_port("127.0.0.1", port, 30, proc)
        with client(port) as c:
            assert c.health() == "SERVING"
            assert c.store(corpus[0]).size == corpus[0].stat().st_size
        assert "DICOM AE" not in log.read_text()
    finally:
        assert stop_process(proc) == 0
    r = subprocess.run([*VNA, "serve", "--no-dicom", "--data-dir", str(tmp_path / "data")],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 2 and "nothing to serve" in r.stderr


def test_audit_trail_unavailable_is_unavailable(make_server: Factory, corpus: list[Path]) -> None:
    _, port = start(make_server, '[audit]\npath = "/dev/full"\n')  # every audit write: ENOSPC -> refused
    with client(port) as c:
        with pytest.raises(ApiError) as err:
            c.store(corpus[0])
        assert err.value.code == grpc.StatusCode.UNAVAILABLE and err.value.error == "AuditUnavailable"
        with pytest.raises(ApiError) as err:
            c.query_page("STUDY", {"StudyInstanceUID": ""})
        assert err.value.code == grpc.StatusCode.UNAVAILABLE and err.value.error == "AuditUnavailable"
