"""Bulk import from files: ``vna store --jobs 1`` vs ``--jobs N``, and Orthanc's own way of importing files.

Same generated corpus, same machine, one run. Each vna run imports into a fresh data dir (SQLite index, 2
fsynced hot replicas, W=2: the defaults) and is timed from the start of the ``vna store`` process until it
exits, less the time of a ``vna store`` of one file (start-up), as Orthanc's start-up is not counted either. The peer is Orthanc 1.10 fed the same files the way its ``ImportDicomFiles.py`` does (HTTP POST
/instances of each file), from as many client threads as vna's jobs, into fresh storage. Instances stored
are counted on each side afterwards.

    .venv/bin/python -m benchmarks.bulk_import [--small 400] [--ct 60] [--jobs 1,4] [--no-orthanc]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.ingest import HOST, make_corpus, start_orthanc, stop_process
from benchmarks.servers import free_port


def vna_store(data: Path, corpus: Path, jobs: int) -> tuple[float, int]:
    """Seconds of one ``vna store --jobs`` run into ``data``, and the instances then indexed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VNA_")}
    cmd = [sys.executable, "-m", "vna.cli"]
    t0 = time.perf_counter()
    r = subprocess.run([*cmd, "store", "--jobs", str(jobs), "--progress-every", "3600", "--data-dir", str(data),
                        str(corpus)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                       timeout=3600)
    seconds = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"vna store failed ({r.returncode}): {r.stderr[-2000:]}")
    stats = subprocess.run([*cmd, "index", "stats", "--json", "--data-dir", str(data)], capture_output=True,
                           text=True, env=env, timeout=120)
    return seconds, int(json.loads(stats.stdout)["instances"])


def orthanc_import(work: Path, files: list[Path], jobs: int) -> tuple[float, int]:
    """Seconds to POST every file to a fresh Orthanc from ``jobs`` threads, and the instances it then holds."""
    http = free_port()
    rcv = start_orthanc(work, free_port(), http, 60)
    url = f"http://{HOST}:{http}/instances"

    def post(f: Path) -> None:
        req = urllib.request.Request(url, data=f.read_bytes(), method="POST",
                                     headers={"Content-Type": "application/dicom"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            resp.read()

    try:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            list(pool.map(post, files))
        seconds = time.perf_counter() - t0
        return seconds, int(rcv.count() or 0)
    finally:
        stop_process(rcv.proc)


def main(argv: list[str] | None = None) -> int:
    """Print one line per (importer, jobs): files/s, MB/s; then the ratios."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", type=int, default=400, help="small instances (64x64 secondary capture)")
    ap.add_argument("--ct", type=int, default=60, help="CT instances (512x512)")
    ap.add_argument("--jobs", default=f"1,{min(8, 2 * (os.cpu_count() or 1))}", help="comma-separated job counts")
    ap.add_argument("--no-orthanc", action="store_true")
    args = ap.parse_args(argv)
    jobs = [int(j) for j in args.jobs.split(",")]
    with tempfile.TemporaryDirectory(prefix="vna-bench-bulk-") as tmp:
        root = Path(tmp)
        corpus = root / "corpus"
        parts = [make_corpus(corpus, "small", "small", args.small, 20, 41)] if args.small else []
        if args.ct:
            parts.append(make_corpus(corpus, "ct", "ct", args.ct, 20, 42))
        files = [f for c in parts for f in c.files]
        nbytes = sum(c.nbytes for c in parts)
        print(f"corpus: {len(files)} files, {nbytes / 1e6:.1f} MB; {os.cpu_count()} CPUs")
        results: dict[tuple[str, int], float] = {}
        start, _ = vna_store(root / "vna-start", parts[0].files[0], 1)
        print(f"vna store of one file (process start-up, imports, archive open): {start:.2f} s; "
              f"the figures below are net of it")
        for j in jobs:
            s, n = vna_store(root / f"vna-{j}", corpus, j)
            s = max(s - start, 1e-3)
            results[("vna", j)] = s
            print(f"vna store --jobs {j:<3d} {s:7.2f} s  {len(files) / s:7.1f} files/s  {nbytes / 1e6 / s:6.1f} MB/s"
                  f"  ({n} instances indexed)")
            if not args.no_orthanc:
                work = root / f"orthanc-{j}"
                work.mkdir()
                s, n = orthanc_import(work, files, j)
                results[("orthanc", j)] = s
                print(f"orthanc POST x{j:<5d} {s:7.2f} s  {len(files) / s:7.1f} files/s  "
                      f"{nbytes / 1e6 / s:6.1f} MB/s  ({n} instances stored)")
        one = results[("vna", jobs[0])]
        for j in jobs[1:]:
            print(f"vna --jobs {j} vs --jobs {jobs[0]}: {one / results[('vna', j)]:.2f}x")
        if not args.no_orthanc:
            for j in jobs:
                print(f"vna/orthanc at {j} jobs: {results[('orthanc', j)] / results[('vna', j)]:.2f}x (throughput)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
