"""What each receiver makes durable before it answers a C-STORE: sync calls per instance.

Throughput figures compare receivers that promise different things. This
benchmark counts, per instance stored, the calls that force data to the disk
(``fsync``, ``fdatasync``, ``syncfs``, ``sync_file_range``) each receiver makes,
sorted by what they sync: the stored file's data, a directory (a new name),
the index (SQLite database, WAL or journal), the audit log, anything else.

For each receiver a fresh server on fresh storage is warmed up, then ``strace
-f`` is attached to its processes while the corpus is sent on one association,
and detached. Nothing is timed (strace slows every system call); run
``benchmarks/ingest.py`` for throughput. Needs ``strace``.

    .venv/bin/python -m benchmarks.durability [--small 200] [--ct 0] [--receivers vna,orthanc]
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.ingest import RECEIVERS, make_corpus, names_arg, port_free, send, start, stop_process

SYNC_CALLS = ("fsync", "fdatasync", "syncfs", "sync_file_range")
KINDS = ("data", "directory", "index", "audit", "other")
# strace -f -y: "1234  fsync(7</path/to/file>) = 0", possibly "<unfinished ...>" / "resumed" pairs
_CALL = re.compile(r"\b(" + "|".join(SYNC_CALLS) + r")\((\d+)<([^>]*)>")


def classify(path: str) -> str:
    """Which of KINDS a synced path is (the path must still exist to be told a directory)."""
    name = os.path.basename(path.removesuffix(" (deleted)"))
    if "audit" in name:
        return "audit"
    if re.search(r"(\.db|\.sqlite\d?)(-wal|-journal|-shm)?$", name) or re.fullmatch(r"index(-wal|-journal)?", name):
        return "index"
    if os.path.isdir(path):
        return "directory"
    if "/" in path:
        return "data"
    return "other"  # sockets, pipes, anonymous files


def count_syncs(strace_output: str) -> collections.Counter[str]:
    """Sync calls in ``strace -f -y`` output, by kind (each call counted once, where it started)."""
    return collections.Counter(classify(m.group(3)) for m in _CALL.finditer(strace_output))


def traced_send(name: str, corpus_files: list[Path], corpus_dir: Path, warm: list[Path], warm_dir: Path,
                work: Path, args: argparse.Namespace) -> collections.Counter[str]:
    """Fresh receiver; warm-up; sync calls made while ``corpus_files`` are sent on one association."""
    rcv = start(name, work, args)
    trace = work / "strace.txt"
    try:
        send(rcv, warm, warm_dir, 1, args.send_timeout)
        tracer = subprocess.Popen(["strace", "-f", "-qq", "-y", "-e", "trace=" + ",".join(SYNC_CALLS),
                                   "-o", str(trace), "-p", str(rcv.proc.pid)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(args.attach_seconds)  # strace attaches to every thread before the send starts
        if tracer.poll() is not None:
            _, err = tracer.communicate()
            raise RuntimeError(f"strace failed: {err.decode(errors='replace')[-500:]}")
        send(rcv, corpus_files, corpus_dir, 1, args.send_timeout)
        time.sleep(0.2)
        tracer.send_signal(signal.SIGINT)
        tracer.wait(30)
        stored = rcv.count()
        if stored is not None and stored != len(warm) + len(corpus_files):
            raise RuntimeError(f"{name} stored {stored} of {len(warm) + len(corpus_files)}")
        return count_syncs(trace.read_text(errors="replace"))
    finally:
        stop_process(rcv.proc)


def table(rows: dict[tuple[str, str], collections.Counter[str]], sizes: dict[str, int]) -> str:
    """Sync calls per instance, by kind, for every (receiver, corpus)."""
    head = f"{'receiver':9s} {'corpus':6s} " + " ".join(f"{k:>9s}" for k in KINDS) + f" {'total':>7s}"
    lines = [head, "-" * len(head)]
    for (name, corpus), counts in rows.items():
        n = sizes[corpus]
        lines.append(f"{name:9s} {corpus:6s} " + " ".join(f"{counts[k] / n:9.2f}" for k in KINDS)
                     + f" {sum(counts.values()) / n:7.2f}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (ports and start-up as in benchmarks/ingest.py)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", type=int, default=200, help="small instances (64x64 8-bit); 0 to skip")
    ap.add_argument("--ct", type=int, default=0, help="CT instances (512x512 16-bit); 0 to skip")
    ap.add_argument("--per-study", type=int, default=100)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--receivers", type=names_arg(RECEIVERS, "receivers"), default=["vna", "orthanc", "storescp"])
    ap.add_argument("--port-base", type=int, default=11260)
    ap.add_argument("--vna-args", default="", help="extra args for 'vna serve' (shell-quoted string)")
    ap.add_argument("--vna-workers", type=int, default=None)
    ap.add_argument("--tmp-dir", type=Path, default=None)
    ap.add_argument("--start-timeout", type=float, default=60.0)
    ap.add_argument("--send-timeout", type=float, default=600.0)
    ap.add_argument("--attach-seconds", type=float, default=1.5, help="wait after starting strace")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Generate the corpora, trace every receiver, print the table."""
    args = parse_args(argv)
    for tool in ("strace", "storescu", "echoscu"):
        if not shutil.which(tool):
            print(f"missing tool: {tool}", file=sys.stderr)
            return 2
    if not all(port_free(args.port_base + i) for i in range(5)):
        print(f"ports {args.port_base}..{args.port_base + 4} not all free; choose another --port-base", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="vna-bench-durability-", dir=args.tmp_dir))
    try:
        corpora = [make_corpus(root / "corpus", kind, kind, n, args.per_study, args.seed)
                   for kind, n in (("ct", args.ct), ("small", args.small)) if n]
        warm = make_corpus(root / "corpus", "warmup", "small", 10, 10, args.seed + 1000)
        rows: dict[tuple[str, str], collections.Counter[str]] = {}
        for corpus in corpora:
            for name in args.receivers:
                work = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=root))
                rows[name, corpus.name] = traced_send(name, corpus.files, corpus.dir, warm.files, warm.dir,
                                                      work, args)
                print(f"  {name} {corpus.name}: {dict(rows[name, corpus.name])}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(table(rows, {c.name: len(c.files) for c in corpora}))
    print("\nsync calls (fsync, fdatasync, syncfs, sync_file_range) per instance while the corpus was sent on one "
          "association, by what they synced: the stored file's data, a directory (a new name), the index "
          "(SQLite database/WAL/journal), the audit log, other")
    return 0


if __name__ == "__main__":
    sys.exit(main())
