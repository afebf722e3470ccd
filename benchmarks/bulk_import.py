"""Bulk import from files: ``vna store --jobs 1`` vs ``--jobs N``, and Orthanc's own way of importing files.

Same generated corpus, same machine, one run. Each vna run imports into a fresh data dir (SQLite index, 2
fsynced hot replicas, W=2: the defaults) and is timed from its first per-file line to its last (start-up and
the walk counting the files are left out, as Orthanc's start-up is). The peer is Orthanc 1.10 fed the same
files the way its ``ImportDicomFiles.py`` does (HTTP POST /instances of each file), from as many client
threads as vna's jobs, into fresh storage. Instances stored are counted on each side afterwards. A job count
given twice keeps its last figure.

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
from vna.bulk_import import default_jobs


def vna_store(data: Path, corpus: Path, jobs: int) -> tuple[float, int]:
    """One ``vna store --jobs`` run into ``data``: seconds from its first per-file line to its last (start-up,
    imports and the walk that counts the files are not in it), and the instances then indexed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VNA_")}
    cmd = [sys.executable, "-m", "vna.cli"]
    proc = subprocess.Popen([*cmd, "store", "--jobs", str(jobs), "--progress-every", "3600", "--data-dir",
                             str(data), str(corpus)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=env)
    assert proc.stdout is not None
    first = last = 0.0
    lines = 0
    for line in proc.stdout:
        if line.startswith(("stored ", "duplicate ")):
            last = time.perf_counter()
            first = first or last
            lines += 1
    if proc.wait() != 0:
        raise SystemExit(f"vna store failed ({proc.returncode})")
    stats = subprocess.run([*cmd, "index", "stats", "--json", "--data-dir", str(data)], capture_output=True,
                           text=True, env=env, timeout=120)
    # the first file's time is not measured: scale the interval to every file
    seconds = (last - first) * lines / max(lines - 1, 1)
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
    ap.add_argument("--jobs", default=f"1,{default_jobs()}", help="comma-separated job counts")
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
        for j in jobs:
            s, n = vna_store(root / f"vna-{len(results)}", corpus, j)
            results[("vna", j)] = s
            print(f"vna store --jobs {j:<3d} {s:7.2f} s  {len(files) / s:7.1f} files/s  {nbytes / 1e6 / s:6.1f} MB/s"
                  f"  ({n} instances indexed)")
            if not args.no_orthanc:
                work = root / f"orthanc-{len(results)}"
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
