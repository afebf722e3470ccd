"""Fixtures for the cluster tests: a real vna cluster (``ops/cluster/cluster.py``) and a network-fault proxy.

``fault_proxy`` (module): a second HAProxy, in TCP mode, standing between the
front-ends and their Cassandra node and S3 server; ``cut(name)`` puts a path
in maintenance and kills its open connections (the dependency is unreachable
for the front-ends only), ``restore(name)`` brings it back. ``cluster``
(module): two front-ends behind HAProxy on free ports, on a fresh keyspace of
the session's Cassandra node and on the session's SeaweedFS (hot replicas: two
S3 buckets; cold: a third), both reached through the fault proxy.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator
from urllib.parse import urlparse

import pytest

from benchmarks.servers import free_port, load_cluster_launcher

FAULT_PROXY_CFG = """\
global
    stats socket ipv4@127.0.0.1:{stats} level admin
defaults
    mode tcp
    timeout connect 2s
    timeout client 10m
    timeout server 10m
listen cassandra
    bind 127.0.0.1:{cassandra}
    server dep {cassandra_target}
listen s3
    bind 127.0.0.1:{s3}
    server dep {s3_target}
"""


@dataclass
class FaultProxy:
    """HAProxy forwarding ``cassandra`` and ``s3`` to the real servers; paths can be cut and restored."""

    stats: int
    cassandra: int
    s3: int
    proc: subprocess.Popen[bytes]
    launcher: ModuleType

    def cut(self, name: str) -> None:
        """Make ``name`` unreachable: refuse new connections, kill the open ones."""
        self.launcher.haproxy_admin(self.stats, f"disable server {name}/dep")
        self.launcher.haproxy_admin(self.stats, f"shutdown sessions server {name}/dep")

    def restore(self, name: str) -> None:
        self.launcher.haproxy_admin(self.stats, f"enable server {name}/dep")


@pytest.fixture(scope="module")
def cluster_launcher() -> ModuleType:
    return load_cluster_launcher()


@pytest.fixture(scope="module")
def fault_proxy(cassandra_endpoint: tuple[str, int], s3_endpoint: str, cluster_launcher: ModuleType,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultProxy]:
    home = tmp_path_factory.mktemp("faultproxy")
    s3 = urlparse(s3_endpoint)
    ports = {"stats": free_port(), "cassandra": free_port(), "s3": free_port()}
    cfg = home / "haproxy.cfg"
    cfg.write_text(FAULT_PROXY_CFG.format(**ports, cassandra_target=f"{cassandra_endpoint[0]}:{cassandra_endpoint[1]}",
                                          s3_target=f"{s3.hostname}:{s3.port}"))
    with open(home / "haproxy.log", "wb") as log:
        proc = subprocess.Popen(cluster_launcher.haproxy_command(cfg), stdout=log, stderr=subprocess.STDOUT)
    proxy = FaultProxy(ports["stats"], ports["cassandra"], ports["s3"], proc, cluster_launcher)
    deadline = time.monotonic() + 10
    while True:
        try:
            cluster_launcher.haproxy_admin(proxy.stats, "show info")
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"fault proxy did not start: {(home / 'haproxy.log').read_text()}")
            time.sleep(0.1)
    try:
        yield proxy
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module")
def cluster(fault_proxy: FaultProxy, cluster_launcher: ModuleType, cassandra_admin: Any,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Two front-ends behind HAProxy (DICOM and gRPC on free ports), everything real."""
    home = tmp_path_factory.mktemp("cluster")
    c = cluster_launcher.plan(
        home, 2, dicom_port=free_port(), grpc_port=free_port(),
        cassandra=("127.0.0.1", fault_proxy.cassandra), s3_endpoint=f"http://127.0.0.1:{fault_proxy.s3}",
        hot="s3", env={"VNA_INDEX_CASSANDRA_REQUEST_TIMEOUT": "5"})
    cluster_launcher.up(c, log=False)
    try:
        yield c
    finally:
        cluster_launcher.down(home, log=False)
        cassandra_admin.execute(f"DROP KEYSPACE IF EXISTS {c.keyspace}")


@pytest.fixture(scope="module")
def cluster_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Small distinct instances to stream at the cluster (generated once per module)."""
    from benchmarks.corpus import write_corpus

    d = tmp_path_factory.mktemp("cluster-corpus")
    for seed, studies in ((101, 25), (102, 25), (103, 5), (104, 2)):
        write_corpus(d / str(seed), "small", studies=studies, per_study=8, seed=seed)
    return d
