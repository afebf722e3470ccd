"""Catalogue counters under real front-ends (issue 19): ``vna index stats`` equals a full recount.

Two ``vna serve`` front-ends on one Cassandra keyspace and shared hot replicas
store overlapping sets at once, one is killed with ``kill -9`` mid-ingest and
restarted, everything is sent again to both (identical retries), then
``vna index stats --recount`` finds no difference between the maintained
counters and the recount. And the verb itself on both adapters: it prints both
figures and the difference, and repairs the counters.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from benchmarks.corpus import write_corpus
from tests.cassandra_node import KeyspacePool
from tests.conftest import VnaServer
from tests.integration.test_cassandra_crash import _config, _storescu


def _recount(srv: VnaServer) -> dict[str, Any]:
    r = srv.cli("index", "stats", "--recount", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    out: dict[str, Any] = json.loads(r.stdout)
    return out


@pytest.mark.cassandra
def test_two_front_ends_overlapping_stores_kill_9_and_retries_leave_counters_equal_to_a_recount(
        make_server: Callable[..., VnaServer], cassandra_endpoint: tuple[str, int],
        cassandra_keyspaces: KeyspacePool, tmp_path: Path) -> None:
    files = write_corpus(tmp_path / "corpus", "ct", studies=3, per_study=20, seed=23)
    keyspace = cassandra_keyspaces.acquire()
    hot = [tmp_path / "shared-hot-1", tmp_path / "shared-hot-2"]
    config = _config(cassandra_endpoint, keyspace) + f'[hot]\nreplicas = ["{hot[0]}", "{hot[1]}"]\n'
    try:
        a = make_server(config, start=False).start(timeout=120)
        b = make_server(config, start=False).start(timeout=120)
        backwards = files[::-1]
        senders = [_storescu(a, files[0::2]), _storescu(a, files[1::2]),  # every file to both at once:
                   _storescu(b, files[0::2]), _storescu(b, files[1::2])]  # identical concurrent commits
        deadline = time.monotonic() + 120
        while sum(1 for p in hot[0].rglob("*.dcm")) < 20 and time.monotonic() < deadline \
                and any(s.poll() is None for s in senders[:2]):
            time.sleep(0.01)
        assert a.proc is not None
        os.kill(a.proc.pid, signal.SIGKILL)  # mid-ingest: commits (and their counter rows) in flight
        a.proc.wait()
        for s in senders:
            s.communicate(timeout=300)

        a.log.write_text("")  # "vna ready" of the killed run must not count as the restart's
        a.start(timeout=120)
        again = [_storescu(a, files), _storescu(b, backwards)]  # identical retries, concurrently
        for s in again:
            out, _ = s.communicate(timeout=300)
            assert s.returncode == 0, out + a.log.read_text()[-3000:]

        st = _recount(b)
        assert st["recounted"]["instances"] == len(files)
        assert st["difference"] == {}, st
        assert st["maintained"] == st["recounted"]
        r = a.cli("index", "stats", "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["instances"] == len(files)
    finally:
        cassandra_keyspaces.release(keyspace)


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("cassandra", marks=pytest.mark.cassandra)])
def test_index_stats_recount_prints_both_figures_and_repairs(
        backend: str, make_server: Callable[..., VnaServer], request: pytest.FixtureRequest,
        corpus_dir: Path) -> None:
    files = sorted(corpus_dir.rglob("*.dcm"))
    pool: KeyspacePool | None = None
    keyspace = ""
    config = ""
    if backend == "cassandra":
        pool = request.getfixturevalue("cassandra_keyspaces")
        keyspace = pool.acquire()
        config = _config(request.getfixturevalue("cassandra_endpoint"), keyspace)
    try:
        srv = make_server(config, start=False).start(timeout=120)
        sender = _storescu(srv, files)
        out, _ = sender.communicate(timeout=120)
        assert sender.returncode == 0, out
        srv.stop()
        if backend == "cassandra":  # counters that went wrong (what --recount is for)
            admin = request.getfixturevalue("cassandra_admin")
            row = admin.execute(f"SELECT DISTINCT shard, totals FROM {keyspace}.counter_ledger WHERE shard = 7").one()
            wrong = (row["totals"] or {}).get("instances", 0) + 5 if row else 5
            admin.execute(f"UPDATE {keyspace}.counter_ledger SET totals = totals + %s WHERE shard = 7",
                          ({"instances": wrong},))

        r = srv.cli("index", "stats", "--recount")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "maintained" in r.stdout and "recounted" in r.stdout and "difference" in r.stdout
        lines = {line.split()[0]: line.split()[1:] for line in r.stdout.splitlines()[1:-1]}
        if backend == "cassandra":  # maintained, recounted, difference
            assert lines["instances"] == [str(len(files) + 5), str(len(files)), "-5"], r.stdout
            assert "repaired" in r.stdout.splitlines()[-1]
        else:
            assert lines["instances"] == [str(len(files)), str(len(files)), "+0"], r.stdout
            assert "agree" in r.stdout.splitlines()[-1]
        st = _recount(srv)  # again, as JSON: the first run repaired the counters
        assert st["difference"] == {}
        assert st["recounted"]["instances"] == len(files)
        r = srv.cli("index", "stats", "--json")
        assert json.loads(r.stdout)["instances"] == len(files)
    finally:
        if pool is not None:
            pool.release(keyspace)
