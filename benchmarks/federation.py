"""Federation benchmark: query latency for local vs other-site data, cross-site vs local retrieve MB/s.

Two sites on the 3-node, 2-datacenter Cassandra layout of ``ops/cassandra``
(site A = dc1, site B = dc2, replication {"dc1": 2, "dc2": 1}), each its own
``vna serve`` with gRPC. A CT study is stored at A and another at B (gRPC
Store). Then, at site A, measured in the same run:

- gRPC Query latency (STUDY level, with InstanceAvailability) for the study
  held at A (local data), for the study held at B (another site's data, read
  from the shared index), and for every study (all sites);
- gRPC Retrieve MB/s of A's study (local copies) and of B's study (each
  instance fetched from B over gRPC, verified, then streamed: ``cache_remote``
  is off so every repetition crosses sites), and their ratio.

    .venv/bin/python -m benchmarks.federation                       # starts the cluster (~1-3 min)
    .venv/bin/python -m benchmarks.federation --cassandra-dir /tmp/fedcass --count 20 --repeat 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from benchmarks.corpus import write_corpus
from benchmarks.servers import free_port, load_cassandra_launcher

ROOT = Path(__file__).resolve().parent.parent
TOKENS = {"A": "bench-site-a-token-000000", "B": "bench-site-b-token-000000"}
MB = 1e6


def _config(site: str, cass_port: int, grpc: dict[str, int], keyspace: str) -> str:
    other = "B" if site == "A" else "A"
    contact, dc = ("127.0.0.1", "dc1") if site == "A" else ("127.0.0.3", "dc2")
    return f"""
[archive]
site_id = "{site}"
[index]
backend = "cassandra"
[index.cassandra]
contact_points = ["{contact}"]
port = {cass_port}
local_dc = "{dc}"
keyspace = "{keyspace}"
replication = '{{"dc1": 2, "dc2": 1}}'
[grpc]
enabled = true
host = "127.0.0.1"
port = {grpc[site]}
[[grpc.token]]
name = "all"
token = "{TOKENS[site]}"
role = "write"
[web]
port = 0
[federation]
cache_remote = false
[[federation.site]]
id = "{other}"
grpc_endpoint = "127.0.0.1:{grpc[other]}"
token = "{TOKENS[other]}"
"""


class Site:
    """One ``vna serve`` process of the benchmark."""

    def __init__(self, name: str, work: Path, config: str, grpc_port: int) -> None:
        self.name = name
        self.data = work / f"site-{name}"
        self.data.mkdir()
        self.config = work / f"{name}.toml"
        self.config.write_text(config)
        self.log = work / f"{name}.log"
        self.grpc_port = grpc_port
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 180.0) -> None:
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "vna.cli", "serve", "--config", str(self.config), "--data-dir",
                 str(self.data), "--dicom-port", str(free_port()), "--host", "127.0.0.1"],
                stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
        deadline = time.monotonic() + timeout
        while "vna ready" not in self.log.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"site {self.name} did not start:\n{self.log.read_text()[-2000:]}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def client(self) -> Any:
        from vna.api.client import VnaClient

        return VnaClient(f"127.0.0.1:{self.grpc_port}", TOKENS[self.name], timeout=600)


def _median_ms(fn: Any, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _retrieve_mbs(client: Any, study_uid: str, repeat: int) -> tuple[float, int]:
    rates = []
    size = 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        size = sum(len(i.data or b"") for i in client.retrieve(study_uid=study_uid))
        rates.append(size / MB / (time.perf_counter() - t0))
    return statistics.median(rates), size


def measure(a: Site, b: Site, work: Path, count: int, repeat: int) -> dict[str, Any]:
    """Store one CT study per site, then time queries and retrieves at site A."""
    studies = {}
    for site, seed in ((a, 31), (b, 32)):
        files = write_corpus(work / f"corpus-{site.name}", "ct", studies=1, per_study=count, seed=seed)
        with site.client() as c:
            for f in files:
                r = c.store(f)
            studies[site.name] = r.study_instance_uid
    out: dict[str, Any] = {"instances_per_study": count, "repeat": repeat}
    with a.client() as c:
        def query(uid: str) -> None:
            rows = list(c.query("STUDY", {"StudyInstanceUID": uid, "InstanceAvailability": ""}))
            assert len(rows) == (1 if uid else 2), rows

        list(c.query("STUDY", {}))  # warm the channel and prepared statements
        out["query_ms"] = {"local_site_data": _median_ms(lambda: query(studies["A"]), repeat * 4),
                           "other_site_data": _median_ms(lambda: query(studies["B"]), repeat * 4),
                           "all_sites": _median_ms(lambda: query(""), repeat * 4)}
        local, size_a = _retrieve_mbs(c, studies["A"], repeat)
        remote, size_b = _retrieve_mbs(c, studies["B"], repeat)
    out["retrieve"] = {"local_mb_s": local, "cross_site_mb_s": remote, "ratio_cross_over_local": remote / local,
                       "study_bytes": {"A": size_a, "B": size_b}}
    return out


@contextmanager
def _cluster(args: argparse.Namespace, work: Path) -> Iterator[int]:
    """The CQL port of a running federation layout (``--cassandra-dir``) or of one started here."""
    launcher = load_cassandra_launcher()
    if args.cassandra_dir:
        yield launcher.recorded_nodes(args.cassandra_dir)[0].native_port
        return
    home = work / "cassandra"
    port = free_port()
    launcher.start(home, port=port, layout="federation", storage_port=free_port())
    try:
        yield port
    finally:
        launcher.stop(home)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=20, help="CT instances per study (~526 KB each)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--cassandra-dir", type=Path, help="a running `launcher.py start --layout federation` dir")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="vna-bench-fed-"))
    sites: list[Site] = []
    try:
        with _cluster(args, work) as cass_port:
            grpc = {"A": free_port(), "B": free_port()}
            keyspace = f"vna_bench_{uuid.uuid4().hex[:8]}"
            a = Site("A", work, _config("A", cass_port, grpc, keyspace), grpc["A"])
            b = Site("B", work, _config("B", cass_port, grpc, keyspace), grpc["B"])
            sites = [a, b]
            a.start()  # creates the keyspace
            b.start()
            result = measure(a, b, work, args.count, args.repeat)
            result["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(),
                                 "load_avg": os.getloadavg()}
            q, r = result["query_ms"], result["retrieve"]
            print(f"federation benchmark ({args.count} CT instances per study, median of {args.repeat}; "
                  f"load average {result['machine']['load_avg'][0]:.1f} on {os.cpu_count()} cores)")
            print(f"  query at A, study held at A        {q['local_site_data']:8.1f} ms")
            print(f"  query at A, study held at B        {q['other_site_data']:8.1f} ms"
                  f"   ratio {q['other_site_data'] / q['local_site_data']:.2f}")
            print(f"  query at A, all studies (2 sites)  {q['all_sites']:8.1f} ms")
            print(f"  retrieve at A, local copies        {r['local_mb_s']:8.1f} MB/s")
            print(f"  retrieve at A, fetched from B      {r['cross_site_mb_s']:8.1f} MB/s"
                  f"   ratio cross-site/local {r['ratio_cross_over_local']:.2f}")
            if args.json:
                args.json.write_text(json.dumps(result, indent=2))
            for s in sites:
                s.stop()
    finally:
        for s in sites:
            s.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
