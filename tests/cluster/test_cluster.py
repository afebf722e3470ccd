"""The HA cluster under faults: real front-ends, HAProxy, Cassandra, SeaweedFS, DCMTK.

- kill -9 of a front-end under continuous ingest (DCMTK ``storescu`` loops and
  gRPC uploads through HAProxy): every acknowledged instance retrieves
  bit-exact through the survivor, nothing is half-registered, and the
  restarted front-end rejoins (HAProxy sends it traffic again);
- Cassandra unreachable: HAProxy takes the front-ends out (health 503), stores
  fail, nothing is registered; back: the front-ends rejoin by themselves;
- the object store (hot replicas on S3) unreachable: stores answer failure
  statuses, nothing is registered; back: stores succeed again.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import grpc
import pytest
from pydicom import dcmread

from tests.cluster.conftest import FaultProxy
from tests.conftest import DCMTK_ENV, dataset_bytes
from tests.integration import scu
from vna.api.client import ApiError, VnaClient
from vna.config import CassandraConfig
from vna.domain import PlacementState, Tier
from vna.index.cassandra import CassandraIndex

pytestmark = [pytest.mark.cassandra, pytest.mark.dcmtk, pytest.mark.cluster]

RESPONSE = re.compile(r"Received Store Response \(([^)]*)\)")


def sop_uid(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)


def storescu(port: int, files: list[Path]) -> list[bool]:
    """Send ``files`` on one association with DCMTK storescu; per file, whether Success was received."""
    try:
        r = subprocess.run(["storescu", "-v", "-aec", "VNA", "-to", "20", "-ta", "20", "-td", "20",
                            "127.0.0.1", str(port), *map(str, files)],
                           capture_output=True, text=True, env=DCMTK_ENV, timeout=90)
        out = r.stdout + r.stderr
    except subprocess.TimeoutExpired:
        return [False] * len(files)
    statuses = RESPONSE.findall(out)
    return [i < len(statuses) and statuses[i] == "Success" for i in range(len(files))]


class Sender(threading.Thread):
    """Streams files at the cluster until stopped; records which ones were acknowledged."""

    def __init__(self, name: str, files: list[Path], send: Callable[[list[Path]], list[bool]],
                 batch: int) -> None:
        super().__init__(name=name, daemon=True)
        self.files, self.send, self.batch = files, send, batch
        self.acked: list[Path] = []
        self.failed: list[Path] = []
        self.stop = threading.Event()

    def run(self) -> None:
        pos = 0
        while not self.stop.is_set() and pos < len(self.files):
            chunk = self.files[pos:pos + self.batch]
            pos += len(chunk)
            for path, ok in zip(chunk, self.send(chunk)):
                (self.acked if ok else self.failed).append(path)

    @property
    def sent(self) -> list[Path]:
        return self.acked + self.failed


class GrpcSender:
    """gRPC uploads through HAProxy; a failed call drops the channel (the next one reconnects)."""

    def __init__(self, port: int, token: str) -> None:
        self.target, self.token = f"127.0.0.1:{port}", token
        self.client: VnaClient | None = None

    def __call__(self, files: list[Path]) -> list[bool]:
        out = []
        for path in files:
            try:
                if self.client is None:   # own subchannel: a new client is a new TCP connection
                    self.client = VnaClient(self.target, self.token, timeout=30,
                                            options=[("grpc.use_local_subchannel_pool", 1)])
                self.client.store(path)
                out.append(True)
            except Exception:
                out.append(False)
                if self.client is not None:
                    self.client.close()
                self.client = None
        return out


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def open_index(cluster: Any, cassandra_endpoint: tuple[str, int]) -> CassandraIndex:
    """The cluster's index, reached directly (not through the fault proxy)."""
    host, port = cassandra_endpoint
    return CassandraIndex(CassandraConfig(contact_points=(host,), port=port, keyspace=cluster.keyspace,
                                          replication='{"dc1": 1}', request_timeout=30.0))


def assert_whole_or_absent(index: CassandraIndex, files: list[Path], must_exist: bool) -> int:
    """Each instance is absent or complete (both hot copies OK, no PENDING); returns how many exist."""
    present = 0
    for path in files:
        uid = sop_uid(path)
        inst = index.get_instance(uid)
        if inst is None:
            assert not must_exist, f"acknowledged instance {uid} is not in the index"
            assert index.placements(uid) == []
            continue
        present += 1
        placements = index.placements(uid)
        hot = [p for p in placements if p.tier is Tier.HOT]
        assert sorted(p.store_id for p in hot) == ["hot-s3-1", "hot-s3-2"], placements
        assert all(p.state is PlacementState.OK for p in placements), placements
    return present


def retrieve_all(port: int, token: str, dimse: list[Path], via_grpc: list[Path]) -> None:
    """Every file comes back through HAProxy, digest-checked by the client; bytes compared here."""
    with VnaClient(f"127.0.0.1:{port}", token, timeout=60) as c:
        for path in dimse:
            (inst,) = c.retrieve(sop_uid=sop_uid(path))
            assert inst.data.endswith(dataset_bytes(path)), path   # the archive wrote the file meta
        for path in via_grpc:
            (inst,) = c.retrieve(sop_uid=sop_uid(path))
            assert inst.data == path.read_bytes(), path


@pytest.mark.timeout(600)  # the first cluster test also waits for the session's Cassandra node and the cluster
def test_kill_a_frontend_under_ingest(cluster: Any, cluster_launcher: ModuleType, cluster_corpus: Path,
                                      cassandra_endpoint: tuple[str, int]) -> None:
    L = cluster_launcher
    dimse = Sender("dimse", sorted((cluster_corpus / "101").glob("*.dcm")),
                   lambda files: storescu(cluster.dicom_port, files), batch=4)
    grpc_sender = Sender("grpc", sorted((cluster_corpus / "102").glob("*.dcm")),
                         GrpcSender(cluster.grpc_port, cluster.write_token), batch=1)
    senders = [dimse, grpc_sender]
    for s in senders:
        s.start()
    try:
        wait_for(lambda: all(len(s.acked) >= 12 for s in senders), 90, "ingest through HAProxy")
        before = {s.name: len(s.acked) for s in senders}
        L.kill_frontend(cluster, "fe1")
        wait_for(lambda: all(len(s.acked) >= before[s.name] + 12 for s in senders), 90,
                 "ingest to continue through the surviving front-end")
    finally:
        for s in senders:
            s.stop.set()
        for s in senders:
            s.join(120)
    assert not any(s.is_alive() for s in senders)
    L.wait_backends(cluster, up={"fe2"})

    # every acknowledged instance comes back bit-exact through HAProxy (now: fe2 only)
    retrieve_all(cluster.grpc_port, cluster.read_token, dimse.acked, grpc_sender.acked)
    # nothing half-registered: acknowledged ones complete, the others complete or absent
    index = open_index(cluster, cassandra_endpoint)
    try:
        assert_whole_or_absent(index, dimse.acked + grpc_sender.acked, must_exist=True)
        assert_whole_or_absent(index, dimse.failed + grpc_sender.failed, must_exist=False)
    finally:
        index.close()
    report = subprocess.run([*L.vna_command(), "integrity", "report", "--json", "--config",
                             str(cluster.frontend("fe2").config)], capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, report.stderr
    rep = json.loads(report.stdout)
    assert [rep[k]["count"] for k in ("damaged", "lost", "under_replicated")] == [0, 0, 0], rep

    # the killed front-end restarts and HAProxy sends it DIMSE and gRPC traffic again
    L.start_frontend(cluster, "fe1")
    seen = L.wait_backends(cluster)
    rejoin = sorted((cluster_corpus / "103").glob("*.dcm"))
    sender = GrpcSender(cluster.grpc_port, cluster.write_token)
    for i, path in enumerate(rejoin):
        now = L.haproxy_servers(cluster)
        if all(now[f"{b}/fe1"]["sessions"] > seen[f"{b}/fe1"]["sessions"] for b in ("vna_dimse", "vna_grpc")):
            break
        if i % 2:
            assert storescu(cluster.dicom_port, [path]) == [True]
        else:
            assert sender([path]) == [True]
            assert sender.client is not None
            sender.client.close()     # the next upload opens a new connection (HAProxy balances connections)
            sender.client = None
    else:
        raise AssertionError(f"HAProxy did not send traffic to the restarted front-end: {now}")


def test_cassandra_unreachable_then_back(cluster: Any, cluster_launcher: ModuleType, fault_proxy: FaultProxy,
                                         cluster_corpus: Path, cassandra_endpoint: tuple[str, int]) -> None:
    L = cluster_launcher
    L.wait_backends(cluster)
    files = sorted((cluster_corpus / "104").glob("*.dcm"))[:6]
    fault_proxy.cut("cassandra")
    try:
        # the health checks see the index gone: HAProxy takes every front-end out of rotation
        L.wait_backends(cluster, up=set(), wait=60)
        assert storescu(cluster.dicom_port, files[:2]) == [False, False]   # no front-end: association refused
        with VnaClient(f"127.0.0.1:{cluster.grpc_port}", cluster.write_token, timeout=10) as c:
            with pytest.raises(ApiError) as err:
                c.store(files[2])
            assert err.value.code == grpc.StatusCode.UNAVAILABLE
        # a front-end reached directly answers a failure status, not Success
        rsp = scu.store(cluster.frontend("fe2").dicom_port, [files[3]])
        assert [r.Status for r in rsp] == [0xA700]
    finally:
        fault_proxy.restore("cassandra")
    # recovery is automatic: both front-ends pass their health checks again and take stores
    L.wait_backends(cluster, wait=90)
    index = open_index(cluster, cassandra_endpoint)
    try:
        assert assert_whole_or_absent(index, files[:4], must_exist=False) == 0
        assert storescu(cluster.dicom_port, files[:2]) == [True, True]
        with VnaClient(f"127.0.0.1:{cluster.grpc_port}", cluster.write_token, timeout=30) as c:
            c.store(files[2])
        assert [r.Status for r in scu.store(cluster.frontend("fe2").dicom_port, [files[3]])] == [0]
        assert_whole_or_absent(index, files[:4], must_exist=True)
    finally:
        index.close()
    retrieve_all(cluster.grpc_port, cluster.read_token, [files[0], files[1], files[3]], [files[2]])


def test_object_store_unreachable_then_back(cluster: Any, cluster_launcher: ModuleType, fault_proxy: FaultProxy,
                                            cluster_corpus: Path, cassandra_endpoint: tuple[str, int]) -> None:
    L = cluster_launcher
    L.wait_backends(cluster)
    files = sorted((cluster_corpus / "104").glob("*.dcm"))[6:10]
    fault_proxy.cut("s3")
    try:
        # the front-ends stay in rotation (the index answers) and refuse to acknowledge: quorum not met
        assert storescu(cluster.dicom_port, files[:2]) == [False, False]
        with VnaClient(f"127.0.0.1:{cluster.grpc_port}", cluster.write_token, timeout=60) as c:
            with pytest.raises(ApiError) as err:
                c.store(files[2])
            assert err.value.code == grpc.StatusCode.UNAVAILABLE
        rsp = scu.store(cluster.frontend("fe1").dicom_port, [files[3]])
        assert [r.Status for r in rsp] == [0xA700]
    finally:
        fault_proxy.restore("s3")
    index = open_index(cluster, cassandra_endpoint)
    try:
        assert assert_whole_or_absent(index, files, must_exist=False) == 0
        # recovery is automatic: the same instances are accepted as soon as the store is back
        assert storescu(cluster.dicom_port, files[:2]) == [True, True]
        with VnaClient(f"127.0.0.1:{cluster.grpc_port}", cluster.write_token, timeout=60) as c:
            c.store(files[2])
        assert [r.Status for r in scu.store(cluster.frontend("fe1").dicom_port, [files[3]])] == [0]
        assert_whole_or_absent(index, files, must_exist=True)
    finally:
        index.close()
    retrieve_all(cluster.grpc_port, cluster.read_token, [files[0], files[1], files[3]], [files[2]])
