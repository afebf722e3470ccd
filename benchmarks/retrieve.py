"""C-GET and C-MOVE of a study: vna vs Orthanc 1.10.

Same studies, same clients (DCMTK ``getscu --ignore`` and ``movescu`` to a DCMTK
``storescp --ignore`` destination, TCP_NODELAY=1), same machine, one run. Each
server is started once on fresh storage and loaded with ``storescu``; then every
(study, operation) is retrieved ``--repeat`` times, the servers interleaved, each
timed from the start of the client process until it exits. A retrieve is
complete when the client exits 0 and the final response reports every instance
completed and none failed; the exit code is 1 if any retrieve is incomplete.
Then the latency of a C-ECHO (the floor) and of a STUDY-level C-FIND (``findscu``,
every study, each answer checked) is timed the same way, ``4 x --repeat`` times
per server, and printed with Orthanc/vna.

    .venv/bin/python -m benchmarks.retrieve [--ct 100] [--small 500] [--repeat 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pydicom import dcmread

from benchmarks.ingest import (HOST, Corpus, Receiver, make_corpus, names_arg, nodelay_env, port_free, send,
                               start_orthanc, start_vna, stop_process, wait_until)
from benchmarks.servers import fs_type, group_cpu_seconds

CLIENT_AET = "BENCHSCU"
DEST_AET = "DEST"
SERVERS = ("vna", "vna-python", "orthanc")
OPS = ("get", "move")
NOTES = {
    "vna": "vna serve defaults (SQLite index, 2 fsynced hot replicas, audit on) + Prometheus telemetry, "
           "the native receiver",
    "vna-python": "the same with dicom.receiver = \"python\" (plain pynetdicom, the reference)",
    "orthanc": "Orthanc 1.10 defaults, DicomAlwaysAllowGet/Move/Find, the destination in DicomModalities",
}
_COUNT = re.compile(r"(Remaining|Completed|Failed|Warning) Suboperations\s*:\s*(\d+)")
_GET_STATUS = re.compile(r"Received C-GET Response \(([^)]*)\)")
_DIMSE_STATUS = re.compile(r"DIMSE Status\s*:\s*(0x[0-9a-fA-F]{4})")


@dataclass
class Final:
    """The counts and status of a retrieve's last response, as the DCMTK client printed them."""

    status: str | None
    remaining: int | None = None
    completed: int | None = None
    failed: int | None = None
    warning: int | None = None


def parse_final(output: str) -> Final:
    """The final response's status and sub-operation counts from ``getscu -v`` or ``movescu -d`` output
    (status None without a final response; a count None when that response has none)."""
    at = max(output.rfind("Received Final Move Response"), output.rfind("Final status report from last C-GET"))
    if at < 0:
        return Final(None)
    tail = output[at:]
    counts = {name.lower(): int(value) for name, value in _COUNT.findall(tail)}
    statuses = _GET_STATUS.findall(output) if "C-GET" in tail[:60] else _DIMSE_STATUS.findall(tail)
    return Final(statuses[-1] if statuses else None, **counts)


def incomplete(output: str, returncode: int, expected: int) -> str | None:
    """Why a retrieve of ``expected`` instances is incomplete, or None when it is complete: the client exited
    0 and its final response is Success with ``expected`` sub-operations completed, none failed or pending."""
    if returncode != 0:
        return f"client exit {returncode}"
    f = parse_final(output)
    if f.status not in ("Success", "0x0000"):
        return f"final status {f.status}"
    if f.completed != expected or f.failed or f.warning or f.remaining:
        return (f"completed {f.completed} of {expected} (failed {f.failed}, warning {f.warning}, "
                f"remaining {f.remaining})")
    return None


def retrieve_cmd(op: str, srv: Receiver, study_uid: str) -> list[str]:
    """The DCMTK client command of one C-GET (``getscu --ignore``) or C-MOVE (``movescu`` to DEST) of a study."""
    keys = ["-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}"]
    common = ["-aet", CLIENT_AET, "-aec", srv.aet, "-to", "60", "-ta", "60", "-td", "300"]
    if op == "get":
        return ["getscu", "-v", "-S", "--ignore", *common, *keys, HOST, str(srv.port)]
    return ["movescu", "-d", "-S", *common, "-aem", DEST_AET, *keys, HOST, str(srv.port)]


def start_destination(work: Path, port: int, timeout: float) -> subprocess.Popen[bytes]:
    """DCMTK storescp (AE DEST) accepting every transfer syntax, receiving without storing."""
    log = work / "storescp.log"
    proc = subprocess.Popen(["storescp", "--ignore", "+xa", "-aet", DEST_AET, str(port)],
                            stdout=log.open("wb"), stderr=subprocess.STDOUT, env=nodelay_env(),
                            start_new_session=True, cwd=work)

    def ready() -> bool:
        r = subprocess.run(["echoscu", "-aet", CLIENT_AET, "-aec", DEST_AET, HOST, str(port)],
                           capture_output=True, env=nodelay_env(), timeout=10)
        return r.returncode == 0

    wait_until(ready, timeout, "storescp", proc, log)
    return proc


def start_server(name: str, work: Path, args: argparse.Namespace) -> Receiver:
    """Server ``name`` on fresh storage under ``work``, with DEST as a C-MOVE destination."""
    base, dest = args.port_base, args.port_base + 3
    if name == "orthanc":
        return start_orthanc(work, base + 1, base + 2, args.start_timeout, extra={
            "DicomAlwaysAllowGet": True, "DicomAlwaysAllowMove": True, "DicomAlwaysAllowFind": True,
            "DicomModalities": {DEST_AET: [DEST_AET, HOST, dest]}})
    python = name == "vna-python"
    conf = work / "vna.toml"
    conf.write_text(f'[web]\nport = 0\n'
                    f'[telemetry]\nenabled = true\nprometheus_port = {base + (7 if python else 6)}\n'
                    f'[[dicom.remote]]\nae_title = "{DEST_AET}"\nhost = "{HOST}"\nport = {dest}\n')
    return start_vna(work, base + (5 if python else 0), ["--config", str(conf), *shlex.split(args.vna_args)],
                     None, args.start_timeout, "python" if python else None)


def retrieve(op: str, srv: Receiver, study_uid: str, expected: int, timeout: float) -> tuple[float, float, str | None]:
    """One timed retrieve: (seconds, server CPU seconds, why incomplete or None)."""
    cmd = retrieve_cmd(op, srv, study_uid)
    u0, s0 = group_cpu_seconds(srv.proc.pid)
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, env=nodelay_env(), timeout=timeout)
        out, code = r.stdout + r.stderr, r.returncode
    except subprocess.TimeoutExpired as exc:
        out, code = str(exc.stdout or ""), -1
    secs = time.perf_counter() - t0
    u1, s1 = group_cpu_seconds(srv.proc.pid)
    return secs, (u1 - u0) + (s1 - s0), incomplete(out, code, expected)


@dataclass
class Result:
    """One row of the table: a (server, study, operation) cell over the repeats."""

    server: str
    corpus: str
    op: str
    instances: int
    seconds: float
    inst_per_s: float
    mb_per_s: float
    cpu_ms_per_inst: float
    incomplete: list[str] = field(default_factory=list)
    runs: list[float] = field(default_factory=list)


def table(results: list[Result]) -> str:
    """Results with vna/orthanc per (study, operation) and native/python when both ran."""
    head = (f"{'server':10s} {'study':6s} {'op':4s} {'inst':>5s} {'seconds':>8s} {'inst/s':>8s} {'MB/s':>7s} "
            f"{'CPU ms':>7s}  {'vna/orthanc':>11s} {'native/python':>13s}")
    lines = [head, "-" * len(head)]
    by = {(r.server, r.corpus, r.op): r for r in results}
    for r in results:
        ratio = native = ""
        if r.server.startswith("vna") and (o := by.get(("orthanc", r.corpus, r.op))):
            ratio = f"{r.inst_per_s / o.inst_per_s:.2f}"
        if r.server == "vna" and (p := by.get(("vna-python", r.corpus, r.op))):
            native = f"{r.inst_per_s / p.inst_per_s:.2f}"
        mark = f"  INCOMPLETE x{len(r.incomplete)}" if r.incomplete else ""
        lines.append(f"{r.server:10s} {r.corpus:6s} {r.op:4s} {r.instances:5d} {r.seconds:8.3f} {r.inst_per_s:8.1f} "
                     f"{r.mb_per_s:7.1f} {r.cpu_ms_per_inst:7.2f}  {ratio:>11s} {native:>13s}{mark}")
    return "\n".join(lines)


def latency_cmds(srv: Receiver) -> dict[str, list[str]]:
    """The latency probes of a server: C-ECHO (the floor: process start, association, release) and a STUDY-level
    C-FIND of every study (``PatientID=*``, Study Root), each a DCMTK client process."""
    peer = ["-aet", CLIENT_AET, "-aec", srv.aet, HOST, str(srv.port)]
    return {"echo": ["echoscu", *peer],
            "find": ["findscu", "-v", "-S", "-k", "QueryRetrieveLevel=STUDY", "-k", "PatientID=*", "-k", "StudyInstanceUID",
                     *peer]}


def latency_table(latency: dict[str, dict[str, float]]) -> str:
    """Median milliseconds per probe and server, with Orthanc/vna for each (above 1: vna answers sooner)."""
    lines = [f"{'server':10s} {'echo ms':>8s} {'find ms':>8s}  {'orthanc/vna echo':>16s} {'orthanc/vna find':>16s}"]
    o = latency.get("orthanc")
    for name, lat in latency.items():
        ratios = ["", ""]
        if name.startswith("vna") and o is not None:
            ratios = [f"{o[k] / lat[k]:.2f}" for k in ("echo", "find")]
        lines.append(f"{name:10s} {lat['echo']:8.1f} {lat['find']:8.1f}  {ratios[0]:>16s} {ratios[1]:>16s}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ct", type=int, default=100, help="instances of the CT study (512x512 16-bit); 0 to skip")
    ap.add_argument("--small", type=int, default=500, help="instances of the small study (64x64 8-bit); 0 to skip")
    ap.add_argument("--ops", type=names_arg(OPS, "operations"), default=list(OPS), help="comma-separated get,move")
    ap.add_argument("--servers", type=names_arg(SERVERS, "servers"), default=["vna", "orthanc"],
                    help="comma-separated subset of vna,vna-python,orthanc (default vna,orthanc)")
    ap.add_argument("--repeat", type=int, default=5, help="timed retrieves per cell, median reported")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--port-base", type=int, default=11260,
                    help="vna=base, Orthanc DICOM=base+1 HTTP=base+2, storescp=base+3, vna-python=base+5, "
                         "vna metrics=base+6, vna-python metrics=base+7")
    ap.add_argument("--vna-args", default="", help="extra args for 'vna serve' (shell-quoted string)")
    ap.add_argument("--tmp-dir", type=Path, default=None, help="where studies and server storage go")
    ap.add_argument("--start-timeout", type=float, default=60.0)
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds for one retrieve or one load")
    ap.add_argument("--json", type=Path, default=None, help="write results as JSON here")
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    """Start the servers, load the studies, time every retrieve, print the table."""
    args = parse_args(argv)
    for tool in ("storescu", "getscu", "movescu", "storescp", "echoscu", "findscu"):
        if not shutil.which(tool):
            print(f"missing tool: {tool} (apt-get install dcmtk)", file=sys.stderr)
            return 2
    if "orthanc" in args.servers and not (shutil.which("Orthanc") or Path("/usr/sbin/Orthanc").exists()):
        print("missing tool: Orthanc (apt-get install orthanc)", file=sys.stderr)
        return 2
    ports = {"vna": [0, 6], "orthanc": [1, 2], "vna-python": [5, 7]}
    busy = [args.port_base + p for p in [3, *(p for s in args.servers for p in ports[s])]
            if not port_free(args.port_base + p)]
    if busy:
        print(f"ports already in use: {busy}; choose another --port-base", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="vna-bench-retrieve-", dir=args.tmp_dir))
    servers: dict[str, Receiver] = {}
    dest: subprocess.Popen[bytes] | None = None
    results: list[Result] = []
    try:
        print(f"generating studies in {root} ...", file=sys.stderr, flush=True)
        corpora: list[Corpus] = []
        for kind, count in (("ct", args.ct), ("small", args.small)):
            if count:
                corpora.append(make_corpus(root / "corpus", kind, kind, count, count, args.seed))
        study = {c.name: str(dcmread(c.files[0], stop_before_pixels=True).StudyInstanceUID) for c in corpora}
        dest = start_destination(root, args.port_base + 3, args.start_timeout)
        for name in args.servers:
            work = root / name
            work.mkdir()
            servers[name] = srv = start_server(name, work, args)
            for c in corpora:
                send(srv, c.files, c.dir, 1, args.timeout)
            stored = srv.count()
            if stored != sum(len(c.files) for c in corpora):
                raise RuntimeError(f"{name}: {stored} instances stored of {sum(len(c.files) for c in corpora)}")
            for c in corpora:   # one untimed retrieve each: lazy imports, caches
                for op in args.ops:
                    retrieve(op, srv, study[c.name], len(c.files), args.timeout)
        t0 = time.monotonic()
        load0 = os.getloadavg()
        for c in corpora:
            for op in args.ops:
                times: dict[str, list[float]] = {n: [] for n in args.servers}
                cpus: dict[str, list[float]] = {n: [] for n in args.servers}
                bad: dict[str, list[str]] = {n: [] for n in args.servers}
                for _ in range(args.repeat):
                    for name in args.servers:
                        secs, cpu, why = retrieve(op, servers[name], study[c.name], len(c.files), args.timeout)
                        times[name].append(secs)
                        cpus[name].append(cpu)
                        if why:
                            bad[name].append(why)
                        print(f"  {name:10s} {c.name:6s} {op:4s}: {len(c.files) / secs:8.1f} inst/s ({secs:.3f} s, "
                              f"server CPU {1e3 * cpu / len(c.files):.2f} ms/inst){' ' + why if why else ''}",
                              file=sys.stderr, flush=True)
                for name in args.servers:
                    secs, n = statistics.median(times[name]), len(c.files)
                    results.append(Result(name, c.name, op, n, secs, n / secs, c.nbytes / secs / 1e6,
                                          round(1e3 * statistics.median(cpus[name]) / n, 3), bad[name],
                                          [round(t, 4) for t in times[name]]))
        probes: dict[str, dict[str, list[float]]] = {n: {"echo": [], "find": []} for n in args.servers}
        for _ in range(args.repeat * 4):   # short probes: more samples, the servers interleaved
            for name in args.servers:
                for probe, cmd in latency_cmds(servers[name]).items():
                    p0 = time.perf_counter()
                    r = subprocess.run(cmd, capture_output=True, text=True, env=nodelay_env(), timeout=args.timeout)
                    probes[name][probe].append(1e3 * (time.perf_counter() - p0))
                    if r.returncode != 0 or (probe == "find" and "Find Response" not in r.stdout + r.stderr):
                        raise RuntimeError(f"{name}: {probe} failed (exit {r.returncode}): {r.stderr[-300:]}")
        latency = {n: {k: statistics.median(v) for k, v in p.items()} for n, p in probes.items()}
        total, load1 = time.monotonic() - t0, os.getloadavg()
    finally:
        for srv in servers.values():
            stop_process(srv.proc)
        if dest is not None:
            stop_process(dest)
        shutil.rmtree(root, ignore_errors=True)
    fs = fs_type(args.tmp_dir or Path(tempfile.gettempdir()))
    if args.json:
        args.json.write_text(json.dumps({
            "results": [asdict(r) for r in results],
            "latency_ms": latency,
            "settings": {"ct": args.ct, "small": args.small, "repeat": args.repeat, "ops": args.ops,
                         "vna_args": args.vna_args, "fs": fs, "cpus": os.cpu_count(),
                         "loadavg_before": load0, "loadavg_after": load1},
            "notes": NOTES,
        }, indent=2))
    print(table(results))
    print()
    print(latency_table(latency))
    print(f"\nclients: DCMTK getscu --ignore, movescu -> storescp --ignore, TCP_NODELAY=1, timed from process start "
          f"to exit; median of {args.repeat}, servers interleaved; storage fs: {fs}; cores: {os.cpu_count()}; "
          f"load average {load0[0]:.2f} before, {load1[0]:.2f} after; wall {total:.0f} s")
    for name in args.servers:
        print(f"  {name}: {NOTES[name]}" + (f" args={args.vna_args!r}" if name.startswith("vna") and args.vna_args
                                            else ""))
    return 1 if any(r.incomplete for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
