"""Lifecycle migration throughput end to end through the CLI: read hot, compress, write the bundle,
read back and verify, purge — per cold codec and number of encode workers, same corpus.

For each (codec, workers) a fresh archive is filled with the same generated
corpus (``vna store``), then ``vna lifecycle run`` moves every study to the
cold directory. Printed: hot MB moved, wall seconds, MB/s (wall), the CPU
seconds of the ``lifecycle run`` process and the cores it kept busy
(CPU / wall), the stored ratio, and the wall seconds of a second run that
finds nothing to move (process start-up and selection: the fixed cost inside
the first figure). ``--workers 1,0``: 1 = serial, 0 = one encode thread per
core (``cold.encode_workers``).

Then, per codec, the codec alone on the same files in this process (the
yardstick of issue 23: a lifecycle run should reach 0.8 x compress speed x
cores): encode on one thread and on one thread per core, MB/s and cores busy.

    .venv/bin/python -m benchmarks.lifecycle [--ct 60] [--mr 60] [--codecs dicom-px1,dicom-px3] [--workers 1,0]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.corpus import write_corpus

VNA = [sys.executable, "-m", "vna.cli"]


def _child_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_one(corpus: Path, codec: str, workers: int, tmp: Path) -> dict[str, float]:
    data = tmp / f"data-{codec}-{workers}"
    config = tmp / f"vna-{codec}-{workers}.toml"
    config.write_text(f'[archive]\nmin_copies = 1\n[hot]\nfsync = false\n[lifecycle]\nmin_age_days = 0\n'
                      f'batch_limit = 100000\n[cold]\ncodec = "{codec}"\nencode_workers = {workers}\n')
    base = [*VNA]
    common = ["--config", str(config), "--data-dir", str(data)]
    subprocess.run([*base, "store", str(corpus), *common], check=True, capture_output=True)
    replica = sorted(p for p in (data / "hot").iterdir() if p.is_dir())[0]  # one replica: the content moved
    hot = sum(p.stat().st_size for p in replica.rglob("*.dcm") if ".tmp" not in p.parts)
    cpu0, t0 = _child_cpu(), time.perf_counter()
    out = subprocess.run([*base, "lifecycle", "run", "--json", *common], check=True, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - t0, _child_cpu() - cpu0
    report = json.loads(out.stdout)
    cold = sum(p.stat().st_size for p in (data / "cold").rglob("*.bundle"))
    t0 = time.perf_counter()
    again = subprocess.run([*base, "lifecycle", "run", "--json", *common], check=True, capture_output=True, text=True)
    idle = time.perf_counter() - t0
    if json.loads(again.stdout)["done"]:
        raise RuntimeError("the second lifecycle run found studies left to move")
    return {"hot_mb": hot / 1e6, "wall": wall, "cpu": cpu, "done": report["done"], "ratio": hot / cold if cold else 0,
            "idle": idle}


def codec_alone(corpus: Path, codec: str, threads: int) -> tuple[float, float]:
    """(MB/s, cores busy) of encoding every corpus file as a cold frame on ``threads`` threads."""
    from vna.storage.bundle import BundleWriter

    contents = [p.read_bytes() for p in sorted(corpus.rglob("*.dcm"))]
    writer = BundleWriter(9, codec=codec)  # cold.zstd_level's default
    with ThreadPoolExecutor(threads) as pool:
        cpu0, t0 = time.process_time(), time.perf_counter()
        list(pool.map(writer.encode, contents))
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return sum(map(len, contents)) / 1e6 / wall, cpu / wall


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ct", type=int, default=60, help="generated CT instances (512x512), in studies of 20")
    ap.add_argument("--mr", type=int, default=60, help="generated MR instances (256x256), in studies of 20")
    ap.add_argument("--codecs", default="dicom-px1,dicom-px3")
    ap.add_argument("--workers", default="1,0", help="cold.encode_workers values (0: one per core)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        corpus = tmp / "corpus"
        for kind, count in (("ct", args.ct), ("mr", args.mr)):
            if count:
                write_corpus(corpus / kind, kind, studies=max(1, count // 20), per_study=min(count, 20), seed=5)
        print(f"{os.cpu_count()} cores; lifecycle run of every study, fresh archive each line\n")
        print(f"{'codec':10s} {'workers':>7s} {'hot MB':>7s} {'wall s':>7s} {'MB/s':>6s} {'CPU s':>6s} "
              f"{'cores':>5s} {'ratio':>6s} {'idle s':>6s}")
        for codec in args.codecs.split(","):
            for w in (int(x) for x in args.workers.split(",")):
                r = run_one(corpus, codec, w, tmp)
                print(f"{codec:10s} {w:7d} {r['hot_mb']:7.1f} {r['wall']:7.2f} {r['hot_mb'] / r['wall']:6.1f} "
                      f"{r['cpu']:6.2f} {r['cpu'] / r['wall']:5.2f} {r['ratio']:6.2f} {r['idle']:6.2f}")
        cores = os.cpu_count() or 1
        print(f"\ncodec alone, same files, in process ({cores} cores)\n")
        print(f"{'codec':10s} {'1 thread MB/s':>13s} {'cores':>5s} {f'{cores} threads MB/s':>15s} {'cores':>5s}")
        for codec in args.codecs.split(","):
            one, one_busy = codec_alone(corpus, codec, 1)
            many, many_busy = codec_alone(corpus, codec, cores)
            print(f"{codec:10s} {one:13.1f} {one_busy:5.2f} {many:15.1f} {many_busy:5.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
