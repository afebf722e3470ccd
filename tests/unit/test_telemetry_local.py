"""The instruments vna aggregates itself (vna.telemetry) against the OpenTelemetry SDK's own aggregation,
through real metric readers, and the spans made without a span processor."""

from __future__ import annotations

from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, MetricsData
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from vna.config import TelemetryConfig
from vna.telemetry import _SECONDS_BUCKETS, Telemetry, render_prometheus

VALUES = [0.0, 0.0005, 0.0007, 0.001, 0.003, 0.0049, 0.5, 2.0, 61.0, 1e-9, 0.25]


def _points(data: MetricsData | None, name: str) -> dict[frozenset[tuple[str, Any]], Any]:
    assert data is not None
    return {frozenset((p.attributes or {}).items()): p
            for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics if m.name == name
            for p in m.data.data_points}


@pytest.fixture
def tel() -> Any:
    reader = InMemoryMetricReader()
    t = Telemetry.setup(TelemetryConfig(enabled=True), metric_readers=[reader])
    t.reader = reader  # type: ignore[attr-defined]
    yield t
    t.shutdown()


def test_histogram_matches_the_sdk_aggregation(tel: Any) -> None:
    sdk_reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[sdk_reader])
    sdk_hist = provider.get_meter("ref").create_histogram(
        "vna.stage.duration", unit="s", explicit_bucket_boundaries_advisory=_SECONDS_BUCKETS)
    for v in VALUES:
        sdk_hist.record(v, {"stage": "ingest.hash"})
        tel.stage_duration.record(v, {"stage": "ingest.hash"})
    with tel.stage("ingest.parse"):
        pass
    with pytest.raises(KeyError), tel.stage("ingest.parse"):
        raise KeyError("a failed stage is timed too")

    data = tel.reader.get_metrics_data()
    ours = _points(data, "vna.stage.duration")[frozenset({("stage", "ingest.hash")})]
    ref = _points(sdk_reader.get_metrics_data(), "vna.stage.duration")[frozenset({("stage", "ingest.hash")})]
    provider.shutdown()
    assert list(ours.explicit_bounds) == list(ref.explicit_bounds)
    assert list(ours.bucket_counts) == list(ref.bucket_counts)
    assert (ours.count, ours.sum, ours.min, ours.max) == (ref.count, ref.sum, ref.min, ref.max)
    assert _points(data, "vna.stage.duration")[frozenset({("stage", "ingest.parse")})].count == 2


def test_counters_merge_attribute_orders_and_reach_every_reader(tel: Any) -> None:
    tel.dimse_operations.add(1, {"op": "c-store", "status": "0x0000"})
    tel.dimse_operations.add(2, {"status": "0x0000", "op": "c-store"})    # same series, other order
    tel.dimse_operations.add(1, {"op": "c-find", "status": "0xA900"})
    tel.ingest_bytes.add(10)
    tel.ingest_bytes.add(5)
    tel.ingest_bytes.add(-1)                 # a counter never decreases: ignored
    tel.ingest_bytes.add(float("nan"))       # ignored
    tel.dimse_associations_open.add(1)
    tel.dimse_associations_open.add(-1)
    tel.dimse_associations_open.add(1)
    tel.gauge("vna.test.gauge", "1", "an SDK observable gauge", lambda: [(7.0, {"k": "v"})])

    data = tel.reader.get_metrics_data()
    ops = _points(data, "vna.dimse.operations")
    assert {k: p.value for k, p in ops.items()} == {
        frozenset({("op", "c-store"), ("status", "0x0000")}): 3, frozenset({("op", "c-find"), ("status", "0xA900")}): 1}
    assert _points(data, "vna.ingest.bytes")[frozenset()].value == 15
    assert _points(data, "vna.dimse.associations.open")[frozenset()].value == 1
    assert _points(data, "vna.test.gauge")[frozenset({("k", "v")})].value == 7.0   # the SDK's own data kept

    text = render_prometheus(tel.reader.get_metrics_data())
    assert "# TYPE vna_dimse_operations_total counter" in text
    assert 'vna_dimse_operations_total{op="c-store",status="0x0000"} 3' in text
    assert "# TYPE vna_dimse_associations_open gauge" in text
    assert 'vna_test_gauge{k="v"} 7.0' in text


def test_prometheus_histogram_text(tel: Any) -> None:
    for v in (0.0003, 0.002, 0.002, 100.0):
        tel.dimse_duration.record(v, {"op": "c-store"})
    text = render_prometheus(tel.reader.get_metrics_data())
    assert 'vna_dimse_duration_seconds_bucket{op="c-store",le="0.0005"} 1' in text
    assert 'vna_dimse_duration_seconds_bucket{op="c-store",le="0.0025"} 3' in text
    assert 'vna_dimse_duration_seconds_bucket{op="c-store",le="60.0"} 3' in text
    assert 'vna_dimse_duration_seconds_bucket{op="c-store",le="+Inf"} 4' in text
    assert 'vna_dimse_duration_seconds_count{op="c-store"} 4' in text


def test_series_past_the_cardinality_limit_share_the_overflow_series(tel: Any, monkeypatch: Any) -> None:
    import vna.telemetry as t

    monkeypatch.setattr(t, "_CARDINALITY_LIMIT", 3)
    for i in range(5):
        tel.grpc_calls.add(1, {"method": f"m{i}", "code": "OK"})
    calls = _points(tel.reader.get_metrics_data(), "vna.grpc.calls")
    assert len(calls) == 4
    assert calls[frozenset({("otel.metric.overflow", True)})].value == 2


def test_spans_without_a_processor_carry_ids_and_parents(tel: Any) -> None:
    parent = tel.start_span("dimse.association")
    assert parent is not None and not parent.is_recording() and parent.get_span_context().is_valid
    with tel.span("dimse.c-store", parent=parent) as op, tel.span("ingest") as ingest:
        assert op is not None and ingest is not None
        ids = {s.get_span_context().span_id for s in (parent, op, ingest)}
        assert len(ids) == 3
        assert {s.get_span_context().trace_id for s in (parent, op, ingest)} == {
            parent.get_span_context().trace_id}
        assert trace.get_current_span() is ingest
        with tel.stage("ingest.hash"):
            assert trace.get_current_span() is ingest      # no span per stage without a processor
    assert not trace.get_current_span().get_span_context().is_valid
    with tel.span("alone") as alone:
        assert alone is not None and alone.get_span_context().trace_id != parent.get_span_context().trace_id


def test_spans_with_a_processor_record_exceptions() -> None:
    spans = InMemorySpanExporter()
    tel = Telemetry.setup(TelemetryConfig(enabled=True), span_exporter=spans)
    try:
        with pytest.raises(ValueError):
            with tel.span("outer"), tel.stage("ingest.index"):
                raise ValueError("boom")
        by_name = {s.name: s for s in spans.get_finished_spans()}
        assert set(by_name) == {"outer", "ingest.index"}
        inner, outer = by_name["ingest.index"], by_name["outer"]
        assert inner.parent is not None and inner.parent.span_id == outer.context.span_id
        for s in (inner, outer):
            assert not s.status.is_ok and s.status.description == "ValueError: boom"
            assert [e.name for e in s.events] == ["exception"]
    finally:
        tel.shutdown()
