"""Pytest plugin: a real Cassandra 5.0 node for the tests (never mocked, never skipped).

``cassandra_endpoint`` (session): ``(host, port)`` of a running node. With
``VNA_TEST_CASSANDRA=host:port`` (set by the Makefile / .ci/run, which start the
node) that one is used; otherwise a fresh single node is started with
``ops/cassandra/launcher.py`` in a temporary directory on free ports and stopped
at the end of the session. A node that cannot start is a test error.

``cassandra_index`` (function): a migrated :class:`CassandraIndex` on an empty
keyspace of its own. Keyspaces (``vna_test_<random>``) come from
``cassandra_keyspaces``, a session pool: creating and migrating one costs ~3 s and
dropping one ~2 s on a small machine, truncating its tables ~0.3 s, so a used
keyspace is truncated and handed to the next test; all are dropped at session end.
``cassandra_admin`` (session): a raw driver session (truncate/drop, fault setup).
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from benchmarks.servers import free_port, load_cassandra_launcher
from vna.config import CassandraConfig
from vna.index.cassandra import CassandraIndex

__all__ = [
    "KeyspacePool", "cassandra_endpoint", "cassandra_admin", "cassandra_config", "cassandra_keyspaces",
    "cassandra_index",
]

ROOT = Path(__file__).resolve().parent.parent
LOCAL_DC = os.environ.get("VNA_TEST_CASSANDRA_DC", "dc1")


@pytest.fixture(scope="session")
def cassandra_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    env = os.environ.get("VNA_TEST_CASSANDRA", "").strip()
    if env:
        host, _, port = env.rpartition(":")
        yield (host or "127.0.0.1", int(port))
        return
    launcher = load_cassandra_launcher()
    home = tmp_path_factory.mktemp("cassandra")
    nodes = launcher.start(home, port=free_port(), storage_port=free_port())
    try:
        yield (nodes[0].address, nodes[0].native_port)
    finally:
        launcher.stop(home)
        shutil.rmtree(home, ignore_errors=True)  # commit log segments are large


@pytest.fixture(scope="session")
def cassandra_admin(cassandra_endpoint: tuple[str, int]) -> Iterator[Any]:
    from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile
    from cassandra.policies import DCAwareRoundRobinPolicy
    from cassandra.query import dict_factory

    host, port = cassandra_endpoint
    profile = ExecutionProfile(load_balancing_policy=DCAwareRoundRobinPolicy(local_dc=LOCAL_DC),
                               request_timeout=60, row_factory=dict_factory)
    cluster = Cluster([host], port=port, execution_profiles={EXEC_PROFILE_DEFAULT: profile})
    session = cluster.connect()
    try:
        yield session
    finally:
        cluster.shutdown()


class KeyspacePool:
    """Migrated, empty keyspaces for tests; ``release`` truncates and recycles one."""

    def __init__(self, admin: Any, make_config: Callable[..., CassandraConfig]) -> None:
        self.admin = admin
        self.make_config = make_config
        self.free: list[str] = []
        self.all: list[str] = []

    def acquire(self) -> str:
        if self.free:
            return self.free.pop()
        cfg = self.make_config()
        index = CassandraIndex(cfg)
        try:
            index.migrate()
        finally:
            index.close()
        self.all.append(cfg.keyspace)
        return cfg.keyspace

    def truncate(self, keyspace: str) -> None:
        """Empty every data table of ``keyspace`` (the schema version stays)."""
        rows = self.admin.execute(
            "SELECT table_name FROM system_schema.tables WHERE keyspace_name = %s", (keyspace,))
        for r in rows:
            if r["table_name"] != "schema_version":
                self.admin.execute(f"TRUNCATE {keyspace}.{r['table_name']}")

    def release(self, keyspace: str) -> None:
        self.truncate(keyspace)
        self.free.append(keyspace)

    def drop_all(self) -> None:
        for keyspace in self.all:
            self.admin.execute(f"DROP KEYSPACE IF EXISTS {keyspace}")
        self.all.clear()
        self.free.clear()


def _config_factory(endpoint: tuple[str, int]) -> Callable[..., CassandraConfig]:
    host, port = endpoint

    def make(**overrides: Any) -> CassandraConfig:
        values: dict[str, Any] = dict(
            contact_points=(host,), port=port, local_dc=LOCAL_DC,
            keyspace=f"vna_test_{uuid.uuid4().hex[:12]}", replication=f'{{"{LOCAL_DC}": 1}}',
            request_timeout=30.0)
        values.update(overrides)
        return CassandraConfig(**values)

    return make


@pytest.fixture
def cassandra_config(cassandra_endpoint: tuple[str, int]) -> Callable[..., CassandraConfig]:
    """Factory: a CassandraConfig for the test node with a new keyspace name (not created)."""
    return _config_factory(cassandra_endpoint)


@pytest.fixture(scope="session")
def cassandra_keyspaces(cassandra_endpoint: tuple[str, int], cassandra_admin: Any) -> Iterator[KeyspacePool]:
    pool = KeyspacePool(cassandra_admin, _config_factory(cassandra_endpoint))
    try:
        yield pool
    finally:
        pool.drop_all()


@pytest.fixture
def cassandra_index(
    cassandra_config: Callable[..., CassandraConfig], cassandra_keyspaces: KeyspacePool
) -> Iterator[CassandraIndex]:
    keyspace = cassandra_keyspaces.acquire()
    index = CassandraIndex(cassandra_config(keyspace=keyspace))
    try:
        index.migrate()  # already migrated: checks idempotency on every use
        yield index
    finally:
        index.close()
        cassandra_keyspaces.release(keyspace)
