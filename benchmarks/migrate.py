"""Migration throughput and enumeration speed (a benchmark, not a test).

1. The same studies moved out of one Orthanc 1.10 (the legacy PACS): by ``vna migrate
   plan`` + ``vna migrate run`` into vna (C-MOVE to vna's port, verification of every
   study included), and by C-MOVE into a second Orthanc (same pynetdicom C-MOVE client,
   same number of parallel associations, each kept for study after study, no verification).
   Same corpus, same run.
2. Enumeration of a source that caps C-FIND answers (a pynetdicom C-FIND SCP answering at
   most ``--cap`` studies, then 0xA700) holding ``--enum-studies`` studies.

    .venv/bin/python -m benchmarks.migrate [--studies 20] [--per-study 10] [--enum-studies 10000]
        [--skip-enumeration] [--py-spy PATH --profile-dir DIR]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

from benchmarks.corpus import write_corpus
from benchmarks.ingest import nodelay_env, wait_until

HOST = "127.0.0.1"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def start_orthanc(work: Path, aet: str, modalities: dict[str, list[Any]]) -> tuple[subprocess.Popen[bytes], int, int]:
    """An Orthanc with its own storage; (process, DICOM port, HTTP port)."""
    port, http = free_port(), free_port()
    work.mkdir(parents=True)
    cfg = {"Name": aet, "StorageDirectory": str(work / "storage"), "IndexDirectory": str(work / "index"),
           "DicomAet": aet, "DicomPort": port, "HttpPort": http, "DicomCheckCalledAet": False,
           "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "Plugins": [],
           "DicomAlwaysAllowFind": True, "DicomAlwaysAllowMove": True, "DicomAlwaysAllowStore": True,
           "DicomModalities": modalities}
    (work / "orthanc.json").write_text(json.dumps(cfg))
    exe = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
    log = work / "orthanc.log"
    proc = subprocess.Popen([exe, str(work / "orthanc.json")], stdout=subprocess.DEVNULL, stderr=log.open("wb"),
                            env=nodelay_env(), cwd=work)

    def ready() -> bool:
        try:
            with urllib.request.urlopen(f"http://{HOST}:{http}/system", timeout=2):
                return True
        except OSError:
            return False

    wait_until(ready, 60, aet, proc, log)
    return proc, port, http


def _listening(port: int) -> bool:
    import socket

    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def orthanc_count(http: int) -> int:
    with urllib.request.urlopen(f"http://{HOST}:{http}/statistics", timeout=10) as r:
        return int(json.loads(r.read())["CountInstances"])


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def throughput(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Orthanc -> vna (vna migrate) and Orthanc -> Orthanc (C-MOVE), same studies."""
    from vna.config import MigrateSource
    from vna.migrate.source import DimseSource

    files = write_corpus(work / "corpus", args.kind, studies=args.studies, per_study=args.per_study, seed=5)
    size = sum(f.stat().st_size for f in files)
    vna_port = free_port()
    src_proc, src_port, src_http = start_orthanc(work / "pacs", "PACS", {})
    procs = [src_proc]
    try:
        dst_proc, dst_port, dst_http = start_orthanc(work / "dest", "DEST", {})
        procs.append(dst_proc)
        stop(src_proc)   # restart the source knowing both destinations
        procs.remove(src_proc)
        shutil.rmtree(work / "pacs")
        src_proc, src_port, src_http = start_orthanc(work / "pacs", "PACS", {
            "vna": ["VNA", HOST, vna_port], "dest": ["DEST", HOST, dst_port]})
        procs.append(src_proc)
        subprocess.run(["storescu", "-aec", "PACS", HOST, str(src_port), *map(str, files)], check=True,
                       env=nodelay_env(), capture_output=True)
        assert orthanc_count(src_http) == len(files)

        conf = work / "vna.toml"
        conf.write_text(f'[[migrate.source]]\nae_title = "PACS"\nhost = "{HOST}"\nport = {src_port}\n'
                        f"max_associations = {args.associations}\n")
        data, log = work / "vna-data", work / "vna.log"
        vna = [sys.executable, "-m", "vna.cli"]
        common = ["--config", str(conf), "--data-dir", str(data)]
        serve = subprocess.Popen([*vna, "serve", *common, "--dicom-port", str(vna_port), "--ae-title", "VNA",
                                  "--host", HOST], stdout=subprocess.DEVNULL, stderr=log.open("wb"),
                                 env=nodelay_env({"VNA_WEB_PORT": "0"}))  # DICOMweb off: no fixed port
        procs.append(serve)
        wait_until(lambda: "vna ready" in log.read_text(errors="replace"), 60, "vna", serve, log)
        t0 = time.perf_counter()
        subprocess.run([*vna, "migrate", "plan", "--source", "PACS", *common], check=True, capture_output=True)
        t_plan = time.perf_counter() - t0
        run = [*vna, "migrate", "run", *common, "--json"]
        spies: list[subprocess.Popen[bytes]] = []
        if args.py_spy:   # sample both processes (collapsed stacks, all threads, native frames off)
            prof = Path(args.profile_dir)
            prof.mkdir(parents=True, exist_ok=True)
            spies.append(subprocess.Popen([args.py_spy, "record", "-f", "raw", "-r", "200", "-o",
                                           str(prof / "serve.txt"), "--pid", str(serve.pid)],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            run = [args.py_spy, "record", "-f", "raw", "-r", "200", "-o", str(prof / "run.txt"), "--", *run]
        r = subprocess.run(run, capture_output=True, text=True)
        t_vna = time.perf_counter() - t0
        for spy in spies:
            spy.send_signal(2)
            spy.wait(30)
        # the report is the first JSON object (py-spy prints its summary after it)
        report = json.JSONDecoder().raw_decode(r.stdout[r.stdout.find("{"):])[0]
        assert r.returncode == 0 and report["done"] == args.studies, r.stderr[-2000:]

        studies = sorted({d["study_uid"] for d in report["details"]})
        mover = DimseSource(MigrateSource("PACS", HOST, src_port, timeout=120), "BENCH")
        t0 = time.perf_counter()
        todo, results, lock = iter(studies), [], threading.Lock()

        def mover_thread() -> None:   # as vna's workers: one kept association per thread, study after study
            try:
                while True:
                    with lock:
                        uid = next(todo, None)
                    if uid is None:
                        return
                    results.append(mover.move("DEST", uid))
            finally:
                mover.close()

        with ThreadPoolExecutor(args.associations) as pool:
            for f in [pool.submit(mover_thread) for _ in range(args.associations)]:
                f.result()
        t_orthanc = time.perf_counter() - t0
        assert all(x.status == 0 for x in results) and orthanc_count(dst_http) == len(files)
    finally:
        for p in procs:
            stop(p)
    n = len(files)
    return {"instances": n, "bytes": size, "associations": args.associations,
            "vna_seconds": round(t_vna, 2), "vna_plan_seconds": round(t_plan, 2),
            "vna_run_seconds": round(t_vna - t_plan, 2),
            "vna_instances_per_second": round(n / t_vna, 1),
            "orthanc_to_orthanc_seconds": round(t_orthanc, 2),
            "orthanc_instances_per_second": round(n / t_orthanc, 1),
            "ratio_vna_over_orthanc": round(t_orthanc / t_vna, 2)}


def enumeration(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Plan a capped source of ``--enum-studies`` studies over ten years."""
    from pydicom.dataset import Dataset
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]

    from vna.config import MigrateSource
    from vna.migrate.ledger import SqliteLedger
    from vna.migrate.runner import plan_source
    from vna.migrate.source import DimseSource

    base = dt.date(2010, 1, 1)
    studies = sorted(((base + dt.timedelta(days=(i * 7919) % 3650)).strftime("%Y%m%d"), f"1.2.826.0.1.77.{i}")
                     for i in range(args.enum_studies))

    def handler(event: Any) -> Iterator[tuple[int, Dataset | None]]:
        match = str(event.identifier.get("StudyDate", "") or "")
        lo, _, hi = match.partition("-") if "-" in match else (match, "", match)
        n = 0
        for date, uid in studies:
            if (lo and date < lo) or (hi and date > hi):
                continue
            if n >= args.cap:
                yield 0xA700, None
                return
            ds = Dataset()
            ds.QueryRetrieveLevel = "STUDY"
            ds.StudyInstanceUID = uid
            ds.StudyDate = date
            ds.NumberOfStudyRelatedSeries = 1
            ds.NumberOfStudyRelatedInstances = 10
            n += 1
            yield 0xFF00, ds
        yield 0x0000, None

    port = free_port()

    def serve() -> None:   # in its own process, Nagle off, as the real sources (DCMTK, Orthanc) are run here
        from vna.dicom.commitment import nodelay

        ae = AE(ae_title="CAPPED")
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
        ae.start_server((HOST, port), block=True,
                        evt_handlers=[(evt.EVT_C_FIND, handler), (evt.EVT_CONN_OPEN, nodelay)])

    server = multiprocessing.get_context("fork").Process(target=serve, daemon=True)
    server.start()
    wait_until(lambda: _listening(port), 30, "capped C-FIND SCP")
    try:
        ledger = SqliteLedger(work / "enum.sqlite")
        ledger.migrate()
        source = DimseSource(MigrateSource("CAPPED", HOST, port, timeout=60), "VNA")
        t0 = time.perf_counter()
        found, _ = plan_source(ledger, source, dt.date(2000, 1, 1), dt.date(2025, 12, 31))
        took = time.perf_counter() - t0
        ledger.close()
    finally:
        server.terminate()
        server.join(10)
    assert found == args.enum_studies, found
    return {"studies": found, "cap": args.cap, "queries": source.find_queries, "seconds": round(took, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", type=int, default=20)
    ap.add_argument("--per-study", type=int, default=10)
    ap.add_argument("--kind", default="ct")
    ap.add_argument("--associations", type=int, default=2)
    ap.add_argument("--enum-studies", type=int, default=10_000)
    ap.add_argument("--cap", type=int, default=100)
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--skip-enumeration", action="store_true")
    ap.add_argument("--py-spy", default="", help="py-spy executable: profile `migrate run` and the server")
    ap.add_argument("--profile-dir", default="migrate-profile", help="where --py-spy writes collapsed stacks")
    args = ap.parse_args()
    os.environ.setdefault("TCP_NODELAY", "1")
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="vna-bench-migrate-") as tmp:
        work = Path(tmp)
        if not args.skip_throughput:
            out["throughput"] = throughput(args, work)
            print(json.dumps(out["throughput"]), flush=True)
        if not args.skip_enumeration:
            out["enumeration"] = enumeration(args, work)
            print(json.dumps(out["enumeration"]), flush=True)


if __name__ == "__main__":
    main()
