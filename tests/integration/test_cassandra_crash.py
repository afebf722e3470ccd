"""A front-end on the Cassandra index killed -9 mid-ingest, restarted, and sent everything again (issue 19).

Every instance of the re-send is stored (no 0x0111 "duplicate" for a half-done
registration), each exactly once, and ``vna index stats`` / ``vna index
janitor`` report what the kill left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from benchmarks.corpus import write_corpus
from tests.cassandra_node import KeyspacePool
from tests.conftest import DCMTK_ENV, VnaServer
from tests.integration import scu

pytestmark = pytest.mark.cassandra


def _config(endpoint: tuple[str, int], keyspace: str) -> str:
    host, port = endpoint
    return f"""
[index]
backend = "cassandra"
[index.cassandra]
contact_points = ["{host}"]
port = {port}
local_dc = "dc1"
keyspace = "{keyspace}"
replication = '{{"dc1": 1}}'
request_timeout = 30
"""


def _storescu(srv: VnaServer, files: list[Path]) -> subprocess.Popen[str]:
    return subprocess.Popen(["storescu", "-aec", "VNA", "127.0.0.1", str(srv.port), *map(str, files)],
                            env=DCMTK_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _blobs(srv: VnaServer) -> int:
    return sum(1 for p in srv.data_dir.rglob("*.dcm") if "spool" not in p.parts)


def test_kill_9_mid_ingest_then_resend_stores_everything_once(
        make_server: Callable[..., VnaServer], cassandra_endpoint: tuple[str, int],
        cassandra_keyspaces: KeyspacePool, tmp_path: Path) -> None:
    files = write_corpus(tmp_path / "corpus", "ct", studies=2, per_study=30, seed=19)
    keyspace = cassandra_keyspaces.acquire()
    try:
        srv = make_server(_config(cassandra_endpoint, keyspace), start=False).start(timeout=120)
        senders = [_storescu(srv, files[n::4]) for n in range(4)]  # 4 associations: registrations in flight
        deadline = time.monotonic() + 120
        while _blobs(srv) < 20 and time.monotonic() < deadline and any(s.poll() is None for s in senders):
            time.sleep(0.01)
        assert srv.proc is not None
        os.kill(srv.proc.pid, signal.SIGKILL)  # mid-ingest: blobs written, registrations in flight
        srv.proc.wait()
        for s in senders:
            s.communicate(timeout=120)

        srv.start(timeout=120)
        again = _storescu(srv, files)
        out, _ = again.communicate(timeout=300)
        assert again.returncode == 0, out + srv.log.read_text()[-4000:]
        assert "0x0111" not in out and "Duplicate" not in out, out  # what the old claim answered

        rows, final = scu.find(srv.port, {"QueryRetrieveLevel": "IMAGE", "SOPInstanceUID": "",
                                          "StudyInstanceUID": "", "SeriesInstanceUID": ""})
        assert final == 0
        found = [str(r.SOPInstanceUID) for r in rows]
        assert len(found) == len(set(found)) == len(files)

        r = srv.cli("index", "stats", "--json")
        assert r.returncode == 0, r.stderr
        stats: dict[str, Any] = json.loads(r.stdout)
        assert stats["instances"] == len(files)
        assert stats["abandoned_registrations"] == 0  # what the kill left is not stale yet
        r = srv.cli("index", "janitor", "--json")
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        cassandra_keyspaces.release(keyspace)
