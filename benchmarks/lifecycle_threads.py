"""CPU seconds of each thread of one in-process lifecycle run: which thread bounds the run's wall time.

Fills a fresh archive with the generated corpus (``vna store``), then runs the
lifecycle job in this process and prints the CPU each thread used: the main
thread, the encode pool (``cold.encode_workers``) and the claim thread. Unlike
wall time this hardly moves when other work shares the cores; on idle cores a
run cannot take less than max(total CPU / cores, busiest thread's CPU).

    .venv/bin/python -m benchmarks.lifecycle_threads [--ct 200] [--mr 200] [--codec dicom-px3] [--workers 0]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.corpus import write_corpus


def _thread_cpu(tid: int) -> float:
    fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ct", type=int, default=200)
    ap.add_argument("--mr", type=int, default=200)
    ap.add_argument("--codec", default="dicom-px3")
    ap.add_argument("--workers", type=int, default=0, help="cold.encode_workers (0: one per core)")
    args = ap.parse_args(argv)
    from vna.archive import Archive
    from vna.config import load_config
    from vna.lifecycle import migrator

    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        for kind, count in (("ct", args.ct), ("mr", args.mr)):
            if count:
                write_corpus(tmp / "corpus" / kind, kind, studies=max(1, count // 20), per_study=min(count, 20), seed=5)
        data = tmp / "data"
        settings = {"archive": {"data_dir": str(data), "min_copies": 1}, "hot": {"fsync": False},
                    "lifecycle": {"min_age_days": 0, "batch_limit": 100000},
                    "cold": {"codec": args.codec, "encode_workers": args.workers}}
        config = tmp / "vna.toml"
        config.write_text('[archive]\nmin_copies = 1\n[hot]\nfsync = false\n')
        subprocess.run([sys.executable, "-m", "vna.cli", "store", str(tmp / "corpus"), "--config", str(config),
                        "--data-dir", str(data)], check=True, capture_output=True)
        replica = sorted(p for p in (data / "hot").iterdir() if p.is_dir())[0]
        hot_mb = sum(p.stat().st_size for p in replica.rglob("*.dcm") if ".tmp" not in p.parts) / 1e6
        archive = Archive(load_config(env={}, overrides=settings))
        try:
            job = archive.migrator()
            tids = {"main": threading.get_native_id()}
            workers = job._encode_workers
            if workers > 1:  # the pools' threads, each named by the id it reports from inside
                barrier = threading.Barrier(workers)

                def native_id(_: int) -> int:
                    barrier.wait()
                    return threading.get_native_id()

                for i, tid in enumerate(migrator._encode_pool(workers).map(native_id, range(workers))):
                    tids[f"encode{i}"] = tid
                claim_pool = getattr(migrator, "_claim_pool", None)  # (none before the claim thread existed)
                if claim_pool is not None:
                    tids["claim"] = claim_pool().submit(threading.get_native_id).result()
            before = {name: _thread_cpu(tid) for name, tid in tids.items()}
            cpu0, t0 = time.process_time(), time.perf_counter()
            report = job.run_once()
            wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
            used = {name: _thread_cpu(tid) - before[name] for name, tid in tids.items()}
        finally:
            archive.close()
    print(f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; {args.codec}, encode_workers {args.workers}: "
          f"{report.done} studies, {hot_mb:.1f} MB in {wall:.2f} s ({hot_mb / wall:.1f} MB/s), CPU {cpu:.2f} s")
    print("thread CPU s: " + ", ".join(f"{name} {s:.2f}" for name, s in used.items()))
    bound = max(cpu / (os.cpu_count() or 1), max(used.values()))
    print(f"on idle cores the run takes at least {bound:.2f} s ({hot_mb / bound:.1f} MB/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
