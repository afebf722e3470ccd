"""DICOMweb: vna vs Orthanc's DICOMweb plugin (Debian ``orthanc-dicomweb``), same corpus, same client, same run.

Figures: STOW-RS ingest (instances/s, MB/s), QIDO-RS latency (PatientID, name
wildcard, date range; median of ``--repeat``), WADO-RS of a CT study
(instances/s of the best of ``--wado-repeat`` rounds, MB/s), frames/s for a
viewer-like pattern (frame 1 of every instance, ``--threads`` requests at
once), and for STOW-RS and WADO-RS the server's CPU per instance (user +
system of its process group: on a loaded machine a steadier comparison than
rates). Ratios are vna / Orthanc for rates and Orthanc / vna for latencies and
CPU: above 1, vna is ahead.

    .venv/bin/python -m benchmarks.dicomweb [--ct 100] [--studies 100] [--repeat 30] [--threads 4]

Each server gets its own fresh storage; both run on loopback with their
defaults (Orthanc: SQLite index, no compression), at the same time, taking
turns figure by figure (STOW-RS request by request, WADO-RS round by round,
alternating who goes first), after a warm-up request each.
The machine may be shared: compare ratios, not absolutes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import requests
from pydicom import dcmread

from benchmarks.corpus import write_corpus
from benchmarks.ingest import stop_process, wait_until
from benchmarks.servers import free_port, group_cpu_seconds

HOST = "127.0.0.1"
PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
DICOM_ACCEPT = 'multipart/related; type="application/dicom"'
FRAME_ACCEPT = 'multipart/related; type="application/octet-stream"'


@dataclass
class Server:
    name: str
    base: str                       # the DICOMweb root, no trailing slash
    proc: subprocess.Popen[bytes]


def start_vna(work: Path, timeout: float) -> Server:
    """``vna serve`` (this checkout) with DICOMweb on a free port; ready on the "vna ready" log line."""
    data, log = work / "vna-data", work / "vna.log"
    port = free_port()
    env = {**os.environ, "VNA_WEB_PORT": str(port), "VNA_WEB_MAX_BODY_BYTES": str(16 * 1024 ** 3)}
    cmd = [sys.executable, "-m", "vna.cli", "serve", "--data-dir", str(data), "--dicom-port", str(free_port()),
           "--host", HOST]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log.open("wb"), env=env, start_new_session=True)
    wait_until(lambda: "vna ready" in log.read_text(errors="replace"), timeout, "vna", proc, log)
    return Server("vna", f"http://{HOST}:{port}/dicomweb", proc)


def start_orthanc(work: Path, timeout: float) -> Server:
    """Orthanc with the DICOMweb plugin at /dicom-web; ready when /system answers."""
    http_port = free_port()
    cfg = {
        "Name": "bench-orthanc", "StorageDirectory": str(work / "storage"), "IndexDirectory": str(work / "index"),
        "DicomAet": "ORTHANC", "DicomPort": free_port(), "HttpPort": http_port, "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False, "Plugins": [PLUGIN],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    conf = work / "orthanc.json"
    conf.write_text(json.dumps(cfg, indent=2))
    log = work / "orthanc.log"
    exe = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
    proc = subprocess.Popen([exe, str(conf)], stdout=subprocess.DEVNULL, stderr=log.open("wb"),
                            start_new_session=True, cwd=work)

    def ready() -> bool:
        try:
            with urllib.request.urlopen(f"http://{HOST}:{http_port}/system", timeout=5):
                return True
        except OSError:
            return False

    wait_until(ready, timeout, "Orthanc", proc, log)
    return Server("Orthanc", f"http://{HOST}:{http_port}/dicom-web", proc)


def stow(srv: Server, files: list[Path], batch: int) -> float:
    """POST the files, ``batch`` per request; seconds taken. Raises if any part is refused."""
    t0 = time.perf_counter()
    session = requests.Session()
    for i in range(0, len(files), batch):
        boundary = "bench-boundary-0123456789"
        chunks: list[bytes] = []
        for f in files[i:i + batch]:
            chunks += [f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode(), f.read_bytes(), b"\r\n"]
        chunks.append(f"--{boundary}--\r\n".encode())
        r = session.post(f"{srv.base}/studies", data=b"".join(chunks), timeout=600,
                         headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
                                  "Accept": "application/dicom+json"})
        if r.status_code != 200:
            raise RuntimeError(f"{srv.name} STOW-RS answered {r.status_code}: {r.text[:300]}")
    return time.perf_counter() - t0


def latency(srv: Server, path: str, repeat: int) -> tuple[float, int]:
    """Median seconds of ``GET base+path`` (the path sent as written: a literal ``*``), and the match count."""
    session = requests.Session()
    times, count = [], -1
    for _ in range(repeat):
        t0 = time.perf_counter()
        r = session.get(srv.base + path, headers={"Accept": "application/dicom+json"}, timeout=60)
        times.append(time.perf_counter() - t0)
        if r.status_code not in (200, 204):
            raise RuntimeError(f"{srv.name} QIDO {path} answered {r.status_code}")
        count = len(r.json()) if r.status_code == 200 and r.content.strip() else 0
    return statistics.median(times), count


def wado_study(srv: Server, study: str, repeat: int) -> tuple[float, int]:
    """Best seconds to read the whole multipart answer of a study retrieve, and its bytes."""
    best, size = float("inf"), 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        r = requests.get(f"{srv.base}/studies/{study}", headers={"Accept": DICOM_ACCEPT}, timeout=600, stream=True)
        size = sum(len(c) for c in r.iter_content(1 << 20))
        best = min(best, time.perf_counter() - t0)
        if r.status_code != 200:
            raise RuntimeError(f"{srv.name} WADO-RS answered {r.status_code}")
    return best, size


def frames(srv: Server, urls: list[str], threads: int) -> float:
    """Seconds to fetch frame 1 of every instance, ``threads`` requests in flight (a viewer's prefetch)."""
    session = requests.Session()
    adapter = requests.adapters.HTTPAdapter(pool_connections=threads, pool_maxsize=threads)
    session.mount("http://", adapter)

    def one(url: str) -> int:
        r = session.get(f"{srv.base}{url}/frames/1", headers={"Accept": FRAME_ACCEPT}, timeout=60)
        if r.status_code != 200:
            raise RuntimeError(f"{srv.name} frames answered {r.status_code}")
        return len(r.content)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, urls))
    return time.perf_counter() - t0


def run(servers: list[Server], ct: list[Path], small: list[Path], args: argparse.Namespace,
        queries: dict[str, str]) -> dict[str, dict[str, float]]:
    """Every figure of every server, the servers taking turns figure by figure (and round by round for
    WADO-RS) so that a machine whose load changes meanwhile weighs on both alike."""
    out: dict[str, dict[str, float]] = {srv.name: {} for srv in servers}
    ct_bytes = sum(f.stat().st_size for f in ct)
    for label, files in (("CT", ct), ("small", small)):
        secs = {srv.name: 0.0 for srv in servers}
        cpu = {srv.name: 0.0 for srv in servers}
        for n, i in enumerate(range(0, len(files), args.batch)):   # request by request, taking turns
            for srv in servers if n % 2 == 0 else servers[::-1]:
                u0, s0 = group_cpu_seconds(srv.proc.pid)
                secs[srv.name] += stow(srv, files[i:i + args.batch], args.batch)
                u1, s1 = group_cpu_seconds(srv.proc.pid)
                cpu[srv.name] += (u1 - u0) + (s1 - s0)
        for srv in servers:
            o = out[srv.name]
            o[f"STOW-RS {label} server CPU ms/inst"] = cpu[srv.name] * 1e3 / len(files)
            o[f"STOW-RS {label} instances/s"] = len(files) / secs[srv.name]
            if label == "CT":
                o["STOW-RS CT MB/s"] = ct_bytes / secs[srv.name] / 1e6
    for name, path in queries.items():
        for srv in servers:
            q_secs, n = latency(srv, path, args.repeat)
            out[srv.name][f"QIDO {name} ms"] = q_secs * 1e3
            out[srv.name][f"QIDO {name} matches"] = n
    study = str(dcmread(ct[0], stop_before_pixels=True).StudyInstanceUID)
    best = {srv.name: float("inf") for srv in servers}
    cpu = {srv.name: 0.0 for srv in servers}
    size = 0
    for r in range(args.wado_repeat):
        for srv in servers if r % 2 == 0 else servers[::-1]:
            u0, s0 = group_cpu_seconds(srv.proc.pid)
            w_secs, size = wado_study(srv, study, 1)
            u1, s1 = group_cpu_seconds(srv.proc.pid)
            best[srv.name] = min(best[srv.name], w_secs)
            cpu[srv.name] += (u1 - u0) + (s1 - s0)
    for srv in servers:
        o = out[srv.name]
        o["WADO-RS CT server CPU ms/inst"] = cpu[srv.name] * 1e3 / (len(ct) * args.wado_repeat)
        o["WADO-RS CT study instances/s"] = len(ct) / best[srv.name]
        o["WADO-RS CT study MB/s"] = size / best[srv.name] / 1e6
    urls = []
    for f in ct:
        ds = dcmread(f, stop_before_pixels=True)
        urls.append(f"/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}")
    for srv in servers:
        out[srv.name]["frames/s (frame 1 of each, x threads)"] = len(urls) / frames(srv, urls, args.threads)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ct", type=int, default=100, help="instances of the CT study (512x512x16)")
    ap.add_argument("--studies", type=int, default=100, help="small studies (2 instances each) for QIDO")
    ap.add_argument("--repeat", type=int, default=30, help="QIDO requests per query (median)")
    ap.add_argument("--threads", type=int, default=4, help="frame requests in flight")
    ap.add_argument("--batch", type=int, default=10, help="instances per STOW-RS request")
    ap.add_argument("--wado-repeat", type=int, default=5, help="study retrieves (best time; CPU over all of them)")
    ap.add_argument("--only", choices=["vna", "orthanc"], default=None)
    ap.add_argument("--timeout", type=float, default=120)
    args = ap.parse_args(argv)
    if args.only != "vna" and not Path(PLUGIN).exists():
        print(f"Orthanc's DICOMweb plugin is missing ({PLUGIN}): apt-get install orthanc orthanc-dicomweb",
              file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="vna-bench-dicomweb-"))
    try:
        ct = write_corpus(root / "corpus-ct", "ct", studies=1, per_study=args.ct, seed=11)
        small = write_corpus(root / "corpus-small", "small", studies=args.studies, per_study=2, seed=12)
        warm = write_corpus(root / "corpus-warm", "small", studies=1, per_study=2, seed=13)
        probe = dcmread(small[len(small) // 2], stop_before_pixels=True)
        queries = {
            "PatientID": f"/studies?PatientID={probe.PatientID}",
            "name wildcard": f"/studies?PatientName=*{str(probe.PatientName).split('^')[-1][:-1]}*",
            "date range": "/studies?StudyDate=20180101-20201231",
        }
        starters: dict[str, Callable[[Path, float], Server]] = {"vna": start_vna, "orthanc": start_orthanc}
        servers: list[Server] = []
        try:
            for key, start in starters.items():   # both run at once: they take turns figure by figure
                if args.only and args.only != key:
                    continue
                work = root / key
                work.mkdir()
                servers.append(start(work, args.timeout))
            for srv in servers:   # first requests (imports, caches, first directories) are not measured
                stow(srv, warm, 1)
            results = run(servers, ct, small, args, queries)
        finally:
            for srv in servers:
                stop_process(srv.proc)
        print(f"DICOMweb benchmark: CT study {args.ct} x 512 KiB, {args.studies} small studies, "
              f"{args.repeat} QIDO repeats, {args.threads} frame requests in flight")
        names = list(results)
        print(f"{'figure':44s}" + "".join(f"{n:>12s}" for n in names) + ("   ratio (>1: vna ahead)" if len(names) == 2
                                                                         else ""))
        for fig in results[names[0]]:
            vals = [results[n][fig] for n in names]
            line = f"{fig:44s}" + "".join(f"{v:12.1f}" for v in vals)
            if len(vals) == 2 and "matches" not in fig and min(vals) > 0:
                ratio = vals[1] / vals[0] if fig.endswith((" ms", "ms/inst")) else vals[0] / vals[1]
                line += f"   x{ratio:.2f}"
            print(line)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
