"""The HA cluster: ingest through HAProxy with 1 and 2 front-ends, gRPC MB/s, Orthanc on the same corpus.

One Cassandra node and one SeaweedFS are started for the run (or given); for
each front-end count a fresh cluster (``ops/cluster/cluster.py``: N ``vna
serve`` + HAProxy, Cassandra index on a fresh keyspace, two shared hot
directories, W=2, cold on S3) is brought up, warmed, and sent the same
corpora with DCMTK ``storescu`` (TCP_NODELAY=1, ``--associations`` parallel
associations through HAProxy's DIMSE port); then the same corpus goes over
gRPC (``--grpc-streams`` parallel channels, each its own connection) to
HAProxy's gRPC port and is retrieved back (client-side SHA-256 verified).
Orthanc 1.10 gets the same DICOM corpora with the same client in the same run.
Printed: our figure, the peer's figure, and the ratio (1 → 2 front-ends is
the horizontal scaling; vna / Orthanc the comparison).

    .venv/bin/python -m benchmarks.cluster [--ct 100] [--small 400] [--associations 4] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.ingest import Corpus, Receiver, make_corpus, send, start_orthanc, stop_process
from benchmarks.servers import free_port, fs_type, load_cassandra_launcher, load_cluster_launcher, load_s3_launcher
from tests.s3_server import free_port_block


@dataclass
class Row:
    what: str
    corpus: str
    instances: int
    mb: float
    seconds: float
    stored: int | None

    @property
    def inst_per_s(self) -> float:
        return self.instances / self.seconds

    @property
    def mb_per_s(self) -> float:
        return self.mb / self.seconds


def index_count(L: Any, c: Any) -> int | None:
    r = subprocess.run([*L.vna_command(), "index", "stats", "--json", "--config", str(c.frontends[0].config)],
                       capture_output=True, text=True, timeout=120)
    return int(json.loads(r.stdout)["instances"]) if r.returncode == 0 else None


def grpc_phase(c: Any, corpus: Corpus, streams: int) -> tuple[float, float]:
    """Store ``corpus`` over ``streams`` parallel gRPC channels through HAProxy, then retrieve it all.

    Returns (store seconds, retrieve seconds). Every store and retrieve must succeed (digests checked).
    """
    from vna.api.client import VnaClient

    target = f"127.0.0.1:{c.grpc_port}"
    chunks = [corpus.files[i::streams] for i in range(streams)]
    uids: list[list[str]] = [[] for _ in chunks]
    errors: list[BaseException] = []

    def run(i: int, retrieve: bool) -> None:
        try:
            with VnaClient(target, c.write_token, timeout=120,
                           options=[("grpc.use_local_subchannel_pool", 1)]) as client:
                if not retrieve:
                    uids[i] = [client.store(p).sop_instance_uid for p in chunks[i]]
                else:
                    for uid in uids[i]:
                        for inst in client.retrieve(sop_uid=uid):
                            assert len(inst.data) > 0
        except BaseException as exc:  # reported after the join
            errors.append(exc)

    times = []
    for retrieve in (False, True):
        threads = [threading.Thread(target=run, args=(i, retrieve)) for i in range(len(chunks))]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        times.append(time.perf_counter() - t0)
        if errors:
            raise RuntimeError(f"gRPC {'retrieve' if retrieve else 'store'} failed: {errors[0]!r}")
    return times[0], times[1]


def run(args: argparse.Namespace) -> list[Row]:
    L = load_cluster_launcher()
    root = Path(tempfile.mkdtemp(prefix="vna-bench-cluster-", dir=args.tmp_dir))
    print(f"work dir {root} ({fs_type(root)})", file=sys.stderr)
    corpora = []
    if args.ct:
        corpora.append(make_corpus(root / "corpus", "ct", "ct", args.ct, 50, seed=31))
    if args.small:
        corpora.append(make_corpus(root / "corpus", "small", "small", args.small, 50, seed=32))
    warm = make_corpus(root / "corpus", "warm", "small", 20, 20, seed=33)
    grpc_corpus = make_corpus(root / "corpus", "grpc", "ct", args.grpc_ct, 50, seed=34)
    rows: list[Row] = []
    cass_launcher = load_cassandra_launcher()
    s3_launcher = load_s3_launcher()
    cass_home, s3_home = root / "cassandra", root / "s3"
    try:
        if args.cassandra:
            host, _, port = args.cassandra.rpartition(":")
            cassandra = (host or "127.0.0.1", int(port))
        else:
            cass_launcher.fetch()
            node = cass_launcher.start(cass_home, port=free_port(), storage_port=free_port())[0]
            cassandra = (node.address, node.native_port)
        endpoint = s3_launcher.start(s3_home, free_port_block(s3_launcher.PORT_SPAN))
        for n in args.frontends:
            home = root / f"cluster-{n}"
            c = L.plan(home, n, dicom_port=free_port(), grpc_port=free_port(), cassandra=cassandra,
                       s3_endpoint=endpoint, hot="shared")
            L.up(c, log=False)
            try:
                rcv = Receiver(f"vna x{n}", c.dicom_port, c.ae_title, None, lambda: None, home / "haproxy.log")  # type: ignore[arg-type]
                send(rcv, warm.files, warm.dir, 1, 300)
                for corpus in corpora:
                    secs = send(rcv, corpus.files, corpus.dir, args.associations, 1800)
                    rows.append(Row(f"vna DIMSE, {n} front-end(s)", corpus.name, len(corpus.files),
                                    corpus.nbytes / 1e6, secs, None))
                total = index_count(L, c)
                expected = len(warm.files) + sum(len(x.files) for x in corpora)
                if total != expected:
                    raise RuntimeError(f"cluster x{n} holds {total} instances, {expected} were sent")
                store_s, retrieve_s = grpc_phase(c, grpc_corpus, args.grpc_streams)
                rows.append(Row(f"vna gRPC store, {n} front-end(s)", grpc_corpus.name, len(grpc_corpus.files),
                                grpc_corpus.nbytes / 1e6, store_s, None))
                rows.append(Row(f"vna gRPC retrieve, {n} front-end(s)", grpc_corpus.name,
                                len(grpc_corpus.files), grpc_corpus.nbytes / 1e6, retrieve_s, None))
                print(f"  cluster x{n}: {L.haproxy_servers(c)}", file=sys.stderr)
            finally:
                L.down(home, log=False)
        if not args.no_orthanc:
            work = root / "orthanc"
            work.mkdir()
            orthanc = start_orthanc(work, free_port(), free_port(), 60)
            try:
                send(orthanc, warm.files, warm.dir, 1, 300)
                for corpus in corpora:
                    secs = send(orthanc, corpus.files, corpus.dir, args.associations, 1800)
                    rows.append(Row("Orthanc DIMSE", corpus.name, len(corpus.files), corpus.nbytes / 1e6, secs,
                                    None))
                stored = orthanc.count()
                expected = len(warm.files) + sum(len(x.files) for x in corpora)
                if stored != expected:
                    raise RuntimeError(f"Orthanc holds {stored} instances, {expected} were sent")
            finally:
                stop_process(orthanc.proc)
    finally:
        if s3_home.exists():
            s3_launcher.stop(s3_home, grace=5.0)
        if cass_home.exists():
            cass_launcher.stop(cass_home)
        shutil.rmtree(root, ignore_errors=True)
    return rows


def table(rows: list[Row], frontends: list[int]) -> str:
    def find(what: str, corpus: str) -> Row | None:
        return next((r for r in rows if r.what == what and r.corpus == corpus), None)

    out = [f"{'run':36s} {'corpus':6s} {'inst':>5s} {'inst/s':>8s} {'MB/s':>7s}  {'ratio':>22s}"]
    for r in rows:
        ratio = ""
        n = r.what.split(", ")[-1].split()[0] if "front-end" in r.what else ""
        if n and int(n) != frontends[0]:
            base = find(r.what.replace(f"{n} front-end", f"{frontends[0]} front-end"), r.corpus)
            if base is not None:
                ratio = f"x{r.mb_per_s / base.mb_per_s:.2f} vs {frontends[0]} front-end"
        if r.what.startswith("vna DIMSE"):
            peer = find("Orthanc DIMSE", r.corpus)
            if peer is not None:
                ratio = (ratio + "; " if ratio else "") + f"x{r.inst_per_s / peer.inst_per_s:.2f} vs Orthanc"
        out.append(f"{r.what:36s} {r.corpus:6s} {r.instances:5d} {r.inst_per_s:8.1f} {r.mb_per_s:7.2f}  {ratio}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ct", type=int, default=100, help="CT instances (~526 KB) per DIMSE run")
    p.add_argument("--small", type=int, default=400, help="small instances per DIMSE run")
    p.add_argument("--grpc-ct", type=int, default=60, help="CT instances stored and retrieved over gRPC")
    p.add_argument("--associations", type=int, default=4, help="parallel storescu associations")
    p.add_argument("--grpc-streams", type=int, default=4, help="parallel gRPC channels")
    p.add_argument("--frontends", default="1,2", help="front-end counts to compare (first is the baseline)")
    p.add_argument("--cassandra", default="", help="HOST:PORT of a running Cassandra (default: start one)")
    p.add_argument("--no-orthanc", action="store_true")
    p.add_argument("--tmp-dir", default=None)
    p.add_argument("--json", default="", help="write the rows here too")
    args = p.parse_args(argv)
    args.frontends = [int(x) for x in args.frontends.split(",") if x]
    rows = run(args)
    print(table(rows, args.frontends))
    print("(hot: 2 shared fsynced directories, W=2; index: one Cassandra node; HAProxy TCP mode; "
          "Orthanc 1.10 defaults. The machine may be shared: compare ratios, not absolutes.)")
    if args.json:
        Path(args.json).write_text(json.dumps([{**asdict(r), "inst_per_s": r.inst_per_s, "mb_per_s": r.mb_per_s}
                                               for r in rows], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
