"""dicom.receiver = "native": the Rust listener stores (blobs, index rows, audit records, statuses) what the
Python receiver stores, and survives bad peers.

Real ``vna serve`` processes (one per receiver), DCMTK ``storescu``/``echoscu`` and
pynetdicom as peers, and hand-built PDUs on raw sockets for the faults.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import sqlite3
import struct
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Callable

import pytest
from pydicom import dcmread

from tests.conftest import DCMTK_ENV, ROOT, VNA, VnaServer, dataset_bytes, free_port, write_config
from tests.integration.receivers import NATIVE, native_built  # noqa: F401 -- autouse
from tests.integration.scu import EXPLICIT, IMPLICIT, STUDY_FIND, associate_rq, pdata

pytestmark = pytest.mark.dcmtk

VERIFICATION = "1.2.840.10008.1.1"


def storescu(port: int, paths: list[Path], *opts: str, aet: str = "STORESCU") -> subprocess.CompletedProcess[str]:
    return subprocess.run(["storescu", *opts, "-aet", aet, "-aec", "VNA", "127.0.0.1", str(port), *map(str, paths)],
                          capture_output=True, text=True, timeout=120, env=DCMTK_ENV)


def echoscu(port: int, aet: str = "ECHOSCU") -> subprocess.CompletedProcess[str]:
    return subprocess.run(["echoscu", "-aet", aet, "-aec", "VNA", "127.0.0.1", str(port)],
                          capture_output=True, text=True, timeout=60, env=DCMTK_ENV)


def blobs(srv: VnaServer) -> dict[str, list[bytes]]:
    out: dict[str, list[bytes]] = {}
    for p in sorted((srv.data_dir / "hot").rglob("*.dcm")):
        out.setdefault(p.name.split(".v")[0], []).append(p.read_bytes())
    return out


def index_rows(srv: VnaServer) -> dict[str, dict[str, object]]:
    """The instance rows (current and versions) of the SQLite index by SOP Instance UID, times left out."""
    con = sqlite3.connect(srv.data_dir / "index.sqlite")
    con.row_factory = sqlite3.Row
    try:
        current = con.execute("SELECT * FROM instances").fetchall()
        versions = con.execute("SELECT * FROM instance_versions").fetchall()
    finally:
        con.close()
    out: dict[str, dict[str, object]] = {}
    for r in current:
        out[r["SOPInstanceUID"]] = {k: r[k] for k in r.keys() if k != "received_at"}
    for r in versions:
        out[r["sop_uid"]][f"v{r['version']}"] = {k: r[k] for k in r.keys() if k != "received_at"}
    return out


def audit_records(srv: VnaServer) -> list[dict[str, object]]:
    """The audit trail's records without times, hashes, sequence numbers, the process's id and the
    association's id (a random one), sorted (associations end in either order)."""
    import json

    out = []
    for line in (srv.data_dir / "audit" / "audit.log").read_text().splitlines():
        rec = json.loads(line)
        if rec["event"] == "Application Activity":
            continue
        rec["details"].pop("association", None)
        out.append({k: v for k, v in rec.items() if k not in ("ts", "hash", "prev_hash", "seq", "source")})
    return sorted(out, key=lambda r: json.dumps(r, sort_keys=True))


def spool(srv: VnaServer) -> list[Path]:
    return sorted((srv.data_dir / "spool" / "incoming").iterdir())


def wait_for(pred: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.02)
    raise AssertionError(what)


# -- hand-built PDUs (associate_rq and pdata are in scu.py) ----------------------------------
def _elem(elem: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0, elem, len(value)) + value


def _ui(uid: str) -> bytes:
    raw = uid.encode()
    return raw + b"\0" if len(raw) % 2 else raw


def store_command(sop_class: str, sop_uid: str, msg_id: int = 7) -> bytes:
    rest = (_elem(0x0002, _ui(sop_class)) + _elem(0x0100, struct.pack("<H", 1)) + _elem(0x0110, struct.pack("<H", msg_id))
            + _elem(0x0700, struct.pack("<H", 0)) + _elem(0x0800, struct.pack("<H", 0)) + _elem(0x1000, _ui(sop_uid)))
    return _elem(0x0000, struct.pack("<I", len(rest))) + rest


def recv_pdu(sock: socket.socket) -> tuple[int, bytes]:
    """(type, body) of the next PDU; (0, b"") when the connection closed."""
    head = b""
    while len(head) < 6:
        chunk = sock.recv(6 - len(head))
        if not chunk:
            return 0, b""
        head += chunk
    kind, length = head[0], struct.unpack(">I", head[2:])[0]
    body = b""
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        if not chunk:
            return 0, b""
        body += chunk
    return kind, body


def accepted_contexts(ac_body: bytes) -> dict[int, tuple[int, str]]:
    """Context ID -> (result, transfer syntax) of an A-ASSOCIATE-AC body."""
    out, pos = {}, 68
    while pos < len(ac_body):
        kind, length = ac_body[pos], struct.unpack(">H", ac_body[pos + 2:pos + 4])[0]
        value = ac_body[pos + 4:pos + 4 + length]
        if kind == 0x21:
            ts_len = struct.unpack(">H", value[6:8])[0]
            out[value[0]] = (value[2], value[8:8 + ts_len].decode().rstrip("\0"))
        pos += 4 + length
    return out


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


# -- tests --------------------------------------------------------------------------------
def test_native_stores_what_python_stores(make_server: Callable[..., VnaServer], corpus: list[Path],
                                          tmp_path: Path) -> None:
    once = "[audit]\ntransfer_flush_interval = 600\n"   # one record per association and study, at its end
    native = make_server(NATIVE + once)
    python = make_server('[dicom]\nreceiver = "python"\n' + once)
    for srv in (native, python):
        r = storescu(srv.port, corpus[:5])                       # as stored (explicit VR little endian)
        assert r.returncode == 0, r.stderr
        r = storescu(srv.port, corpus[5:8], "-xi", "-pdu", "4096")   # implicit VR, data sets in many fragments
        assert r.returncode == 0, r.stderr
        r = storescu(srv.port, corpus[8:], "-xb")                # explicit VR big endian
        assert r.returncode == 0, r.stderr
        assert echoscu(srv.port).returncode == 0
    uids = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in corpus}
    native_blobs, python_blobs = blobs(native), blobs(python)
    assert set(native_blobs) == set(python_blobs) == uids
    for uid in uids:
        assert native_blobs[uid] == python_blobs[uid], uid
    assert spool(native) == []

    # a refused store: the same SOP Instance UID with other bytes -> the same failure status on both
    from pynetdicom import AE

    changed = dcmread(corpus[0])
    changed.PatientName = "CHANGED^NAME"
    statuses = []
    for srv in (native, python):
        ae = AE(ae_title="PYSCU")
        ae.add_requested_context(changed.SOPClassUID, changed.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", srv.port, ae_title="VNA")
        assert assoc.is_established
        rsp = assoc.send_c_store(changed)
        assoc.release()
        statuses.append((int(rsp.Status), str(rsp.get("ErrorComment", ""))))
    assert statuses[0] == statuses[1] and statuses[0][0] != 0, statuses

    assert native.stop() == 0 and python.stop() == 0
    native_audit = audit_records(native)
    assert native_audit == audit_records(python)
    transfers = [r for r in native_audit if r["event"] == "DICOM Instances Transferred"]
    assert sum(r["details"]["count"] for r in transfers) == len(corpus) + 1   # type: ignore[index]
    assert len(transfers) == 6   # per association and study: 2 + 2 + 1, and the refused re-send's own
    native_rows, python_rows = index_rows(native), index_rows(python)
    assert native_rows.keys() == python_rows.keys() == uids
    for uid in uids:
        assert native_rows[uid] == python_rows[uid], uid
        blob = native_blobs[uid][0]
        assert native_rows[uid]["content_sha256"] == hashlib.sha256(blob).hexdigest(), uid
        assert native_rows[uid]["content_size"] == len(blob), uid


def _send_files(srv: VnaServer, pairs: list[tuple[str, str]],
                metas: list[tuple[Path, str, str]]) -> list[tuple[str, int | str | None]]:
    """Send each file unchanged (pynetdicom, one context per SOP class and transfer syntax); the statuses."""
    from pynetdicom import AE

    statuses: list[tuple[str, int | str | None]] = []
    for i in range(0, len(pairs), 100):  # at most 128 contexts per association
        chunk = pairs[i:i + 100]
        ae = AE(ae_title="PYSCU")
        for cls, ts in chunk:
            ae.add_requested_context(cls, ts)
        assoc = ae.associate("127.0.0.1", srv.port, ae_title="VNA")
        assert assoc.is_established
        for f, cls, ts in metas:
            if (cls, ts) in chunk:
                try:
                    rsp = assoc.send_c_store(f)
                except (ValueError, AttributeError) as exc:  # pynetdicom cannot send it: the same on both
                    statuses.append((f.name, type(exc).__name__))
                    continue
                statuses.append((f.name, int(rsp.Status) if "Status" in rsp else None))
        assoc.release()
    return sorted(statuses)


def test_native_stores_pydicom_test_files_as_python_does(make_server: Callable[..., VnaServer]) -> None:
    """pydicom's own test files in many transfer syntaxes (RLE, JPEG, JPEG-LS, JPEG 2000, big endian...),
    sent unchanged by pynetdicom: the same status per file and the same stored bytes on both receivers."""
    import pydicom
    from pynetdicom import AllStoragePresentationContexts, _config

    storage = {str(cx.abstract_syntax) for cx in AllStoragePresentationContexts}
    files = sorted((Path(pydicom.__file__).parent / "data" / "test_files").glob("*.dcm"))
    metas = []
    for f in files:
        try:
            ds = dcmread(f, stop_before_pixels=True)
            cls, ts = str(ds.file_meta.MediaStorageSOPClassUID), str(ds.file_meta.TransferSyntaxUID)
        except Exception:  # no File Meta, truncated...: not sendable as a file
            continue
        if cls in storage and ts:
            metas.append((f, cls, ts))
    pairs = sorted({(cls, ts) for _, cls, ts in metas})
    assert len({ts for _, ts in pairs}) >= 8, pairs
    native = make_server(NATIVE)
    python = make_server("")
    results = []
    chunked, _config.STORE_SEND_CHUNKED_DATASET = _config.STORE_SEND_CHUNKED_DATASET, True  # send the files' bytes
    try:
        for srv in (native, python):
            results.append(_send_files(srv, pairs, metas))
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = chunked
    assert results[0] == results[1]
    assert sum(1 for _, status in results[0] if status == 0) >= 20, results[0]
    native_blobs, python_blobs = blobs(native), blobs(python)
    assert native_blobs == python_blobs
    assert spool(native) == []


def test_native_association_policy(make_server: Callable[..., VnaServer]) -> None:
    native = make_server(NATIVE + 'allowed_calling_aes = ["GOOD"]\n')
    python = make_server('[dicom]\nallowed_calling_aes = ["GOOD"]\n')
    from pynetdicom import AE

    for srv in (native, python):
        assert echoscu(srv.port, "GOOD").returncode == 0
        assert echoscu(srv.port, "BAD").returncode != 0
        ae = AE(ae_title="BAD")
        ae.add_requested_context(VERIFICATION)
        assoc = ae.associate("127.0.0.1", srv.port, ae_title="VNA")
        assert assoc.is_rejected
        rj = assoc.acceptor.primitive
        assert (rj.result, rj.result_source, rj.diagnostic) == (1, 1, 3)

    # Query/Retrieve is accepted by both, a service neither serves (Modality Worklist) rejected by both
    for srv in (native, python):
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
            sock.sendall(associate_rq([(1, STUDY_FIND, [IMPLICIT]), (3, VERIFICATION, [IMPLICIT]),
                                       (5, "1.2.840.10008.5.1.4.31", [IMPLICIT])], calling="GOOD"))
            kind, body = recv_pdu(sock)
            assert kind == 2
            assert accepted_contexts(body) == {1: (0, IMPLICIT), 3: (0, IMPLICIT), 5: (3, IMPLICIT)}


def test_native_faults(make_server: Callable[..., VnaServer], corpus: list[Path]) -> None:
    srv = make_server(NATIVE + "network_timeout = 5\nacse_timeout = 5\n")
    assert srv.proc is not None
    ds = dcmread(corpus[0])
    sop_class, sop_uid = str(ds.SOPClassUID), str(ds.SOPInstanceUID)
    data = dataset_bytes(corpus[0])

    def associate(sock: socket.socket) -> None:
        sock.sendall(associate_rq([(1, sop_class, [EXPLICIT])]))
        kind, ac = recv_pdu(sock)
        assert kind == 2 and accepted_contexts(ac)[1] == (0, EXPLICIT)

    # 1. abort mid-dataset: the spool file goes, nothing is stored
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
        associate(sock)
        sock.sendall(pdata((1, 0x03, store_command(sop_class, sop_uid)), (1, 0x00, data[:1000])))
        wait_for(lambda: len(spool(srv)) == 1, "spool file while receiving")
        sock.sendall(struct.pack(">BBIBBBB", 7, 0, 4, 0, 0, 0, 0))
        wait_for(lambda: spool(srv) == [], "spool removed after A-ABORT")
    # 2. disconnect mid-dataset: same
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
        associate(sock)
        sock.sendall(pdata((1, 0x03, store_command(sop_class, sop_uid)), (1, 0x00, data[:1000])))
        wait_for(lambda: len(spool(srv)) == 1, "spool file while receiving")
    wait_for(lambda: spool(srv) == [], "spool removed after the disconnect")
    assert blobs(srv) == {}

    rss_before = rss_kb(srv.proc.pid)
    # 3. absurd PDU lengths are refused before anything is allocated: A-ASSOCIATE-RQ, then P-DATA-TF
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
        sock.sendall(struct.pack(">BBI", 1, 0, 0xFFFFFFF0))  # header only: the server reads all that was sent
        kind, _ = recv_pdu(sock)
        assert kind in (0, 7)
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
        associate(sock)
        sock.sendall(struct.pack(">BBI", 4, 0, 0x7FFFFFFF))
        kind, abort = recv_pdu(sock)
        assert kind == 7, kind
    # 4. garbage, truncated PDUs and a PDV longer than its PDU: each connection is dropped
    for junk in (os.urandom(4096), b"\x01\x00\x00\x00\x00\x10abc", b"GET / HTTP/1.1\r\n\r\n"):
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
            try:
                sock.sendall(junk)
                sock.shutdown(socket.SHUT_WR)
                while sock.recv(65536):
                    pass
            except OSError:
                pass  # closed by the server with our junk unread: a reset
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
        associate(sock)
        sock.sendall(struct.pack(">BBI", 4, 0, 12) + struct.pack(">IBB", 5000, 1, 3) + b"\0" * 6)
        kind, _ = recv_pdu(sock)
        assert kind == 7
    assert rss_kb(srv.proc.pid) - rss_before < 64 * 1024
    # ... and the server still serves C-ECHO and C-STORE
    assert echoscu(srv.port).returncode == 0
    r = storescu(srv.port, corpus[:1])
    assert r.returncode == 0, r.stderr
    assert set(blobs(srv)) == {sop_uid}
    assert spool(srv) == []


def test_native_without_extension_exits_2(tmp_path: Path) -> None:
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "vna_native.py").write_text("raise ImportError('not built in this test')\n")
    cfg = write_config(tmp_path / "vna.toml", NATIVE)
    r = subprocess.run([*VNA, "serve", "--config", str(cfg), "--data-dir", str(tmp_path / "data"),
                        "--dicom-port", str(free_port()), "--host", "127.0.0.1"],
                       capture_output=True, text=True, cwd=ROOT, timeout=60,
                       env={**os.environ, "PYTHONPATH": f"{fake}{os.pathsep}{ROOT}"})
    assert r.returncode == 2, r.stderr[-2000:]
    assert "make install" in r.stderr



def test_native_workers_share_the_port(make_server: Callable[..., VnaServer], corpus: list[Path]) -> None:
    srv = make_server(NATIVE + "workers = 2\n")
    procs = []
    for paths in (corpus[:6], corpus[6:]):
        procs.append(subprocess.Popen(["storescu", "-aec", "VNA", "127.0.0.1", str(srv.port), *map(str, paths)],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=DCMTK_ENV))
    for proc in procs:
        assert proc.wait(120) == 0
    assert set(blobs(srv)) == {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in corpus}
    assert srv.stop() == 0


def test_native_timers_and_association_limit(make_server: Callable[..., VnaServer]) -> None:
    srv = make_server(NATIVE + "max_associations = 1\nacse_timeout = 2\nnetwork_timeout = 3\n")
    with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as held:
        held.sendall(associate_rq([(1, VERIFICATION, [IMPLICIT])]))
        assert recv_pdu(held)[0] == 2
        # over the limit: rejected-transient, service-provider (presentation), local-limit-exceeded
        with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as extra:
            extra.sendall(associate_rq([(1, VERIFICATION, [IMPLICIT])]))
            assert recv_pdu(extra) == (3, bytes([0, 2, 3, 2]))
        # silent for longer than network_timeout: the server aborts the association
        assert recv_pdu(held)[0] == 7
    # an A-ASSOCIATE-RQ that never completes: the connection is closed (ARTIM, acse_timeout)
    with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as slow:
        slow.sendall(associate_rq([(1, VERIFICATION, [IMPLICIT])])[:20])
        assert recv_pdu(slow) == (0, b"")
    wait_for(lambda: echoscu(srv.port).returncode == 0, "C-ECHO once the slots are free")


def test_native_stores_are_counted_like_python_ones(make_server: Callable[..., VnaServer], corpus: list[Path]) -> None:
    import re
    import urllib.request

    port = free_port()
    srv = make_server(NATIVE + f"[telemetry]\nenabled = true\nprometheus_port = {port}\n")
    small = [p for p in corpus if p.name.startswith("small-")]
    r = storescu(srv.port, small)
    assert r.returncode == 0, r.stderr
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as rsp:
        body = rsp.read().decode()
    for name, labels in (("vna_dimse_operations_total", '{op="c-store",status="0x0000"}'),
                         ("vna_ingest_instances_total", '{outcome="stored"}')):
        m = re.search(rf"^{re.escape(name + labels)} (\S+)$", body, re.M)
        assert m is not None and float(m.group(1)) == len(small), (name, labels)

    def gauge(state: str) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as rsp:
            m = re.search(rf'^vna_dicom_connections{{state="{state}"}} (\S+)$', rsp.read().decode(), re.M)
        return float(m.group(1)) if m else -1.0

    half_open = [socket.create_connection(("127.0.0.1", srv.port), timeout=30) for _ in range(2)]
    associated = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
    try:
        associated.sendall(associate_rq([(1, VERIFICATION, [IMPLICIT])]))
        assert recv_pdu(associated)[0] == 2
        wait_for(lambda: (gauge("half_open"), gauge("associated")) == (2, 1), "2 half-open and 1 associated")
    finally:
        for sock in half_open + [associated]:
            sock.close()
    wait_for(lambda: (gauge("half_open"), gauge("associated")) == (0, 0), "no connection left")


def connections(metrics_port: int) -> tuple[float, float]:
    """The server's (half-open, associated) DICOM connections, from its vna_dicom_connections gauge."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as rsp:
        body = rsp.read().decode()

    def gauge(state: str) -> float:
        m = re.search(rf'^vna_dicom_connections{{state="{state}"}} (\S+)$', body, re.M)
        return float(m.group(1)) if m else -1.0

    return gauge("half_open"), gauge("associated")


def test_native_connection_limits(make_server: Callable[..., VnaServer]) -> None:
    metrics = free_port()
    srv = make_server(NATIVE + "max_connections_per_address = 2\nmax_half_open_connections = 64\n"
                      f"[telemetry]\nenabled = true\nprometheus_port = {metrics}\n")
    # the start-up probe (wait_port) connected from 127.0.0.1 too: its connection counts against the
    # address until its association thread has seen it closed
    wait_for(lambda: connections(metrics) == (0, 0), "no connection left from the start-up probe")
    held = [socket.create_connection(("127.0.0.1", srv.port), timeout=30) for _ in range(2)]
    try:
        wait_for(lambda: connections(metrics) == (2, 0), "both held connections admitted")
        with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as extra:
            extra.sendall(associate_rq([(1, VERIFICATION, [IMPLICIT])]))
            try:
                assert recv_pdu(extra) == (0, b"")  # closed at once, nothing answered
            except ConnectionResetError:
                pass
    finally:
        for sock in held:
            sock.close()
    wait_for(lambda: echoscu(srv.port).returncode == 0, "C-ECHO once the connections are closed")
    wait_for(lambda: "connection refused: 2 connections (dicom.max_connections_per_address)" in srv.log.read_text(),
             "one log line about the refusal")
