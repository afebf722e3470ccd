"""Ingest throughput with the audit trail and telemetry off vs on, same run, overhead ratios.

Same corpus, same client (DCMTK ``storescu``, TCP_NODELAY=1), same machine. For
each variant a fresh ``vna serve`` is started on fresh storage with a config
that differs only in ``[audit]`` / ``[telemetry]``, warmed up, then timed from
the start of ``storescu`` until it exits. Variants are interleaved per repeat so
that machine noise hits all alike; the median is reported with the ratio to
``off`` (1.00 = no cost).

    .venv/bin/python -m benchmarks.telemetry [--small 500] [--ct 100] [--repeat 3] [--json out.json]

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
import shutil
import statistics
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.ingest import (Corpus, fs_type, make_corpus, port_free, send, start_vna, stop_process)

VARIANTS: dict[str, str] = {
    "off": "[audit]\nenabled = false\n",
    "audit": "",
    "audit+telemetry": "[telemetry]\nenabled = true\nprometheus_port = {metrics_port}\n",
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


def one_run(variant: str, corpus: Corpus, warm: Corpus | None, root: Path, args: argparse.Namespace) -> tuple[float, int | None]:
    work = Path(tempfile.mkdtemp(prefix=f"{variant.replace('+', '-')}-", dir=root))
    cfg = work / "vna.toml"
    cfg.write_text(VARIANTS[variant].format(metrics_port=args.port_base + 1, otlp_port=args.port_base + 2))
    rcv = start_vna(work, args.port_base, ["--config", str(cfg)], None, args.start_timeout)
    try:
        if warm is not None:
            send(rcv, warm.files, warm.dir, 1, args.send_timeout)
        secs = send(rcv, corpus.files, corpus.dir, args.associations, args.send_timeout)
        stored = rcv.count()
        if stored is not None and warm is not None:
            stored -= len(warm.files)
        return secs, stored
    except Exception:
        print(f"--- {variant} log tail ---\n{rcv.log.read_text(errors='replace')[-3000:]}", file=sys.stderr)
        raise
    finally:
        stop_process(rcv.proc)
        shutil.rmtree(work, ignore_errors=True)


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
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not shutil.which("storescu"):
        print("missing tool: storescu (DCMTK)", file=sys.stderr)
        return 2
    if not all(port_free(args.port_base + i) for i in range(3)):
        print(f"ports {args.port_base}-{args.port_base + 2} in use; choose another --port-base", file=sys.stderr)
        return 2
    variants = ["off", "audit", "audit+telemetry", "audit+otlp", "audit+otlp-1%"] + \
        (["audit-fsync-each"] if args.fsync_each else [])
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
            stored: dict[str, list[int | None]] = {v: [] for v in variants}
            for _ in range(args.repeat):
                for v in variants:
                    secs, n = one_run(v, corpus, warm, root, args)
                    times[v].append(secs)
                    stored[v].append(n)
                    short |= n is None or n != len(corpus.files)
                    print(f"  {v:17s} {corpus.name:6s}: {len(corpus.files) / secs:8.1f} inst/s ({secs:.2f} s, "
                          f"stored {n})", file=sys.stderr, flush=True)
            base = len(corpus.files) / statistics.median(times["off"])
            for v in variants:
                secs = statistics.median(times[v])
                rate = len(corpus.files) / secs
                counts = stored[v]
                cells.append(Cell(v, corpus.name, len(corpus.files), round(secs, 4), round(rate, 1),
                                  round(rate / base, 3), None if None in counts else min(c for c in counts if c is not None),
                                  [round(t, 4) for t in times[v]]))
    finally:
        sink.stop()
        shutil.rmtree(root, ignore_errors=True)
    head = f"{'variant':17s} {'corpus':6s} {'inst':>5s} {'stored':>6s} {'seconds':>8s} {'inst/s':>8s} {'vs off':>7s}"
    print(head)
    print("-" * len(head))
    for c in cells:
        print(f"{c.variant:17s} {c.corpus:6s} {c.instances:5d} {'?' if c.stored is None else c.stored:>6} "
              f"{c.seconds:8.2f} {c.inst_per_s:8.1f} {c.ratio_to_off:7.3f}")
    print(f"(median of {args.repeat}, {args.associations} association(s), storage on "
          f"{fs_type(args.tmp_dir or Path(tempfile.gettempdir()))}; 'vs off' = throughput / throughput with both off)")
    print(f"OTLP collector received {sink.spans} spans and {sink.metric_exports} metric exports")
    if args.json:
        args.json.write_text(json.dumps({"cells": [asdict(c) for c in cells], "settings": vars(args)},
                                        indent=2, default=str))
    return 1 if short else 0


if __name__ == "__main__":
    sys.exit(main())
