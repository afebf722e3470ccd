"""Telemetry after real DIMSE traffic: spans and metrics through in-memory exporters (in-process
server), the Prometheus endpoint scraped over HTTP and OTLP export to a real gRPC collector (`vna serve`)."""

from __future__ import annotations

import io
import logging
import re
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pydicom import dcmread

from tests.conftest import VnaServer, free_port
from tests.integration import scu
from vna.archive import Archive
from vna.config import load_config
from vna.telemetry import Telemetry

Factory = Callable[..., VnaServer]


class InProcess:
    """An archive and its DIMSE server in this process, with in-memory exporters."""

    def __init__(self, tmp: Path, log_stream: io.StringIO) -> None:
        from vna.dicom.server import DicomServer

        self.port = free_port()
        self.cfg = load_config(env={}, overrides={
            "archive": {"data_dir": str(tmp / "data")},
            "dicom": {"port": self.port, "host": "127.0.0.1"},
            "telemetry": {"enabled": True},
        })
        self.handler = logging.StreamHandler(log_stream)
        self.handler.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
        logging.getLogger().addHandler(self.handler)   # before setup: telemetry adds trace ids to it
        self.spans = InMemorySpanExporter()
        self.reader = InMemoryMetricReader()
        self.telemetry = Telemetry.setup(self.cfg.telemetry, span_exporter=self.spans, metric_readers=[self.reader])
        self.archive = Archive(self.cfg, telemetry=self.telemetry)
        self.server = DicomServer(self.archive, self.cfg.dicom)
        self.server.start()

    def close(self) -> None:
        self.server.stop()
        self.archive.close()
        logging.getLogger().removeHandler(self.handler)

    def finished(self, name: str) -> list[ReadableSpan]:
        return [s for s in self.spans.get_finished_spans() if s.name == name]

    def wait_spans(self, name: str, n: int, timeout: float = 10.0) -> list[ReadableSpan]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.finished(name)
            if len(found) >= n:
                return found
            time.sleep(0.02)
        raise AssertionError(f"{n} {name} spans expected, {len(self.finished(name))} finished")

    def metrics(self) -> dict[str, dict[frozenset[tuple[str, Any]], Any]]:
        """name -> {attributes: value (sums, gauges) or data point (histograms)}."""
        data = self.reader.get_metrics_data()
        out: dict[str, dict[frozenset[tuple[str, Any]], Any]] = {}
        assert data is not None
        for rm in data.resource_metrics:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    for p in m.data.data_points:
                        key = frozenset((p.attributes or {}).items())
                        out.setdefault(m.name, {})[key] = getattr(p, "value", p)
        return out


@contextmanager
def in_process(tmp_path: Path) -> Iterator[InProcess]:
    # the server's pynetdicom settings are process-wide: keep them from leaking into the SCUs of later tests
    from pynetdicom import _config

    saved = _config.STORE_RECV_CHUNKED_DATASET, _config.STORE_SEND_CHUNKED_DATASET
    stream = io.StringIO()
    srv = InProcess(tmp_path, stream)
    _config.STORE_RECV_CHUNKED_DATASET = _config.STORE_SEND_CHUNKED_DATASET = True
    srv.log = stream  # type: ignore[attr-defined]
    try:
        yield srv
    finally:
        srv.close()
        _config.STORE_RECV_CHUNKED_DATASET, _config.STORE_SEND_CHUNKED_DATASET = saved


@pytest.fixture
def inproc(tmp_path: Path) -> Iterator[InProcess]:
    with in_process(tmp_path) as srv:
        yield srv


def _parent(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def test_spans_and_metrics_after_dimse_traffic(inproc: InProcess, corpus: list[Path]) -> None:
    mr = [p for p in corpus if p.name.startswith("mr-")]
    assert all(r.Status == 0 for r in scu.store(inproc.port, mr))
    first = dcmread(mr[0], stop_before_pixels=True)
    found, status = scu.find(inproc.port, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": ""})
    assert status == 0 and len(found) == 1
    received, final, _ = scu.get(inproc.port, {"QueryRetrieveLevel": "STUDY",
                                               "StudyInstanceUID": first.StudyInstanceUID}, [str(first.SOPClassUID)])
    assert final.Status == 0 and len(received) == len(mr)
    _, status = scu.find(inproc.port, {"QueryRetrieveLevel": "BOGUS"})
    assert status == 0xA900

    assocs = inproc.wait_spans("dimse.association", 4)
    stores = inproc.finished("dimse.c-store")
    assert len(stores) == len(mr)
    # one association span is the parent of every C-STORE span (same trace)
    (store_assoc,) = [a for a in assocs if a.context.span_id == _parent(stores[0])]
    assert {_parent(s) for s in stores} == {store_assoc.context.span_id}
    assert {s.context.trace_id for s in stores} == {store_assoc.context.trace_id}
    assert store_assoc.attributes["dicom.calling_ae"] == "TESTSCU"
    assert all(s.attributes["dicom.status"] == "0x0000" for s in stores)

    by_id = {s.context.span_id: s for s in inproc.spans.get_finished_spans()}
    ingests = inproc.finished("ingest")
    assert sorted(_parent(s) or 0 for s in ingests) == sorted(s.context.span_id for s in stores)
    # C-STOREs spooled by pynetdicom: no receive stage, ingest.hash reads the spool file back
    assert inproc.finished("ingest.receive") == []
    for stage in ("ingest.hash", "ingest.parse", "ingest.write", "ingest.index"):
        spans = inproc.finished(stage)
        assert len(spans) == len(mr), stage
        assert all(by_id[_parent(s) or 0].name == "ingest" for s in spans), stage
    writes = inproc.finished("storage.write")
    assert len(writes) == 2 * len(mr)                     # one per hot replica
    assert all(by_id[_parent(s) or 0].name == "ingest.write" for s in writes)
    assert {s.attributes["vna.store"] for s in writes} == {"hot-1", "hot-2"}

    (get,) = inproc.finished("dimse.c-get")
    for name in ("retrieve.select", "retrieve.instance"):
        assert all(_parent(s) == get.context.span_id for s in inproc.finished(name)), name
    assert len(inproc.finished("retrieve.instance")) == len(mr)
    verifies = inproc.finished("retrieve.verify")
    assert len(verifies) == len(mr) and all(by_id[_parent(s) or 0].name == "retrieve.instance" for s in verifies)
    bad = [s for s in inproc.finished("dimse.c-find") if s.attributes["dicom.status"] == "0xA900"]
    assert len(bad) == 1 and not bad[0].status.is_ok

    m = inproc.metrics()
    assert m["vna.ingest.instances"] == {frozenset({("outcome", "stored")}): len(mr)}
    assert m["vna.ingest.bytes"][frozenset()] == inproc.archive.index.stats().content_bytes
    assert m["vna.retrieve.instances"][frozenset({("op", "c-get")})] == len(mr)
    assert m["vna.dimse.operations"][frozenset({("op", "c-store"), ("status", "0x0000")})] == len(mr)
    assert m["vna.dimse.operations"][frozenset({("op", "c-find"), ("status", "0xA900")})] == 1
    assert m["vna.dimse.associations"][frozenset({("result", "accepted")})] == 4
    assert m["vna.dimse.associations.open"][frozenset()] == 0
    assert m["vna.stage.duration"][frozenset({("stage", "storage.write")})].count == 2 * len(mr)
    assert m["vna.stage.duration"][frozenset({("stage", "ingest.hash")})].count == len(mr)
    assert m["vna.audit.records"][frozenset({("event_id", "110104")})] == 2   # the stores (one study), the C-GET

    # a log line written inside a span carries its trace id (and no patient data)
    (line,) = [x for x in inproc.log.getvalue().splitlines() if "C-FIND refused" in x]  # type: ignore[attr-defined]
    assert f"trace_id={bad[0].context.trace_id:032x}" in line


def test_disabled_telemetry_is_a_no_op(tmp_path: Path) -> None:
    cfg = load_config(env={}, overrides={"archive": {"data_dir": str(tmp_path)}})
    archive = Archive(cfg)
    try:
        assert not archive.telemetry.enabled
        assert archive.telemetry.start_endpoint() is None
        with archive.telemetry.stage("x") as span:
            assert span is None
        archive.telemetry.ingest_instances.add(1, {"outcome": "stored"})
    finally:
        archive.close()


def test_inner_spans_are_made_only_when_exported_or_alone() -> None:
    """Without a span exporter an ``inner`` span is skipped under a current span (log lines keep its
    trace id) and made when no span is current; with one it is always a child span."""
    quiet = Telemetry.setup(load_config(env={}, overrides={"telemetry": {"enabled": True}}).telemetry)
    exported = InMemorySpanExporter()
    recording = Telemetry.setup(quiet.cfg, span_exporter=exported)
    try:
        with quiet.span("outer") as outer:
            assert outer is not None and outer.get_span_context().is_valid
            with quiet.span("ingest", inner=True) as inner:
                assert inner is None and trace.get_current_span() is outer
        with quiet.span("ingest", inner=True) as alone:
            assert alone is not None and alone.get_span_context().is_valid
            assert trace.get_current_span() is alone
        with recording.span("outer") as outer, recording.span("ingest", inner=True) as inner:
            assert inner is not None and inner is not outer
        (child,) = [s for s in exported.get_finished_spans() if s.name == "ingest"]
        assert _parent(child) == outer.get_span_context().span_id
    finally:
        quiet.shutdown()
        recording.shutdown()


def _scrape(port: int) -> tuple[str, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as rsp:
        return rsp.headers["Content-Type"], rsp.read().decode()


def _sample(body: str, name: str, labels: str = "") -> float:
    m = re.search(rf"^{re.escape(name + labels)} (\S+)$", body, re.M)
    assert m is not None, f"{name}{labels} not in scrape"
    return float(m.group(1))


def test_prometheus_endpoint_is_scraped_over_http(make_server: Factory, corpus: list[Path]) -> None:
    port = free_port()
    srv = make_server(f"[telemetry]\nenabled = true\nprometheus_port = {port}\n")
    small = [p for p in corpus if p.name.startswith("small-")]
    assert all(r.Status == 0 for r in scu.store(srv.port, small))
    ctype, body = _scrape(port)
    assert ctype.startswith("text/plain; version=0.0.4")
    assert "# TYPE vna_ingest_instances_total counter" in body
    assert _sample(body, "vna_ingest_instances_total", '{outcome="stored"}') == len(small)
    assert _sample(body, "vna_dimse_operations_total", '{op="c-store",status="0x0000"}') == len(small)
    assert "# TYPE vna_stage_duration_seconds histogram" in body
    assert _sample(body, "vna_stage_duration_seconds_bucket", '{stage="storage.write",le="+Inf"}') == 2 * len(small)
    assert _sample(body, "vna_stage_duration_seconds_count", '{stage="ingest.index"}') == len(small)
    assert _sample(body, "vna_audit_healthy") == 1
    assert _sample(body, "vna_ingest_bytes_total") > 0


def test_otlp_export_to_a_grpc_collector(make_server: Factory, corpus: list[Path]) -> None:
    import grpc
    from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    span_names: list[str] = []
    metric_names: set[str] = set()

    class Traces(trace_service_pb2_grpc.TraceServiceServicer):  # type: ignore[misc]
        def Export(self, request: Any, context: Any) -> Any:  # noqa: N802 - the generated name
            for rs in request.resource_spans:
                for ss in rs.scope_spans:
                    span_names.extend(s.name for s in ss.spans)
            return trace_service_pb2.ExportTraceServiceResponse()

    class Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):  # type: ignore[misc]
        def Export(self, request: Any, context: Any) -> Any:  # noqa: N802
            for rm in request.resource_metrics:
                for sm in rm.scope_metrics:
                    metric_names.update(m.name for m in sm.metrics)
            return metrics_service_pb2.ExportMetricsServiceResponse()

    server = grpc.server(ThreadPoolExecutor(4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Traces(), server)
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(Metrics(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        srv = make_server(f'[telemetry]\nenabled = true\notlp_endpoint = "http://127.0.0.1:{port}"\n'
                          "export_interval_seconds = 0.5\n")
        assert all(r.Status == 0 for r in scu.store(srv.port, corpus[:2]))
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and "vna.ingest.instances" not in metric_names:
            time.sleep(0.1)
        assert "vna.ingest.instances" in metric_names
        assert srv.stop() == 0                    # shutdown flushes the batched spans
        assert {"dimse.association", "dimse.c-store", "ingest", "storage.write"} <= set(span_names)
    finally:
        server.stop(None)


def test_grpc_calls_are_spans_that_continue_the_callers_trace(inproc: InProcess, corpus: list[Path]) -> None:
    """A gRPC call with a W3C traceparent becomes a child span of the caller's; calls are counted by code."""
    import dataclasses

    import grpc

    from vna.api._gen import archive_pb2 as pb
    from vna.api.client import VnaClient
    from vna.api.observe import trace_metadata
    from vna.api.server import GrpcServer
    from vna.config import GrpcToken

    port = free_port()
    cfg = dataclasses.replace(inproc.cfg, grpc=dataclasses.replace(
        inproc.cfg.grpc, enabled=True, host="127.0.0.1", port=port, token=(GrpcToken("app", "s3cret-token-0123456789", "write"),)))
    server = GrpcServer(inproc.archive, cfg)
    server.start()
    try:
        with VnaClient(f"127.0.0.1:{port}", "s3cret-token-0123456789") as client:
            client.store(corpus[0])
            with inproc.telemetry.tracer.start_as_current_span("site-b.request") as caller:
                assert trace_metadata()  # what VnaClient sends along: the caller's traceparent
                client.query_page("STUDY", {})
            with pytest.raises(grpc.RpcError) as refused:
                client.archive.Query(pb.QueryRequest(level=client._level("STUDY")), timeout=30)  # noqa: SLF001
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            ds = dcmread(corpus[0], stop_before_pixels=True)
            assert [r.data for r in client.retrieve(sop_uid=str(ds.SOPInstanceUID))] == [corpus[0].read_bytes()]
    finally:
        server.stop()
    (query, *_) = [s for s in inproc.wait_spans("grpc.Query", 2)
                   if s.parent is not None and s.parent.span_id == caller.get_span_context().span_id]
    assert query.context.trace_id == caller.get_span_context().trace_id
    assert query.kind.name == "SERVER"
    store = inproc.wait_spans("grpc.Store", 1)[0]
    assert any(_parent(s) == store.context.span_id for s in inproc.finished("ingest"))  # the ingest is inside
    inproc.wait_spans("grpc.Retrieve", 1)
    calls = inproc.metrics()["vna.grpc.calls"]
    assert calls[frozenset({("method", "Query"), ("code", "OK")})] == 1
    assert calls[frozenset({("method", "Query"), ("code", "UNAUTHENTICATED")})] == 1
    assert calls[frozenset({("method", "Store"), ("code", "OK")})] == 1
    assert calls[frozenset({("method", "Retrieve"), ("code", "OK")})] == 1


def _dashboard_metrics() -> set[str]:
    """Metric names the shipped Grafana dashboard and Prometheus alert rules query."""
    import json

    root = Path(__file__).resolve().parents[2] / "ops" / "observability"
    exprs = [t["expr"] for p in json.loads((root / "vna-dashboard.json").read_text())["panels"] for t in p["targets"]]
    exprs.append((root / "vna-alerts.yml").read_text())
    names = {re.sub(r"_(bucket|sum|count)$", "", n) for e in exprs for n in re.findall(r"\bvna_[a-z_]+", e)}
    return names


def test_dashboard_and_alerts_query_metrics_the_archive_exports(make_server: Factory, corpus: list[Path]) -> None:
    """Every metric in ops/observability is in a real scrape once the archive has done the work it measures."""
    import grpc as _grpc  # noqa: F401 - the gRPC API is part of the traffic

    from vna.api.client import VnaClient

    metrics_port, grpc_port, dead_syslog = free_port(), free_port(), free_port()
    srv = make_server(
        f"[telemetry]\nenabled = true\nprometheus_port = {metrics_port}\nstats_interval_seconds = 0.5\n"
        f"[grpc]\nenabled = true\nhost = \"127.0.0.1\"\nport = {grpc_port}\n"
        "[[grpc.token]]\nname = \"app\"\ntoken = \"s3cret-token-0123456789\"\nrole = \"write\"\n"
        "[lifecycle]\nenabled = true\nmin_age_days = 0\ninterval_seconds = 0.5\n"
        "[integrity]\nscrub_enabled = true\nscrub_interval_seconds = 0.5\n"
        f"[audit]\non_failure = \"buffer\"\nsyslog_host = \"127.0.0.1\"\nsyslog_port = {dead_syslog}\n"
        "syslog_protocol = \"tcp\"\n")
    small = [p for p in corpus if p.name.startswith("small-")]
    assert all(r.Status == 0 for r in scu.store(srv.port, small))
    ds = dcmread(small[0], stop_before_pixels=True)
    _, final, _ = scu.get(srv.port, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": ds.StudyInstanceUID},
                          [str(ds.SOPClassUID)])
    assert final.Status == 0
    with VnaClient(f"127.0.0.1:{grpc_port}", "s3cret-token-0123456789") as client:
        assert client.query_page("STUDY", {})[0]
    wanted = _dashboard_metrics()
    assert {"vna_ingest_instances_total", "vna_tier_placements", "vna_grpc_calls_total"} <= wanted
    deadline = time.monotonic() + 60
    while True:
        _, body = _scrape(metrics_port)
        exported = {re.sub(r"_(bucket|sum|count)$", "", line.split("{")[0].split(" ")[0])
                    for line in body.splitlines() if line.startswith("vna_")}
        missing = wanted - exported
        counted = re.search(r"^vna_index_instances (\S+)$", body, re.M)  # refreshed every 0.5 s
        if (not missing and counted and float(counted.group(1)) == len(small)) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not missing, f"queried by ops/observability but not exported: {sorted(missing)}"
    assert _sample(body, "vna_store_writable", '{store="hot-1"}') == 1
    assert _sample(body, "vna_index_instances") == len(small)
