"""C-STORE ingest throughput: vna vs Orthanc 1.10 vs DCMTK storescp.

Same corpus, same client (DCMTK ``storescu``, TCP_NODELAY=1), same machine, one
run. For every (receiver, corpus, associations) run a fresh receiver process is
started on fresh storage, warmed up with a few distinct small instances, then
timed from the start of the ``storescu`` process(es) until all have exited.
Instances actually stored are counted on the receiver side.

    .venv/bin/python -m benchmarks.ingest [--ct 200] [--small 1000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from benchmarks.corpus import write_corpus
from benchmarks.servers import fs_type, group_cpu_seconds

HOST = "127.0.0.1"
CLIENT_AET = "BENCHSCU"
ARG_LIMIT = 100_000  # bytes of file arguments per storescu command (well below ARG_MAX)
RECEIVERS = ("vna", "vna-w2", "vna-python", "orthanc", "storescp")
NOTES = {
    "vna": "SQLite index, 2 fsynced hot replicas, W=2, the native receiver (the default)",
    "vna-w2": "the same with dicom.workers = 2 (two processes on the port, SO_REUSEPORT)",
    "vna-python": "vna with dicom.receiver = \"python\" (plain pynetdicom, the reference; same index, replicas and W)",
    "orthanc": "Orthanc 1.10 defaults: fdatasync of each file + MD5, SQLite index synced at checkpoints only",
    "storescp": "DCMTK storescp +B --fork: writes files, NO fsync, no index",
}


def nodelay_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for DCMTK tools and Orthanc: Nagle off (see notes/real-peers.md)."""
    env = dict(os.environ, TCP_NODELAY="1")
    env.update(extra or {})
    return env


def wait_until(pred: Callable[[], bool], timeout: float, what: str, proc: subprocess.Popen | None = None,
               log: Path | None = None) -> None:
    """Poll ``pred`` until true; raise with the log tail on timeout or early exit."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.05)
    tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
    raise RuntimeError(f"{what} not ready (exit={proc.poll() if proc else None})\n{tail}")


def port_free(port: int) -> bool:
    """True if nothing listens on HOST:port."""
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((HOST, port)) != 0


def _group_alive(pgid: int) -> bool:
    """True while any process of our child's process group exists."""
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def stop_process(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM our child by PID, wait for it and its process group (workers, forked children);
    SIGKILL the group (start_new_session=True: pgid == our child's PID) after ``grace`` seconds."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    deadline = time.monotonic() + (grace if proc.poll() is not None else 0)
    while _group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _group_alive(proc.pid):
        print(f"  ! pid {proc.pid}: still running (or its group) after SIGTERM + {grace:.0f} s; SIGKILL",
              file=sys.stderr)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


@dataclass
class Receiver:
    """A started receiver: how to address it and count what it stored."""

    name: str
    port: int
    aet: str
    proc: subprocess.Popen
    count: Callable[[], int | None]
    log: Path


def start_vna(work: Path, port: int, extra_args: list[str], workers: int | None, timeout: float,
              receiver: str | None = None) -> Receiver:
    """``vna serve`` on fresh storage; ready on the "vna ready" log line."""
    data, log = work / "vna-data", work / "vna.log"
    venv_bin = Path(sys.executable).parent
    vna = str(venv_bin / "vna") if (venv_bin / "vna").exists() else "vna"
    extra_env = {"VNA_DICOM_WORKERS": str(workers)} if workers else {}
    extra_env.setdefault("VNA_WEB_PORT", os.environ.get("VNA_WEB_PORT", "0"))   # DICOMweb off: no fixed port
    if receiver:
        extra_env["VNA_DICOM_RECEIVER"] = receiver
    env = nodelay_env(extra_env or None)
    cmd = [vna, "serve", "--data-dir", str(data), "--dicom-port", str(port), "--ae-title", "VNA",
           "--host", HOST, *extra_args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log.open("wb"), env=env,
                            start_new_session=True)
    wait_until(lambda: "vna ready" in log.read_text(errors="replace"), timeout, "vna", proc, log)

    def count() -> int | None:
        r = subprocess.run([vna, "index", "stats", "--data-dir", str(data), "--json"], capture_output=True,
                           text=True, timeout=60, env=env)
        return int(json.loads(r.stdout)["instances"]) if r.returncode == 0 else None

    return Receiver("vna", port, "VNA", proc, count, log)


def start_orthanc(work: Path, port: int, http_port: int, timeout: float, extra: dict | None = None) -> Receiver:
    """Orthanc with its own config (defaults otherwise, ``extra`` keys added); ready when HTTP /system answers."""
    log = work / "orthanc.log"
    cfg = {
        "Name": "bench-orthanc",
        "StorageDirectory": str(work / "orthanc-storage"),
        "IndexDirectory": str(work / "orthanc-index"),
        "DicomAet": "ORTHANC",
        "DicomPort": port,
        "HttpPort": http_port,
        "DicomCheckCalledAet": False,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "Plugins": [],
        **(extra or {}),
    }
    conf = work / "orthanc.json"
    conf.write_text(json.dumps(cfg, indent=2))
    exe = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
    proc = subprocess.Popen([exe, str(conf)], stdout=subprocess.DEVNULL, stderr=log.open("wb"),
                            env=nodelay_env(), start_new_session=True, cwd=work)
    base = f"http://{HOST}:{http_port}"

    def get(path: str) -> dict:
        with urllib.request.urlopen(base + path, timeout=10) as r:
            return json.loads(r.read())

    def ready() -> bool:
        try:
            get("/system")
            return True
        except OSError:
            return False

    wait_until(ready, timeout, "Orthanc", proc, log)
    return Receiver("orthanc", port, "ORTHANC", proc, lambda: int(get("/statistics")["CountInstances"]), log)


def start_storescp(work: Path, port: int, timeout: float) -> Receiver:
    """DCMTK storescp writing files bit-preserving, one forked child per association."""
    out, log = work / "storescp-out", work / "storescp.log"
    out.mkdir()
    exe = shutil.which("storescp") or "storescp"
    proc = subprocess.Popen([exe, "--fork", "-dhl", "+B", "-aet", "STORESCP", "-od", str(out), str(port)],
                            stdout=log.open("wb"), stderr=subprocess.STDOUT, env=nodelay_env(),
                            start_new_session=True, cwd=work)

    def ready() -> bool:
        r = subprocess.run(["echoscu", "-aet", CLIENT_AET, "-aec", "STORESCP", HOST, str(port)],
                           capture_output=True, env=nodelay_env(), timeout=10)
        return r.returncode == 0

    wait_until(ready, timeout, "storescp", proc, log)
    return Receiver("storescp", port, "STORESCP", proc, lambda: sum(1 for p in out.rglob("*") if p.is_file()), log)


def split(items: list[Path], parts: int) -> list[list[Path]]:
    """Contiguous, near-equal chunks (studies stay together)."""
    n, r = divmod(len(items), parts)
    out, i = [], 0
    for k in range(parts):
        j = i + n + (1 if k < r else 0)
        out.append(items[i:j])
        i = j
    return [c for c in out if c]


def storescu_cmd(rcv: Receiver, files: list[Path], corpus_dir: Path) -> list[str]:
    """One storescu invocation (one association) sending ``files`` (names relative to corpus_dir)."""
    names = [str(f.relative_to(corpus_dir)) for f in files]
    if sum(len(n) + 1 for n in names) > ARG_LIMIT:
        raise ValueError(f"{len(names)} file names exceed {ARG_LIMIT} bytes; use fewer instances per association")
    return ["storescu", "-aet", CLIENT_AET, "-aec", rcv.aet, "-to", "60", "-ta", "60", "-td", "120",
            HOST, str(rcv.port), *names]


def send(rcv: Receiver, files: list[Path], corpus_dir: Path, associations: int, timeout: float) -> float:
    """Run ``associations`` storescu processes at once; seconds from first start until all exited."""
    cmds = [storescu_cmd(rcv, chunk, corpus_dir) for chunk in split(files, associations)]
    env = nodelay_env()
    t0 = time.perf_counter()
    procs = [subprocess.Popen(c, cwd=corpus_dir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for c in cmds]
    errs: list[str] = []
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            _, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate()
        if p.returncode != 0:
            errs.append(f"storescu exit {p.returncode}: {err.decode(errors='replace')[-500:]}")
    elapsed = time.perf_counter() - t0
    if errs:
        raise RuntimeError("; ".join(errs))
    return elapsed


@dataclass
class Result:
    """One timed row of the table."""

    receiver: str
    corpus: str
    associations: int
    instances: int
    seconds: float
    inst_per_s: float
    mb_per_s: float
    stored: int | None
    runs: list[float] = field(default_factory=list)
    cpu_ms_per_inst: float | None = None  # receiver processes' user+system CPU during the send, per instance


@dataclass
class Corpus:
    """A generated corpus on disk."""

    name: str
    dir: Path
    files: list[Path]
    nbytes: int


def make_corpus(root: Path, name: str, kind: str, count: int, per_study: int, seed: int) -> Corpus:
    """Generate ``count`` instances of ``kind`` (studies of ``per_study``) under ``root/name``."""
    d = root / name
    studies = max(1, -(-count // per_study))
    files = write_corpus(d, kind, studies, per_study, seed)[:count]
    return Corpus(name, d, files, sum(f.stat().st_size for f in files))


def start(name: str, work: Path, args: argparse.Namespace) -> Receiver:
    """Start receiver ``name`` on fresh storage under ``work``."""
    base = args.port_base
    if name == "vna":
        return start_vna(work, base, shlex.split(args.vna_args), args.vna_workers, args.start_timeout)
    if name == "vna-python":
        return start_vna(work, base + 5, shlex.split(args.vna_args), args.vna_workers, args.start_timeout, "python")
    if name.startswith("vna-w"):  # vna-wN: N worker processes sharing the DICOM port
        return start_vna(work, base + 4, shlex.split(args.vna_args), int(name[5:]), args.start_timeout)
    if name == "orthanc":
        return start_orthanc(work, base + 1, base + 2, args.start_timeout)
    return start_storescp(work, base + 3, args.start_timeout)


def one_run(name: str, corpus: Corpus, assoc: int, warm: Corpus | None, root: Path,
            args: argparse.Namespace) -> tuple[float, int | None, float]:
    """Fresh receiver, warm-up, timed send, receiver-side count; always stops the server.

    Returns (seconds, instances stored, CPU seconds the receiver's processes used during the send).
    """
    work = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=root))
    rcv = start(name, work, args)
    try:
        if warm is not None:
            send(rcv, warm.files, warm.dir, 1, args.send_timeout)
        u0, s0 = group_cpu_seconds(rcv.proc.pid)
        secs = send(rcv, corpus.files, corpus.dir, assoc, args.send_timeout)
        u1, s1 = group_cpu_seconds(rcv.proc.pid)
        cpu = (u1 - u0) + (s1 - s0)
        try:
            stored = rcv.count()
        except Exception as e:  # noqa: BLE001 - counting is best-effort
            print(f"  ! {name}: could not count stored instances: {e}", file=sys.stderr)
            stored = None
        if stored is not None and warm is not None:
            stored -= len(warm.files)
        return secs, stored, cpu
    except Exception:
        print(f"--- {name} log tail ---\n{rcv.log.read_text(errors='replace')[-3000:]}", file=sys.stderr)
        raise
    finally:
        stop_process(rcv.proc)
        # storage is removed at the very end, not here: on ext4 without a journal (this VM's disk) the
        # inode allocator skips every inode freed in the last minutes, one buffer lookup each, so
        # deleting a run's thousands of files would tax the file creations of the next receiver


def runs(args: argparse.Namespace, corpora: list[Corpus], warm: Corpus | None, root: Path) -> Iterator[Result]:
    """Every (corpus, associations) cell; receivers interleaved per repeat so machine noise hits all alike."""
    for corpus in corpora:
        for assoc in args.associations:
            times: dict[str, list[float]] = {name: [] for name in args.receivers}
            counts: dict[str, list[int | None]] = {name: [] for name in args.receivers}
            cpus: dict[str, list[float]] = {name: [] for name in args.receivers}
            for _ in range(args.repeat):
                for name in args.receivers:
                    secs, n, cpu = one_run(name, corpus, assoc, warm, root, args)
                    times[name].append(secs)
                    counts[name].append(n)
                    cpus[name].append(cpu)
                    if n is not None and n != len(corpus.files):
                        print(f"  ! {name}: {n} stored of {len(corpus.files)} sent", file=sys.stderr)
                    print(f"  {name:9s} {corpus.name:6s} x{assoc}: {len(corpus.files) / secs:8.1f} inst/s "
                          f"({secs:.2f} s, stored {n}, receiver CPU {1e3 * cpu / len(corpus.files):.2f} ms/inst)",
                          file=sys.stderr, flush=True)
            for name in args.receivers:
                secs, n = statistics.median(times[name]), len(corpus.files)
                stored = None if None in counts[name] else min(counts[name])  # worst run
                yield Result(name, corpus.name, assoc, n, secs, n / secs, corpus.nbytes / secs / 1e6, stored,
                             [round(t, 4) for t in times[name]], round(1e3 * statistics.median(cpus[name]) / n, 3))


def table(results: list[Result]) -> str:
    """Results plus vna ratios per (corpus, associations)."""
    head = f"{'receiver':9s} {'corpus':6s} {'assoc':>5s} {'inst':>6s} {'stored':>6s} {'seconds':>8s} " \
           f"{'inst/s':>8s} {'MB/s':>7s} {'CPU ms':>7s}  {'vna/orthanc':>11s} {'vna/storescp':>12s} " \
           f"{'CPU vna/orthanc':>15s}"
    lines = [head, "-" * len(head)]
    by = {(r.receiver, r.corpus, r.associations): r for r in results}
    for r in results:
        ratios = ["", "", ""]
        if r.receiver.startswith("vna"):
            for i, peer in enumerate(("orthanc", "storescp")):
                p = by.get((peer, r.corpus, r.associations))
                ratios[i] = f"{r.inst_per_s / p.inst_per_s:.2f}" if p else "-"
            o = by.get(("orthanc", r.corpus, r.associations))
            if o and o.cpu_ms_per_inst and r.cpu_ms_per_inst is not None:
                ratios[2] = f"{r.cpu_ms_per_inst / o.cpu_ms_per_inst:.2f}"
        cpu = "-" if r.cpu_ms_per_inst is None else f"{r.cpu_ms_per_inst:.2f}"
        lines.append(f"{r.receiver:9s} {r.corpus:6s} {r.associations:5d} {r.instances:6d} "
                     f"{'?' if r.stored is None else r.stored:>6} {r.seconds:8.2f} {r.inst_per_s:8.1f} "
                     f"{r.mb_per_s:7.1f} {cpu:>7s}  {ratios[0]:>11s} {ratios[1]:>12s} {ratios[2]:>15s}")
    return "\n".join(lines)


def native_vs_python(results: list[Result]) -> str:
    """vna (the native receiver) / vna-python per (corpus, associations) of the same run; "" without both."""
    by = {(r.receiver, r.corpus, r.associations): r for r in results}
    lines = []
    for r in results:
        p = by.get(("vna-python", r.corpus, r.associations))
        if r.receiver != "vna" or p is None:
            continue
        cpu = (f", receiver CPU per instance {r.cpu_ms_per_inst / p.cpu_ms_per_inst:.2f}x"
               if r.cpu_ms_per_inst and p.cpu_ms_per_inst else "")
        lines.append(f"native/python receiver, {r.corpus} x{r.associations}: "
                     f"{r.inst_per_s / p.inst_per_s:.2f}x inst/s{cpu}")
    return "\n".join(lines)


def names_arg(known: Iterable[str], what: str) -> Callable[[str], list[str]]:
    """An argparse ``type``: comma-separated names, each one of ``known`` (an unknown one is an error)."""
    known = list(known)

    def parse(text: str) -> list[str]:
        names = text.split(",")
        bad = [n for n in names if n not in known]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {what} {bad} (known: {', '.join(known)})")
        return names

    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ct", type=int, default=200, help="CT instances (512x512 16-bit, ~526 KB); 0 to skip")
    ap.add_argument("--small", type=int, default=1000, help="small instances (64x64 8-bit); 0 to skip")
    ap.add_argument("--per-study", type=int, default=100, help="instances per generated study")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=10, help="distinct small instances sent before timing (0: none)")
    ap.add_argument("--associations", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4],
                    help="comma-separated parallel association counts (default 1,4)")
    ap.add_argument("--receivers", type=names_arg(RECEIVERS, "receivers"), default=list(RECEIVERS),
                    help="comma-separated subset of vna,orthanc,storescp")
    ap.add_argument("--repeat", type=int, default=1, help="runs per cell, median reported")
    ap.add_argument("--port-base", type=int, default=11240,
                    help="vna=base, Orthanc DICOM=base+1 HTTP=base+2, storescp=base+3, vna-w2=base+4, "
                         "vna-python=base+5")
    ap.add_argument("--vna-args", default="", help="extra args for 'vna serve' (shell-quoted string)")
    ap.add_argument("--vna-workers", type=int, default=None, help="set VNA_DICOM_WORKERS=N for vna serve")
    ap.add_argument("--tmp-dir", type=Path, default=None, help="where corpora and receiver storage go")
    ap.add_argument("--start-timeout", type=float, default=60.0)
    ap.add_argument("--send-timeout", type=float, default=300.0)
    ap.add_argument("--json", type=Path, default=None, help="write results as JSON here")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Generate corpora, run every cell, print the table, optionally write JSON."""
    args = parse_args(argv)
    tools = ["storescu", "echoscu"] + ["storescp"] * ("storescp" in args.receivers) \
        + ["Orthanc"] * ("orthanc" in args.receivers)
    for tool in tools:
        if not shutil.which(tool) and not (tool == "Orthanc" and Path("/usr/sbin/Orthanc").exists()):
            print(f"missing tool: {tool}", file=sys.stderr)
            return 2
    ports = {"vna": [args.port_base], "orthanc": [args.port_base + 1, args.port_base + 2],
             "storescp": [args.port_base + 3], "vna-w2": [args.port_base + 4], "vna-python": [args.port_base + 5]}
    busy = [p for r in args.receivers for p in ports[r] if not port_free(p)]
    if busy:
        print(f"ports already in use: {busy}; choose another --port-base", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="vna-bench-ingest-", dir=args.tmp_dir))
    try:
        print(f"generating corpora in {root} ...", file=sys.stderr, flush=True)
        corpora = []
        if args.ct:
            corpora.append(make_corpus(root / "corpus", "ct", "ct", args.ct, args.per_study, args.seed))
        if args.small:
            corpora.append(make_corpus(root / "corpus", "small", "small", args.small, args.per_study, args.seed))
        warm = make_corpus(root / "corpus", "warmup", "small", args.warmup, args.warmup, args.seed + 1000) \
            if args.warmup else None
        t0 = time.monotonic()
        results = list(runs(args, corpora, warm, root))
        total = time.monotonic() - t0
    finally:
        shutil.rmtree(root, ignore_errors=True)
    fs = fs_type(args.tmp_dir or Path(tempfile.gettempdir()))
    if args.json:
        args.json.write_text(json.dumps({
            "results": [asdict(r) for r in results],
            "settings": {"ct": args.ct, "small": args.small, "warmup": args.warmup, "repeat": args.repeat,
                         "associations": args.associations, "vna_args": args.vna_args,
                         "vna_workers": args.vna_workers, "fs": fs, "cpus": os.cpu_count()},
            "notes": NOTES,
        }, indent=2))
    print(table(results))
    native_ratios = native_vs_python(results)
    if native_ratios:
        print("\n" + native_ratios)
    print(f"\nclient: DCMTK storescu, TCP_NODELAY=1, timed from process start until all exit; "
          f"warm-up: {args.warmup} distinct small instances per server before timing; "
          f"fresh server + storage per run; median of {args.repeat}; storage fs: {fs}; cores: {os.cpu_count()}; "
          f"wall {total:.0f} s")
    for name in args.receivers:
        print(f"  {name}: {NOTES[name]}" + (f" (workers={args.vna_workers})" if name == "vna" and args.vna_workers
                                            else "") + (f" args={args.vna_args!r}" if name == "vna" and args.vna_args
                                                        else ""))
    short = [r for r in results if r.stored is not None and r.stored != r.instances]
    return 1 if short else 0


if __name__ == "__main__":
    sys.exit(main())
