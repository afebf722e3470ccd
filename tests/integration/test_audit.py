"""The audit trail against a real `vna serve`: what DIMSE traffic and jobs record, the hash chain,
`vna audit verify|search`, and the failure policies (full audit disk, unreachable syslog collector)."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from pydicom import dcmread

from tests.conftest import ROOT, VNA, StoreScp, VnaServer, free_port
from tests.integration import scu
from vna.audit import GENESIS, Actor, AuditLog, INSTANCES_TRANSFERRED, QUERY, record_hash, verify
from vna.config import AuditConfig

Factory = Callable[..., VnaServer]


def _records(srv: VnaServer) -> list[dict[str, Any]]:
    path = srv.data_dir / "audit" / "audit.log"
    return [json.loads(line) for line in path.read_text().splitlines()]


def _stats(srv: VnaServer) -> dict[str, Any]:
    r = srv.cli("index", "stats", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def _head(path: Path) -> tuple[str, str]:
    ds = dcmread(path, stop_before_pixels=True)
    return str(ds.PatientID), str(ds.StudyInstanceUID)


def _wait(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_dimse_traffic_is_audited(make_server: Factory, corpus: list[Path], storescp: StoreScp) -> None:
    srv = make_server('[dicom]\nallowed_calling_aes = ["TESTSCU", "DEST"]\n'
                      f'[[dicom.remote]]\nae_title = "DEST"\nhost = "127.0.0.1"\nport = {storescp.port}\n')
    assert all(r.Status == 0 for r in scu.store(srv.port, corpus))
    mr = [p for p in corpus if p.name.startswith("mr-")]
    patient, study = _head(mr[0])
    found, status = scu.find(srv.port, {"QueryRetrieveLevel": "STUDY", "PatientID": patient,
                                        "StudyInstanceUID": study})
    assert status == 0 and len(found) == 1
    _, final, _ = scu.get(srv.port, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study},
                          [str(dcmread(mr[0], stop_before_pixels=True).SOPClassUID)])
    assert final.Status == 0
    _, final = scu.move(srv.port, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study}, "DEST")
    assert final.Status == 0
    assert not scu.echo(srv.port, calling="INTRUDER")
    r = srv.cli("lifecycle", "hold", study, "--reason", "litigation")
    assert r.returncode == 0, r.stdout + r.stderr
    assert srv.stop() == 0

    recs = _records(srv)
    assert [r["seq"] for r in recs] == list(range(1, len(recs) + 1))
    start, stop = recs[0], recs[-1]
    assert (start["event_id"], start["event_type"]["code"]) == ("110100", "110120")
    assert len(start["details"]["config_sha256"]) == 64
    assert (stop["event_id"], stop["event_type"]["code"]) == ("110100", "110121")

    stored = [r for r in recs if r["event_id"] == "110104" and r["action"] == "C"]
    # one association: one record per study, listing its instances
    assert len(stored) == len({_head(p)[1] for p in corpus}) and all(r["outcome"] == 0 for r in stored)
    assert sum(r["details"]["count"] for r in stored) == len(corpus)
    assert len({r["details"]["association"] for r in stored}) == 1
    assert {r["actor"]["id"] for r in stored} == {"TESTSCU"} and stored[0]["actor"]["address"] == "127.0.0.1"
    (mine,) = [r for r in stored if r["study_uids"] == [study]]
    assert mine["patient_ids"] == [patient] and mine["details"]["count"] == len(mr)
    assert mine["details"]["bytes"] == sum(i["bytes"] for i in mine["details"]["instances"]) > 0
    assert {i["sop_uid"] for i in mine["details"]["instances"]} == {
        str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in mr}
    assert mine["details"]["sop_classes"] == {str(dcmread(mr[0], stop_before_pixels=True).SOPClassUID): len(mr)}

    (query,) = [r for r in recs if r["event_id"] == "110112"]
    assert query["action"] == "E" and query["patient_ids"] == [patient] and query["study_uids"] == [study]
    assert query["details"]["level"] == "STUDY" and query["details"]["matches"] == 1

    sent = [r for r in recs if r["event_id"] == "110104" and r["action"] == "R"]
    by_op = {r["details"]["op"]: r for r in sent}
    assert set(by_op) == {"c-get", "c-move"}
    for r in sent:
        assert r["outcome"] == 0 and r["study_uids"] == [study] and r["patient_ids"] == [patient]
        assert r["details"]["completed"] == len(mr) and r["details"]["failed"] == 0
    assert by_op["c-move"]["details"]["destination"] == {"id": "DEST", "kind": "ae",
                                                         "address": f"127.0.0.1:{storescp.port}"}

    (auth,) = [r for r in recs if r["event_id"] == "110114"]
    assert auth["outcome"] == 4 and auth["actor"]["id"] == "INTRUDER" and auth["event_type"]["code"] == "110122"

    (hold,) = [r for r in recs if r["event_id"] == "110103"]
    assert hold["action"] == "U" and hold["study_uids"] == [study] and hold["patient_ids"] == [patient]
    assert hold["details"] == {"change": "legal hold placed", "reason": "litigation"}
    assert hold["actor"]["kind"] == "user"

    r = srv.cli("audit", "verify", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(r.stdout)["intact"] is True
    # verify itself is recorded (Audit Log Used) and the chain still holds
    assert _records(srv)[-1]["event_id"] == "110101"
    assert verify(srv.data_dir / "audit" / "audit.log").intact


def test_grpc_calls_are_audited_with_the_token_identity(make_server: Factory, corpus: list[Path]) -> None:
    """Store, Query, Retrieve, metadata and holds over gRPC name the token and the peer; refusals are audited."""
    from vna.api.client import ApiError, VnaClient

    port = free_port()
    srv = make_server(f'[grpc]\nenabled = true\nhost = "127.0.0.1"\nport = {port}\n'
                      '[[grpc.token]]\nname = "ris-gateway"\ntoken = "token-of-the-ris-0123"\nrole = "write"\n')
    mr = [p for p in corpus if p.name.startswith("mr-")]
    patient, study = _head(mr[0])
    with VnaClient(f"127.0.0.1:{port}", "token-of-the-ris-0123") as c:
        for p in mr:
            c.store(p)
        assert len(c.query_page("STUDY", {"PatientID": patient})[0]) == 1
        assert len(list(c.retrieve(study_uid=study))) == len(mr)
        c.study_metadata(study)
        c.set_hold(study, True, "litigation 2026-17")
    with VnaClient(f"127.0.0.1:{port}", "not-a-token-of-this-archive") as bad:
        with pytest.raises(ApiError):
            bad.query_page("STUDY", {})
    assert srv.stop() == 0

    recs = _records(srv)
    grpc_recs = [r for r in recs if r["actor"]["kind"] == "token"]
    assert all(r["actor"]["address"].startswith("ipv4:127.0.0.1:") for r in grpc_recs)
    ours = [r for r in grpc_recs if r["actor"]["id"] == "ris-gateway"]
    stored = [r for r in ours if r["event_id"] == "110104" and r["action"] == "C"]
    assert len(stored) == len(mr) and all(r["study_uids"] == [study] for r in stored)
    (query,) = [r for r in ours if r["event_id"] == "110112"]
    assert query["patient_ids"] == [patient] and query["details"]["matches"] == 1
    (sent,) = [r for r in ours if r["event_id"] == "110104" and r["action"] == "R"]
    assert sent["details"]["op"] == "grpc-retrieve" and sent["details"]["completed"] == len(mr)
    assert sent["patient_ids"] == [patient] and sent["outcome"] == 0
    accessed = [r for r in ours if r["event_id"] == "110103"]
    assert {r["action"] for r in accessed} == {"R", "U"}  # metadata read, hold placed
    assert all(r["study_uids"] == [study] and r["patient_ids"] == [patient] for r in accessed)
    (refused,) = [r for r in grpc_recs if r["event_id"] == "110114"]
    assert refused["outcome"] == 4 and refused["actor"]["id"] == "unknown"
    assert "unknown bearer token" in refused["details"]["reason"]
    assert verify(srv.data_dir / "audit" / "audit.log").intact


def test_lifecycle_moves_and_purges_are_audited(make_server: Factory, corpus: list[Path]) -> None:
    srv = make_server("[archive]\nmin_copies = 1\n[lifecycle]\nmin_age_days = 0\n")
    small = [p for p in corpus if p.name.startswith("small-")]
    assert all(r.Status == 0 for r in scu.store(srv.port, small))
    patient, study = _head(small[0])
    r = srv.cli("lifecycle", "run", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    recs = _records(srv)
    (move,) = [r for r in recs if r["details"].get("change") == "migrated to cold tier"]
    assert move["event_id"] == "110103" and move["action"] == "U" and move["outcome"] == 0
    assert move["study_uids"] == [study] and move["patient_ids"] == [patient]
    assert move["actor"] == {"id": "vna-lifecycle", "kind": "process", "address": socket.gethostname()}
    purged = [r for r in recs if r["details"].get("change") == "copy purged"]
    assert len(purged) == 2 * len(small)          # both hot replicas of every instance
    assert {r["details"]["tier"] for r in purged} == {"hot"} and all(r["study_uids"] == [study] for r in purged)
    assert verify(srv.data_dir / "audit" / "audit.log").intact


def test_worker_processes_share_one_chain(make_server: Factory, corpus: list[Path]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    srv = make_server("[dicom]\nworkers = 2\n")
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda part: scu.store(srv.port, part), [corpus[i::4] for i in range(4)]))
    assert all(r.Status == 0 for rs in results for r in rs)
    assert srv.stop() == 0
    recs = _records(srv)
    assert len({r["source"]["pid"] for r in recs}) == 2            # both workers wrote
    listed = [i["sop_uid"] for r in recs if r["event_id"] == "110104" for i in r["details"]["instances"]]
    assert len(listed) == len(set(listed)) == len(corpus)
    assert verify(srv.data_dir / "audit" / "audit.log").intact


def _trail(tmp_path: Path, n: int = 10) -> Path:
    """A trail of ``n`` records written by the real writer."""
    path = tmp_path / "audit" / "audit.log"
    log = AuditLog(AuditConfig(), path)
    for i in range(n):
        event = QUERY if i % 3 == 0 else INSTANCES_TRANSFERRED
        log.record(event, "C", Actor(f"AE{i % 2}", "ae", "10.0.0.9"), patient_ids=[f"P{i % 4}"],
                   study_uids=[f"1.2.3.{i % 5}"], details={"i": i})
    log.close()
    return path


def _verify_cli(tmp_path: Path, path: Path) -> tuple[int, dict[str, Any]]:
    cfg = tmp_path / "v.toml"
    cfg.write_text(f'[audit]\npath = "{path}"\n')
    r = subprocess.run([*VNA, "audit", "verify", "--json", "--config", str(cfg), "--data-dir", str(tmp_path / "d")],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    return r.returncode, json.loads(r.stdout)


def test_verify_detects_an_edited_record(tmp_path: Path) -> None:
    path = _trail(tmp_path)
    code, out = _verify_cli(tmp_path, path)
    assert code == 0 and out["intact"] and out["records"] == 10
    lines = path.read_text().splitlines(keepends=True)[:10]   # the CLI appended its own record
    path.write_text("".join(lines))
    rec = json.loads(lines[4])
    rec["patient_ids"] = ["SOMEONE-ELSE"]                      # edited, hash left as it was
    lines[4] = json.dumps(rec, sort_keys=True, separators=(",", ":")) + "\n"
    path.write_text("".join(lines))
    code, out = _verify_cli(tmp_path, path)
    assert code == 1 and not out["intact"] and out["first_bad_seq"] == 5 and "edited" in out["reason"]

    rec["hash"] = record_hash(rec)                             # edited and re-hashed: the next link breaks
    lines[4] = json.dumps(rec, sort_keys=True, separators=(",", ":")) + "\n"
    path.write_text("".join(lines[:10]))
    code, out = _verify_cli(tmp_path, path)
    assert code == 1 and out["first_bad_seq"] == 6 and "prev_hash" in out["reason"]


def test_verify_detects_a_removed_record(tmp_path: Path) -> None:
    path = _trail(tmp_path)
    lines = path.read_text().splitlines(keepends=True)
    del lines[6]                                               # seq 7
    path.write_text("".join(lines))
    code, out = _verify_cli(tmp_path, path)
    assert code == 1 and out["first_bad_seq"] == 7 and "missing" in out["reason"]
    # renumbering the rest does not help: the hash chain still breaks there
    fixed = []
    for i, line in enumerate(lines, 1):
        rec = json.loads(line)
        rec["seq"] = i
        rec["hash"] = record_hash(rec)
        fixed.append(json.dumps(rec, sort_keys=True, separators=(",", ":")) + "\n")
    path.write_text("".join(fixed))
    res = verify(path)
    assert not res.intact and res.first_bad_seq == 7


def test_writer_continues_the_chain_across_processes_and_repairs_a_torn_tail(tmp_path: Path) -> None:
    path = _trail(tmp_path, 3)
    with open(path, "ab") as fh:
        fh.write(b'{"action":"C","seq":4,"tru')             # a crash mid-write
    log = AuditLog(AuditConfig(), path)
    log.record(QUERY, "E", Actor("X"))
    log.close()
    recs = [json.loads(x) for x in path.read_text().splitlines()]
    assert [r["seq"] for r in recs] == [1, 2, 3, 4]
    assert recs[3]["details"]["torn_tail_bytes_removed"] == 26 and recs[0]["prev_hash"] == GENESIS
    assert verify(path).intact


def test_search_filters(tmp_path: Path) -> None:
    path = _trail(tmp_path)
    cfg = tmp_path / "s.toml"
    cfg.write_text(f'[audit]\npath = "{path}"\n')

    def search(*args: str) -> list[dict[str, Any]]:
        r = subprocess.run([*VNA, "audit", "search", "--json", *args, "--config", str(cfg),
                            "--data-dir", str(tmp_path / "d")], capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)  # type: ignore[no-any-return]

    assert [r["details"]["i"] for r in search("--patient", "P1")] == [1, 5, 9]
    assert [r["details"]["i"] for r in search("--study", "1.2.3.0")] == [0, 5]
    assert [r["details"]["i"] for r in search("--actor", "ae1", "--event", "110104")] == [1, 5, 7]
    assert [r["details"]["i"] for r in search("--event", "query")] == [0, 3, 6, 9]
    assert search("--since", "2999-01-01") == []
    assert len(search("--until", "2999-01-01T00:00:00+01:00", "--patient", "P0")) == 3
    # every search is itself recorded (it shows patient data)
    assert [r["details"]["verb"] for r in search("--event", "110101")] == ["search"] * 6


def test_full_audit_disk_refuses_before_storing(make_server: Factory, corpus: list[Path]) -> None:
    srv = make_server('[audit]\npath = "/dev/full"\n')          # every write: ENOSPC
    rsps = scu.store(srv.port, corpus[:2])
    assert [r.Status for r in rsps] == [0xA700, 0xA700]
    assert _stats(srv)["instances"] == 0
    assert not [p for p in (srv.data_dir / "hot").rglob("*.dcm") if ".tmp" not in p.parts]
    _, status = scu.find(srv.port, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": ""})
    assert status == 0xA700
    assert "AUDIT TRAIL FAILING" in srv.log.read_text()


def test_full_audit_disk_buffer_policy_serves_until_the_buffer_is_full(make_server: Factory,
                                                                        corpus: list[Path]) -> None:
    from tests.integration.test_health import get

    health = free_port()
    srv = make_server(f'[health]\nhost = "127.0.0.1"\nport = {health}\n'
                      '[audit]\npath = "/dev/full"\non_failure = "buffer"\nbuffer_max = 2\n')
    # held in memory: the application start; the association's record (one per study) fills the buffer
    assert [r.Status for r in scu.store(srv.port, corpus[:2])] == [0, 0]
    _wait(lambda: get(health)[0] == 503, 30, "the association's record to fill the buffer")
    assert [r.Status for r in scu.store(srv.port, corpus[2:4])] == [0xA700, 0xA700]
    assert _stats(srv)["instances"] == 2
    log = srv.log.read_text()
    assert "AUDIT TRAIL FAILING" in log and "policy buffer" in log
    srv.stop()
    assert "2 records still unwritten" in srv.log.read_text()   # never silently


class _Collector:
    """A TCP syslog collector (RFC 6587 octet counting) that can be started late."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.messages: list[bytes] = []
        self._sock: socket.socket | None = None
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        self._sock = socket.create_server(("127.0.0.1", self.port))
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()

    def _accept(self) -> None:
        assert self._sock is not None
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn: socket.socket) -> None:
        buf = b""
        with conn:
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
                while b" " in buf:
                    size, rest = buf.split(b" ", 1)
                    if len(rest) < int(size):
                        break
                    self.messages.append(rest[:int(size)])
                    buf = rest[int(size):]

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(m.split(b"\xef\xbb\xbf", 1)[1]) for m in self.messages]

    def stop(self) -> None:
        if self._sock is not None:
            self._sock.close()


@pytest.fixture
def collector() -> Iterator[_Collector]:
    c = _Collector(free_port())
    yield c
    c.stop()


def test_unreachable_collector_refuses_then_recovers(make_server: Factory, corpus: list[Path],
                                                     collector: _Collector) -> None:
    srv = make_server(f'[audit]\nsyslog_host = "127.0.0.1"\nsyslog_port = {collector.port}\nsyslog_protocol = "tcp"\n')
    assert [r.Status for r in scu.store(srv.port, corpus[:1])] == [0xA700]
    assert _stats(srv)["instances"] == 0
    collector.start()
    _wait(lambda: bool(collector.messages), 10, "the held application-start record to be forwarded")
    assert [r.Status for r in scu.store(srv.port, corpus[:2])] == [0, 0]
    _wait(lambda: len(collector.messages) >= 2, 10, "the store record (one study, one association)")
    local = _records(srv)
    forwarded = collector.records()
    assert [r["seq"] for r in forwarded] == [r["seq"] for r in local]      # in order, none lost
    assert [r["hash"] for r in forwarded] == [r["hash"] for r in local]
    assert collector.messages[0].startswith(b"<110>1 ")                   # facility 13 (log audit), informational
    assert b"vna-audit@32473" in collector.messages[0]


def test_unreachable_collector_buffer_policy_forwards_later(make_server: Factory, corpus: list[Path],
                                                            collector: _Collector) -> None:
    srv = make_server(f'[audit]\non_failure = "buffer"\nsyslog_host = "127.0.0.1"\nsyslog_port = {collector.port}\n'
                      'syslog_protocol = "tcp"\n')
    assert all(r.Status == 0 for r in scu.store(srv.port, corpus[:3]))
    assert "AUDIT TRAIL FAILING" in srv.log.read_text()
    collector.start()
    # the application start and the association's record (one study)
    _wait(lambda: len(collector.messages) >= 2, 10, "the held records to be forwarded")
    assert [r["seq"] for r in collector.records()] == [r["seq"] for r in _records(srv)] == [1, 2]


def test_udp_forwarding(tmp_path: Path) -> None:
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.settimeout(5)
    port = rx.getsockname()[1]
    log = AuditLog(AuditConfig(syslog_host="127.0.0.1", syslog_port=port), tmp_path / "a.log")
    log.record(QUERY, "E", Actor("AE1", "ae", "10.1.1.1"), patient_ids=["P9"])
    log.close()
    msg = rx.recv(65536)
    rx.close()
    head, body = msg.split(b"\xef\xbb\xbf", 1)
    assert head.startswith(b"<110>1 ") and b' vna ' in head
    assert json.loads(body)["patient_ids"] == ["P9"]


# -- DIMSE C-STORE: one record per association and study, recovered after kill -9 ----------------------

RECEIVERS = ["python", "native"]


def _transfers(srv: VnaServer) -> list[dict[str, Any]]:
    """The C-STORE transfer records (event 110104, action C) of the trail, in order."""
    path = srv.data_dir / "audit" / "audit.log"
    if not path.exists():
        return []
    return [r for r in _records(srv) if r["event_id"] == "110104" and r["action"] == "C"]


def _listed(recs: list[dict[str, Any]]) -> list[str]:
    return [i["sop_uid"] for r in recs for i in r["details"]["instances"]]


def _uid(p: Path) -> str:
    return str(dcmread(p, stop_before_pixels=True).SOPInstanceUID)


class _Association:
    """One open pynetdicom association to a server, storing files one at a time."""

    def __init__(self, port: int, paths: list[Path]) -> None:
        from pynetdicom import AE

        ae = AE(ae_title="TESTSCU")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        heads = [dcmread(p, stop_before_pixels=True) for p in paths]
        for cls, ts in {(str(h.SOPClassUID), str(h.file_meta.TransferSyntaxUID)) for h in heads}:
            ae.add_requested_context(cls, ts)
        self.assoc = ae.associate("127.0.0.1", port, ae_title="VNA")
        assert self.assoc.is_established

    def store(self, ds: Any) -> int:
        rsp = self.assoc.send_c_store(dcmread(ds) if isinstance(ds, Path) else ds)
        return int(rsp.Status)

    def release(self) -> None:
        self.assoc.release()


@pytest.mark.parametrize("receiver", RECEIVERS)
def test_one_association_writes_one_record_per_study(make_server: Factory, corpus: list[Path],
                                                     receiver: str) -> None:
    """Interleaved studies on one association: one record per study when it ends (not on a timer, not at
    shutdown), listing exactly its instances; a failed store is in its own record with its outcome."""
    srv = make_server(f'[dicom]\nreceiver = "{receiver}"\n[audit]\ntransfer_flush_interval = 600\n')
    ct = [p for p in corpus if p.name.startswith("ct-")]
    a, b = ct[:3], ct[3:6]
    assert _head(a[0])[1] != _head(b[0])[1]
    interleaved = [a[0], b[0], a[1], b[1], a[2], b[2]]
    conn = _Association(srv.port, interleaved)
    assert [conn.store(p) for p in interleaved] == [0] * 6
    changed = dcmread(a[0])
    changed.PatientName = "CHANGED^NAME"           # the same SOP Instance UID in other content: refused
    assert conn.store(changed) != 0
    conn.release()
    _wait(lambda: len(_transfers(srv)) == 3, 30, "the association's records")
    recs = _transfers(srv)
    by = {(r["study_uids"][0], r["outcome"]): r for r in recs}
    study_a, study_b = _head(a[0])[1], _head(b[0])[1]
    assert set(by) == {(study_a, 0), (study_b, 0), (study_a, 4)}
    assert _listed([by[study_a, 0]]) == [_uid(p) for p in a] and _listed([by[study_b, 0]]) == [_uid(p) for p in b]
    failed = by[study_a, 4]["details"]
    assert failed["count"] == 1 and failed["instances"][0]["sop_uid"] == _uid(a[0])
    assert "differs" in failed["instances"][0]["error"]
    assert len({r["details"]["association"] for r in recs}) == 1
    assert all(r["patient_ids"] == [_head(a[0])[0]] for r in (by[study_a, 0], by[study_a, 4]))
    assert not any(r["details"].get("recovered") for r in recs)
    assert srv.stop() == 0
    assert len(_transfers(srv)) == 3
    r = srv.cli("audit", "verify", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["intact"] is True, r.stdout + r.stderr


@pytest.mark.parametrize("receiver", RECEIVERS)
def test_a_long_association_writes_a_study_record_every_interval(make_server: Factory, corpus: list[Path],
                                                                 receiver: str) -> None:
    srv = make_server(f'[dicom]\nreceiver = "{receiver}"\n[audit]\ntransfer_flush_interval = 0.2\n')
    ct = [p for p in corpus if p.name.startswith("ct-")][:3]
    conn = _Association(srv.port, ct)
    assert conn.store(ct[0]) == 0
    _wait(lambda: len(_transfers(srv)) == 1, 30, "the record of the first instance while the association runs")
    assert [conn.store(p) for p in ct[1:]] == [0, 0]
    conn.release()
    _wait(lambda: len(_listed(_transfers(srv))) == 3, 30, "the records of the other instances")
    recs = _transfers(srv)
    assert sorted(_listed(recs)) == sorted(_uid(p) for p in ct)       # each instance listed once
    assert {r["study_uids"][0] for r in recs} == {_head(ct[0])[1]} and len(recs) >= 2
    assert len({r["details"]["association"] for r in recs}) == 1


@pytest.mark.parametrize("receiver", RECEIVERS)
def test_kill_9_mid_association_every_acknowledged_instance_is_recovered(make_server: Factory, corpus: list[Path],
                                                                         receiver: str) -> None:
    """A released association's record is written; then kill -9 while a second association of two studies is
    open: the restart writes its records marked recovered; every acknowledged instance is listed once."""
    srv = make_server(f'[dicom]\nreceiver = "{receiver}"\n[audit]\ntransfer_flush_interval = 600\n')
    assert srv.proc is not None
    small = [p for p in corpus if p.name.startswith("small-")]
    assert all(r.Status == 0 for r in scu.store(srv.port, small))          # released: written at its end
    _wait(lambda: len(_transfers(srv)) == 1, 30, "the first association's record")
    ct = [p for p in corpus if p.name.startswith("ct-")]
    conn = _Association(srv.port, ct)
    assert [conn.store(p) for p in ct] == [0] * len(ct)                     # acknowledged, association open
    journals = list((srv.data_dir / "audit" / "journal").glob("*.jnl"))
    assert journals and any(j.stat().st_size for j in journals)
    srv.proc.kill()
    srv.proc.wait(10)
    assert len(_transfers(srv)) == 1                                        # the open association: no record yet
    srv.log.rename(srv.log.with_suffix(".killed.log"))                      # start() waits for a new "vna ready"
    srv.start()
    recs = _transfers(srv)
    recovered = [r for r in recs if r["details"].get("recovered")]
    assert len(recovered) == 2 and {r["study_uids"][0] for r in recovered} == {_head(p)[1] for p in ct}
    assert all(r["actor"]["id"] == "TESTSCU" and r["outcome"] == 0 for r in recovered)
    assert sorted(_listed(recovered)) == sorted(_uid(p) for p in ct)
    listed = _listed(recs)
    assert sorted(listed) == sorted(_uid(p) for p in small + ct)          # nothing twice, nothing missing
    assert not list((srv.data_dir / "audit" / "journal").glob("*.jnl")) or all(
        j.stat().st_size == 0 for j in (srv.data_dir / "audit" / "journal").glob("*.jnl"))
    assert srv.stop() == 0
    assert sorted(_listed(_transfers(srv))) == sorted(listed)             # a clean stop adds nothing
    r = srv.cli("audit", "verify", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["intact"] is True, r.stdout + r.stderr


@pytest.mark.parametrize("receiver", RECEIVERS)
def test_kill_9_while_an_association_stores(make_server: Factory, tmp_path: Path, receiver: str) -> None:
    """kill -9 in the middle of a running association: after the restart every acknowledged instance is
    in one record (recovered); no instance is listed twice."""
    from benchmarks.corpus import write_corpus

    files = write_corpus(tmp_path / "many", "small", studies=1, per_study=400, seed=3)
    srv = make_server(f'[dicom]\nreceiver = "{receiver}"\n[audit]\ntransfer_flush_interval = 600\n')
    assert srv.proc is not None
    acked: list[str] = []

    def send() -> None:
        try:
            conn = _Association(srv.port, files[:1])
            for p in files:
                if conn.store(p) != 0:
                    return
                acked.append(_uid(p))
        except Exception:   # the server died: the association is gone
            return

    sender = threading.Thread(target=send)
    sender.start()
    _wait(lambda: len(acked) >= 10, 60, "ten acknowledged instances")
    srv.proc.kill()
    srv.proc.wait(10)
    sender.join(60)
    assert 10 <= len(acked) < len(files)
    srv.log.rename(srv.log.with_suffix(".killed.log"))
    srv.start()
    recs = _transfers(srv)
    listed = _listed(recs)
    assert len(listed) == len(set(listed))                                  # nothing twice
    assert set(acked) <= set(listed)                                        # every acknowledged one
    assert recs and all(r["details"]["recovered"] for r in recs)
    assert srv.stop() == 0
    assert verify(srv.data_dir / "audit" / "audit.log").intact


def test_a_restarted_worker_recovers_the_dead_journal_only(make_server: Factory, corpus: list[Path]) -> None:
    """workers = 2: kill -9 the worker holding an open association; the restarted worker writes its records
    (recovered) and leaves the live worker's journal alone."""
    import os
    import signal

    srv = make_server("[dicom]\nworkers = 2\n[audit]\ntransfer_flush_interval = 600\n")
    ct = [p for p in corpus if p.name.startswith("ct-")]
    conn = _Association(srv.port, ct)
    assert [conn.store(p) for p in ct] == [0] * len(ct)
    jdir = srv.data_dir / "audit" / "journal"
    (busy,) = [j for j in jdir.glob("*.jnl") if j.stat().st_size]
    idle = [j for j in jdir.glob("*.jnl") if j != busy]
    assert len(idle) == 1
    os.kill(int(busy.name.split("-")[0]), signal.SIGKILL)
    _wait(lambda: len(_transfers(srv)) == 2, 60, "the restarted worker to recover the records")
    recs = _transfers(srv)
    assert all(r["details"]["recovered"] for r in recs)
    assert sorted(_listed(recs)) == sorted(_uid(p) for p in ct)
    assert not busy.exists() and idle[0].exists()                          # the live worker's journal is kept
    assert srv.stop() == 0
    assert sorted(_listed(_transfers(srv))) == sorted(_uid(p) for p in ct)
    assert verify(srv.data_dir / "audit" / "audit.log").intact
