"""Ingest throughput with the audit trail and telemetry off vs on, same run, overhead ratios.

Same corpus, same client (DCMTK ``storescu``, TCP_NODELAY=1), same machine. For
each variant a fresh ``vna serve`` is started on fresh storage with a config
that differs only in ``[audit]`` / ``[telemetry]``, warmed up, then timed from
the start of ``storescu`` until it exits. Variants are interleaved per repeat so
that machine noise hits all alike; the median is reported with the ratio to
``off`` (1.00 = no cost).

Throughput on a small VM swings with fsync latency, so each run also measures
the server's CPU: utime + stime (``/proc/<pid>/stat``) of every process of the
``vna serve`` process group, and of its reaped children, from just before the
send to just after it, divided by the instances sent. The median per variant is
printed with its ratio to ``off`` next to the throughput: a steadier measure
of what audit and telemetry cost.

    .venv/bin/python -m benchmarks.telemetry [--small 500] [--ct 100] [--repeat 3] [--json out.json]

Two in-process measures of the per-instance cost alone (no server, no DCMTK;
variants interleaved, ``--repeat`` rounds, median and minimum reported):

    .venv/bin/python -m benchmarks.telemetry --inproc 400 --repeat 7
    .venv/bin/python -m benchmarks.telemetry --calls 3000 --repeat 7 [--cprofile audit+telemetry]

- ``--inproc N``: ``IngestService.ingest_file`` on N generated small instances
  (hot replicas without fsync, to keep disk latency out), CPU time of the calling
  thread per instance (the second replica write runs on a pool thread and is not
  counted; process CPU time swings with the kernel's file creation work);
- ``--calls N``: only the telemetry and audit calls one C-STORE makes (the DIMSE
  span and metrics, the audit operation and record, the ingest span, the stage
  samples of hash/parse/write/2 replica writes/index, the ingest counters),
  thread CPU time per instance.

``--cprofile VARIANT`` prints a profile (thread CPU time) of its first round.

Variants:

- ``off``: ``audit.enabled = false``, telemetry disabled (the no-op instruments)
- ``audit``: the default audit trail (a record per C-STORE, fsync batched every 1 s)
- ``audit+telemetry``: and telemetry on with the Prometheus endpoint (metrics
  aggregated; spans carry trace ids but are not recorded, as nothing exports them)
- ``audit+otlp``: telemetry exported over OTLP/gRPC to a local collector (a sink
  in this process that counts what it receives): every span sampled, recorded and
  exported in batches, metrics exported every second
- ``audit+otlp-1%``: the same with ``trace_sample_ratio = 0.01`` (metrics unchanged)
- ``audit-fsync-each`` (with ``--fsync-each``): the audit record fsynced before every answer
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.servers import group_cpu_seconds
from benchmarks.ingest import (Corpus, fs_type, make_corpus, names_arg, port_free, send, start_vna,
                               stop_process)

VARIANTS: dict[str, str] = {
    "off": "[audit]\nenabled = false\n",
    "audit": "",
    "audit+telemetry": "[telemetry]\nenabled = true\nprometheus_port = {metrics_port}\n",
    "telemetry": "[audit]\nenabled = false\n[telemetry]\nenabled = true\nprometheus_port = {metrics_port}\n",
    "audit+otlp": "[telemetry]\nenabled = true\notlp_endpoint = \"http://127.0.0.1:{otlp_port}\"\n"
                  "export_interval_seconds = 1.0\n",
    "audit+otlp-1%": "[telemetry]\nenabled = true\notlp_endpoint = \"http://127.0.0.1:{otlp_port}\"\n"
                     "export_interval_seconds = 1.0\ntrace_sample_ratio = 0.01\n",
    "audit-fsync-each": "[audit]\nfsync_interval = 0\n",
}


class OtlpSink:
    """A local OTLP/gRPC collector that accepts traces and metrics and counts them (then drops them)."""

    def __init__(self, port: int) -> None:
        from concurrent import futures

        import grpc
        from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

        sink = self
        self.spans = 0
        self.metric_exports = 0

        class Traces(trace_service_pb2_grpc.TraceServiceServicer):  # type: ignore[misc]
            def Export(self, request: Any, context: Any) -> Any:  # noqa: N802
                sink.spans += sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
                return trace_service_pb2.ExportTraceServiceResponse()

        class Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):  # type: ignore[misc]
            def Export(self, request: Any, context: Any) -> Any:  # noqa: N802
                sink.metric_exports += 1
                return metrics_service_pb2.ExportMetricsServiceResponse()

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Traces(), self.server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(Metrics(), self.server)
        self.server.add_insecure_port(f"127.0.0.1:{port}")
        self.server.start()

    def stop(self) -> None:
        self.server.stop(grace=None)


@dataclass
class Cell:
    """One (variant, corpus) result."""

    variant: str
    corpus: str
    instances: int
    seconds: float
    inst_per_s: float
    ratio_to_off: float
    stored: int | None
    runs: list[float]
    cpu_us_per_inst: float | None = None
    cpu_ratio_to_off: float | None = None
    cpu_runs: list[float] | None = None
    user_us_per_inst: float | None = None
    user_ratio_to_off: float | None = None
    user_runs: list[float] | None = None
    paired_ratios: list[float] | None = None  # per repeat: this variant's throughput / off's in the same round


def one_run(variant: str, corpus: Corpus, warm: Corpus | None, root: Path, args: argparse.Namespace
            ) -> tuple[float, int | None, float, float]:
    """One fresh server: (seconds of the timed send, instances it stored, its user and system CPU seconds
    during the send)."""
    work = Path(tempfile.mkdtemp(prefix=f"{variant.replace('+', '-')}-", dir=root))
    cfg = work / "vna.toml"
    cfg.write_text(VARIANTS[variant].format(metrics_port=args.port_base + 1, otlp_port=args.port_base + 2))
    rcv = start_vna(work, args.port_base, ["--config", str(cfg)], None, args.start_timeout)
    try:
        if warm is not None:
            send(rcv, warm.files, warm.dir, 1, args.send_timeout)
        user0, sys0 = group_cpu_seconds(rcv.proc.pid)
        secs = send(rcv, corpus.files, corpus.dir, args.associations, args.send_timeout)
        user1, sys1 = group_cpu_seconds(rcv.proc.pid)
        stored = rcv.count()
        if stored is not None and warm is not None:
            stored -= len(warm.files)
        return secs, stored, user1 - user0, sys1 - sys0
    except Exception:
        print(f"--- {variant} log tail ---\n{rcv.log.read_text(errors='replace')[-3000:]}", file=sys.stderr)
        raise
    finally:
        stop_process(rcv.proc)
        # removed with the root at the end: deleting thousands of files between runs makes the next
        # run's file creations dearer on ext4 without a journal (see benchmarks/ingest.py)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", type=int, default=500, help="small instances (per-instance cost); 0 to skip")
    ap.add_argument("--ct", type=int, default=100, help="CT instances (~526 KB); 0 to skip")
    ap.add_argument("--per-study", type=int, default=100)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--associations", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3, help="runs per cell, median reported")
    ap.add_argument("--fsync-each", action="store_true", help="also run audit-fsync-each")
    ap.add_argument("--port-base", type=int, default=11260,
                    help="vna DICOM = base, Prometheus = base+1, OTLP collector = base+2")
    ap.add_argument("--tmp-dir", type=Path, default=None)
    ap.add_argument("--start-timeout", type=float, default=60.0)
    ap.add_argument("--send-timeout", type=float, default=300.0)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--variants", type=names_arg(VARIANTS, "variants"), default=[],
                    help="comma-separated variants to run besides off (default: all)")
    ap.add_argument("--inproc", type=int, default=0, metavar="N",
                    help="only the in-process measure: ingest_file CPU per instance over N instances")
    ap.add_argument("--calls", type=int, default=0, metavar="N",
                    help="only the in-process measure of the telemetry and audit calls of N C-STOREs")
    ap.add_argument("--cprofile", default="", metavar="VARIANT", help="profile the first round of VARIANT")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.inproc or args.calls:
        return run_inproc(args)
    if not shutil.which("storescu"):
        print("missing tool: storescu (DCMTK)", file=sys.stderr)
        return 2
    if not all(port_free(args.port_base + i) for i in range(3)):
        print(f"ports {args.port_base}-{args.port_base + 2} in use; choose another --port-base", file=sys.stderr)
        return 2
    variants = ["off", "audit", "audit+telemetry", "audit+otlp", "audit+otlp-1%"] + \
        (["audit-fsync-each"] if args.fsync_each else [])
    if args.variants:
        variants = ["off"] + [v for v in args.variants if v != "off"]
    sink = OtlpSink(args.port_base + 2)
    root = Path(tempfile.mkdtemp(prefix="vna-bench-telemetry-", dir=args.tmp_dir))
    cells: list[Cell] = []
    short = False
    try:
        corpora = []
        if args.small:
            corpora.append(make_corpus(root / "corpus", "small", "small", args.small, args.per_study, args.seed))
        if args.ct:
            corpora.append(make_corpus(root / "corpus", "ct", "ct", args.ct, args.per_study, args.seed))
        warm = make_corpus(root / "corpus", "warmup", "small", args.warmup, args.warmup, args.seed + 1000) \
            if args.warmup else None
        for corpus in corpora:
            times: dict[str, list[float]] = {v: [] for v in variants}
            cpus: dict[str, list[float]] = {v: [] for v in variants}
            users: dict[str, list[float]] = {v: [] for v in variants}
            stored: dict[str, list[int | None]] = {v: [] for v in variants}
            n_inst = len(corpus.files)
            for _ in range(args.repeat):
                for v in variants:
                    secs, n, user, system = one_run(v, corpus, warm, root, args)
                    cpu = user + system
                    times[v].append(secs)
                    cpus[v].append(cpu / n_inst * 1e6)
                    users[v].append(user / n_inst * 1e6)
                    stored[v].append(n)
                    short |= n is None or n != n_inst
                    print(f"  {v:17s} {corpus.name:6s}: {n_inst / secs:8.1f} inst/s ({secs:.2f} s, "
                          f"stored {n}), server CPU {cpu / n_inst * 1e6:7.0f} us/inst (user {user / n_inst * 1e6:7.0f})",
                          file=sys.stderr, flush=True)
            base = n_inst / statistics.median(times["off"])
            cpu_base = statistics.median(cpus["off"])
            user_base = statistics.median(users["off"])
            for v in variants:
                paired = [round(off / t, 3) for t, off in zip(times[v], times["off"])]  # rates: n/t over n/off
                secs = statistics.median(times[v])
                rate = n_inst / secs
                counts = stored[v]
                cpu_med = statistics.median(cpus[v])
                user_med = statistics.median(users[v])
                cells.append(Cell(v, corpus.name, n_inst, round(secs, 4), round(rate, 1),
                                  round(rate / base, 3), None if None in counts else min(c for c in counts if c is not None),
                                  [round(t, 4) for t in times[v]], round(cpu_med, 1),
                                  round(cpu_med / cpu_base, 3) if cpu_base else None,
                                  [round(c, 1) for c in cpus[v]], round(user_med, 1),
                                  round(user_med / user_base, 3) if user_base else None,
                                  [round(c, 1) for c in users[v]], paired))
    finally:
        sink.stop()
        shutil.rmtree(root, ignore_errors=True)
    head = (f"{'variant':17s} {'corpus':6s} {'inst':>5s} {'stored':>6s} {'seconds':>8s} {'inst/s':>8s} {'vs off':>7s}"
            f" {'CPU us/inst':>11s} {'CPU vs off':>10s} {'user us/inst':>12s} {'user vs off':>11s}"
            f"  {'paired vs off [95% CI]':>23s}")
    print(head)
    print("-" * len(head))
    for c in cells:
        print(f"{c.variant:17s} {c.corpus:6s} {c.instances:5d} {'?' if c.stored is None else c.stored:>6} "
              f"{c.seconds:8.2f} {c.inst_per_s:8.1f} {c.ratio_to_off:7.3f} {c.cpu_us_per_inst or 0:11.0f} "
              f"{c.cpu_ratio_to_off or 0:10.3f} {c.user_us_per_inst or 0:12.0f} {c.user_ratio_to_off or 0:11.3f}"
              f"  {_median_ci(c.paired_ratios or [0])}")
    print(f"(median of {args.repeat}, {args.associations} association(s), storage on "
          f"{fs_type(args.tmp_dir or Path(tempfile.gettempdir()))}; 'vs off' = throughput / throughput with both off;"
          " CPU = the vna serve process group's utime+stime during the send, per instance, / the same with both off;"
          " user = utime only; paired = median over rounds of the throughput ratio to the 'off' run of the same"
          " round, which cancels slow phases of the machine that hit a whole round, with a bootstrap 95% confidence"
          " interval of that median: a target is met only if the interval clears it; more --repeat narrows it)")
    print(f"OTLP collector received {sink.spans} spans and {sink.metric_exports} metric exports")
    if args.json:
        args.json.write_text(json.dumps({"cells": [asdict(c) for c in cells], "settings": vars(args)},
                                        indent=2, default=str))
    return 1 if short else 0


def _median_ci(xs: list[float], resamples: int = 2000) -> str:
    """``median [lo-hi]``: the median of ``xs`` and a percentile-bootstrap 95 % interval of it (fixed seed)."""
    import random

    rng = random.Random(8)
    meds = sorted(statistics.median(rng.choices(xs, k=len(xs))) for _ in range(resamples))
    lo, hi = meds[int(0.025 * resamples)], meds[int(0.975 * resamples) - 1]
    return f"{statistics.median(xs):9.3f} [{lo:.3f}-{hi:.3f}]"


# -- in-process measures ----------------------------------------------------------------

#: variant -> config overrides of the in-process measures
INPROC_VARIANTS: dict[str, dict[str, Any]] = {
    "off": {"audit": {"enabled": False}},
    "audit": {},
    "telemetry": {"audit": {"enabled": False}, "telemetry": {"enabled": True, "prometheus_port": 1}},
    "audit+telemetry": {"telemetry": {"enabled": True, "prometheus_port": 1}},
}


def _c_store_calls(tel: Any, audit: Any, assoc_span: Any, actor: Any) -> None:
    """The telemetry and audit calls of one C-STORE received on the fast path (server._traced,
    IngestService, TierAccessor), nothing else."""
    import contextvars
    import time

    from opentelemetry.trace import SpanKind

    from vna.audit import INSTANCES_TRANSFERRED

    # the server and IngestService build these series keys once
    stored, ops, c_store = (("outcome", "stored"),), (("op", "c-store"), ("status", "0x0000")), (("op", "c-store"),)
    t0 = time.perf_counter()
    received = time.time_ns()
    with tel.span("dimse.c-store", parent=assoc_span, kind=SpanKind.SERVER, start_ns=received) as span:
        with audit.operation(INSTANCES_TRANSFERRED, "C", actor) as rec, \
                tel.span("ingest", start_ns=received, inner=True):
            tel.stage_done("ingest.receive", received, received + 1000, {"vna.bytes": 1234})
            with tel.stage("ingest.parse"):
                pass
            rec.patient_ids.append("PAT0001")
            rec.study_uids.append("1.2.826.0.1.3680043.8.498.12345678901234567890")
            rec.details.update({"sop_uid": "1.2.826.0.1.3680043.8.498.12345678901234567890.1.17",
                                "series_uid": "1.2.826.0.1.3680043.8.498.12345678901234567890.1",
                                "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2"})
            with tel.stage("ingest.write"):
                if tel.enabled:
                    contextvars.copy_context()       # the replica pool runs in a copy of the context
                for store in ("hot-1", "hot-2"):
                    with tel.stage("storage.write", {"vna.store": store, "vna.tier": "hot"}):
                        pass
            with tel.stage("ingest.index"):
                pass
            rec.details.update({"version": 1, "bytes": 1234, "duplicate": False})
            tel.ingest_instances.add_key(1, stored)
            tel.ingest_bytes.add(1234)
        if span is not None:
            span.set_attribute("dicom.status", "0x0000")
        tel.dimse_operations.add_key(1, ops)
        tel.dimse_duration.record_key(time.perf_counter() - t0, c_store)


def run_inproc(args: argparse.Namespace) -> int:
    """``--inproc`` / ``--calls``: CPU per instance of each variant, interleaved; prints a table."""
    import cProfile
    import pstats
    import time

    from opentelemetry.trace import SpanKind

    from benchmarks.corpus import write_corpus
    from vna.archive import Archive
    from vna.audit import Actor, AuditLog
    from vna.config import load_config
    from vna.telemetry import Telemetry

    root = Path(tempfile.mkdtemp(prefix="vna-bench-telemetry-", dir=args.tmp_dir))
    mode = "inproc" if args.inproc else "calls"
    n = args.inproc or args.calls
    files = write_corpus(root / "corpus", "small", max(1, -(-n // 100)), 100, args.seed)[:n] if args.inproc else []
    warm = 20
    runs: dict[str, list[float]] = {v: [] for v in INPROC_VARIANTS}
    try:
        for r in range(args.repeat):
            for v, overrides in INPROC_VARIANTS.items():
                work = Path(tempfile.mkdtemp(prefix=v.replace("+", "-") + "-", dir=root))
                cfg = load_config(env={}, overrides={"archive": {"data_dir": str(work)}, "hot": {"fsync": False},
                                                     **overrides})
                prof = cProfile.Profile(time.thread_time) if args.cprofile == v and r == 0 else None
                if mode == "inproc":
                    archive = Archive(cfg)
                    try:
                        for f in files[:warm]:
                            archive.ingest.ingest_file(f, source_ae="BENCH")
                        if prof is not None:
                            prof.enable()
                        t0 = time.thread_time()
                        for f in files[warm:]:
                            archive.ingest.ingest_file(f, source_ae="BENCH")
                        per = (time.thread_time() - t0) / max(1, len(files) - warm)
                        if prof is not None:
                            prof.disable()
                            pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(30)
                    finally:
                        archive.close()
                else:
                    tel = Telemetry.setup(cfg.telemetry)
                    audit = AuditLog(cfg.audit, cfg.resolve(cfg.audit.path), telemetry=tel,
                                     source={"ae": "VNA", "site": "local"})
                    try:
                        assoc = tel.start_span("dimse.association", {"dicom.calling_ae": "BENCH"},
                                               kind=SpanKind.SERVER)
                        actor = Actor("STORESCU", "ae", "127.0.0.1")
                        for _ in range(warm):
                            _c_store_calls(tel, audit, assoc, actor)
                        if prof is not None:
                            prof.enable()
                        t0 = time.thread_time()
                        for _ in range(n):
                            _c_store_calls(tel, audit, assoc, actor)
                        per = (time.thread_time() - t0) / n
                        if prof is not None:
                            prof.disable()
                            pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(30)
                    finally:
                        audit.close()
                        tel.shutdown()
                runs[v].append(per * 1e6)
                print(f"  {v:17s} round {r + 1}: {per * 1e6:8.1f} us/inst", file=sys.stderr, flush=True)
                shutil.rmtree(work, ignore_errors=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    what = ("ingest_file, thread CPU" if mode == "inproc" else "telemetry+audit calls only, thread CPU")
    base_med, base_min = statistics.median(runs["off"]), min(runs["off"])
    head = f"{'variant':17s} {'median us/inst':>14s} {'+ vs off':>9s} {'min us/inst':>12s} {'+ vs off':>9s} {'ratio':>6s}"
    print(f"{mode}: {what} per instance, {n} instances x {args.repeat} rounds (variants interleaved)")
    print(head)
    print("-" * len(head))
    for v, xs in runs.items():
        med, lo = statistics.median(xs), min(xs)
        print(f"{v:17s} {med:14.1f} {med - base_med:+9.1f} {lo:12.1f} {lo - base_min:+9.1f} {med / base_med:6.3f}")
    if args.json:
        args.json.write_text(json.dumps({"mode": mode, "runs": runs, "settings": vars(args)}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
