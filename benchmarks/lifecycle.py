"""Lifecycle migration throughput end to end through the CLI: read hot, compress, write the bundle,
read back and verify, purge — per cold codec and number of encode workers, same corpus.

For each (codec, workers) a fresh archive is filled with the same generated
corpus (``vna store``), then ``vna lifecycle run`` moves every study to the
cold directory. Printed: hot MB moved, wall seconds, MB/s (wall), the CPU
seconds of the ``lifecycle run`` process and the cores it kept busy
(CPU / wall), and the stored ratio. ``--workers 1,0``: 1 = serial, 0 = one
encode thread per core (``cold.encode_workers``).

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
    return {"hot_mb": hot / 1e6, "wall": wall, "cpu": cpu, "done": report["done"], "ratio": hot / cold if cold else 0}


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
              f"{'cores':>5s} {'ratio':>6s}")
        for codec in args.codecs.split(","):
            for w in (int(x) for x in args.workers.split(",")):
                r = run_one(corpus, codec, w, tmp)
                print(f"{codec:10s} {w:7d} {r['hot_mb']:7.1f} {r['wall']:7.2f} {r['hot_mb'] / r['wall']:6.1f} "
                      f"{r['cpu']:6.2f} {r['cpu'] / r['wall']:5.2f} {r['ratio']:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
