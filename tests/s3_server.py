"""Pytest plugin: a real SeaweedFS S3 server for the tests (never mocked, never skipped).

``s3_endpoint`` (session): the endpoint URL of a SeaweedFS server started with
``ops/s3/launcher.py`` in a temporary directory on free non-default ports and
stopped at the end of the session. A server that cannot start is a test error.

``s3_config`` (function): an :class:`S3Config` on a fresh bucket of its own
(created; deleted with its contents at teardown).
``s3_store`` (function): an :class:`S3BlobStore` on ``s3_config``.
``s3_boto_session`` (session): the boto3 Session test stores build clients from.
"""

from __future__ import annotations

import random
import socket
import uuid
from pathlib import Path
from typing import Any, Iterator

import boto3
import pytest

from benchmarks.servers import load_s3_launcher
from vna.config import S3Config
from vna.storage.s3 import S3BlobStore

__all__ = ["s3_endpoint", "s3_boto_session", "s3_config", "s3_store", "free_port_block"]

# The temp dir is thrown away, so there is no point waiting out SeaweedFS's ~16 s
# graceful stop (its filer waits 15 s for the S3 gateway's subscription).
STOP_GRACE = 3.0


def free_port_block(span: int, low: int = 20000, high: int = 50000, tries: int = 200) -> int:
    """First port of ``span`` consecutive ports free on 127.0.0.1 right now."""
    for _ in range(tries):
        base = random.randrange(low, high - span)
        ok = True
        for port in range(base, base + span):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError(f"no block of {span} free ports found")


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    launcher = load_s3_launcher()
    home = tmp_path_factory.mktemp("seaweedfs")
    endpoint = None
    for attempt in range(3):  # another process may grab a port between the check and the bind
        try:
            endpoint = launcher.start(home, free_port_block(launcher.PORT_SPAN))
            break
        except launcher.LaunchError as exc:
            if "ports in use" not in str(exc) or attempt == 2:
                raise
    assert endpoint is not None
    try:
        yield str(endpoint)
    finally:
        launcher.stop(home, grace=STOP_GRACE)


@pytest.fixture(scope="session")
def s3_boto_session() -> Any:
    """One boto3 Session for the test process: a client from it costs ~20 ms, not ~300 ms."""
    return boto3.session.Session()


@pytest.fixture
def s3_config(s3_endpoint: str, s3_boto_session: Any) -> Iterator[S3Config]:
    cfg = S3Config(endpoint_url=s3_endpoint, bucket=f"vna-test-{uuid.uuid4().hex[:12]}",
                   access_key="vna", secret_key="vna-secret", region="us-east-1",
                   max_attempts=3, connect_timeout=5.0, read_timeout=30.0)
    admin = S3BlobStore("s3-admin", cfg, session=s3_boto_session)
    assert admin.create_bucket_if_missing()
    yield cfg
    # SeaweedFS deletes a non-empty bucket (and frees its volume) in one call.
    admin._s3.delete_bucket(Bucket=cfg.bucket)


@pytest.fixture
def s3_store(s3_config: S3Config, s3_boto_session: Any) -> S3BlobStore:
    return S3BlobStore("s3", s3_config, session=s3_boto_session)
