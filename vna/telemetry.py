"""OpenTelemetry for vna, configured here and nowhere else.

:meth:`Telemetry.setup` turns a :class:`~vna.config.TelemetryConfig` into one
object holding a tracer, a meter and the archive's instruments. Disabled (the
default) every instrument is a do-nothing object and :meth:`Telemetry.span` /
:meth:`Telemetry.stage` return one shared null context manager: no clock
reads, no allocations on the hot path.

Enabled, it uses its own TracerProvider and MeterProvider (never the global
ones, so several archives can live in one process), and exports:

- OTLP/gRPC to ``otlp_endpoint`` (traces in batches, metrics every
  ``export_interval_seconds``);
- Prometheus text format on ``http://prometheus_host:prometheus_port/metrics``,
  rendered by :func:`render_prometheus` from an on-demand metric reader and
  served by a stdlib HTTP server (no extra dependency);
- log lines written inside a span end with ``trace_id=... span_id=...``.

Spans: ``dimse.association`` (one per association) > ``dimse.c-store`` /
``dimse.c-find`` / ``dimse.c-get`` / ``dimse.c-move`` / ``dimse.n-action`` /
``dimse.c-echo`` > ``ingest`` > ``ingest.receive`` (a C-STORE data set received,
spooled and hashed on the fast path) or ``ingest.hash`` (any other file) /
``ingest.parse`` / ``ingest.write`` (> ``storage.write`` per replica) / ``ingest.index``;
``retrieve.select``, ``retrieve.instance`` > ``retrieve.verify``; ``job.<name>``
per job run. Metric names are listed in :data:`METRICS`.

Cost on the ingest path (a dozen instrument calls and one span per C-STORE when
nothing exports spans; ``inner`` spans such as ``ingest`` are then skipped):
the instruments of :data:`METRICS` aggregate in this module (a dict lookup and
an add under a lock, ~1 µs) instead of going through the SDK's measurement
pipeline (~30 µs a call); every metric reader of the MeterProvider receives
them with the SDK's own metrics at each collection, always with cumulative
temporality and without exemplars. Spans nothing exports are made directly as
non-recording spans (ids for logs and propagation), stages are plain classes
rather than generator context managers.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import random
import re
import socket
import threading
import time
from bisect import bisect_left
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, Protocol, Sequence

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.metrics import CallbackOptions, Observation

from vna.config import TelemetryConfig
from vna.errors import ConfigError

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import Metric, MetricReader, MetricsData
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

    from vna.jobs import JobReport

__all__ = ["Telemetry", "METRICS", "render_prometheus", "Attributes"]

log = logging.getLogger(__name__)

Attributes = Mapping[str, str | int | float | bool]

#: Latency buckets in seconds (the SDK default assumes milliseconds).
_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

#: name -> (kind, unit, description). Kinds: counter, updown, histogram.
METRICS: dict[str, tuple[str, str, str]] = {
    "vna.ingest.instances": ("counter", "{instance}", "instances ingested, by outcome (stored, duplicate, failed)"),
    "vna.ingest.bytes": ("counter", "By", "bytes of instances stored (new versions only)"),
    "vna.retrieve.instances": ("counter", "{instance}", "instances handed out verified for C-GET/C-MOVE, by op"),
    "vna.retrieve.bytes": ("counter", "By", "bytes of instances handed out verified, by op"),
    "vna.stage.duration": ("histogram", "s", "latency of one stage (ingest.hash, storage.write, ingest.index...)"),
    "vna.dimse.operations": ("counter", "{operation}", "DIMSE operations answered, by op and final status"),
    "vna.dimse.duration": ("histogram", "s", "DIMSE operation latency, by op"),
    "vna.dimse.associations": ("counter", "{association}", "association requests, by result"),
    "vna.dimse.associations.open": ("updown", "{association}", "associations open now"),
    "vna.job.runs": ("counter", "{run}", "job runs, by job and outcome"),
    "vna.job.items": ("counter", "{item}", "job items, by job and kind (examined, done, findings, failures)"),
    "vna.job.bytes": ("counter", "By", "bytes a job moved, verified or freed, by job"),
    "vna.job.duration": ("histogram", "s", "job run latency, by job"),
    "vna.lifecycle.studies": ("counter", "{study}", "studies migrated to the cold tier, by outcome"),
    "vna.audit.records": ("counter", "{record}", "audit records written, by event id"),
    "vna.audit.failures": ("counter", "{failure}", "audit write or forward failures, by sink"),
    "vna.grpc.calls": ("counter", "{call}", "gRPC calls answered, by method and status code"),
    "vna.grpc.duration": ("histogram", "s", "gRPC call latency (streams: until the last message), by method"),
}


#: The attribute items of one metric series, as ``add_key``/``record_key`` take them.
SeriesKey = tuple[tuple[str, str | int | float | bool], ...]


class _Noop:
    """Stands in for every instrument when telemetry is disabled."""

    def add(self, amount: float, attributes: Attributes | None = None) -> None:
        """Do nothing."""

    def add_key(self, amount: float, key: SeriesKey) -> None:
        """Do nothing."""

    def record(self, amount: float, attributes: Attributes | None = None) -> None:
        """Do nothing."""

    def record_key(self, amount: float, key: SeriesKey) -> None:
        """Do nothing."""


class _Counting(Protocol):
    def add(self, amount: float, attributes: Attributes | None = None) -> None: ...
    def add_key(self, amount: float, key: SeriesKey) -> None: ...


class _Recording(Protocol):
    def record(self, amount: float, attributes: Attributes | None = None) -> None: ...
    def record_key(self, amount: float, key: SeriesKey) -> None: ...


def series_key(attributes: Mapping[str, Any] | None) -> SeriesKey:
    """The attributes of a metric series as ``add_key``/``record_key`` take them (hot callers build it once).

    Values must be hashable (str, int, float, bool)."""
    return tuple(attributes.items()) if attributes else ()


_NOOP = _Noop()
_NEW_TRACE_FLAGS = trace.TraceFlags(trace.TraceFlags.DEFAULT | trace.TraceFlags.RANDOM_TRACE_ID)
_UNSAMPLED_FLAGS = trace.TraceFlags(trace.TraceFlags.DEFAULT)
_NULL_CM: AbstractContextManager[None] = nullcontext()

#: Series per instrument beyond which new attribute sets share one overflow series (as the SDK does).
_CARDINALITY_LIMIT = 2000
_OVERFLOW: SeriesKey = (("otel.metric.overflow", True),)


class _SumSeries:
    __slots__ = ("start", "value")

    def __init__(self, start: int) -> None:
        self.start = start
        self.value: float = 0


class _HistogramSeries:
    __slots__ = ("start", "counts", "count", "sum", "min", "max")

    def __init__(self, start: int, buckets: int) -> None:
        self.start = start
        self.counts = [0] * buckets
        self.count = 0
        self.sum: float = 0
        self.min = math.inf
        self.max = -math.inf


class _Local:
    """An instrument aggregated in this process; the readers get its series at each collection.

    Thread-safe. Attribute values must be hashable (str, int, float, bool).
    A non-finite amount is ignored with a warning, like the SDK does.
    """

    def __init__(self, name: str, unit: str, description: str) -> None:
        self.name, self.unit, self.description = name, unit, description
        self._lock = threading.Lock()
        self._series: dict[SeriesKey, Any] = {}     # sorted attribute items -> series
        self._alias: dict[SeriesKey, Any] = {}      # attribute items as given -> the same series

    def _new(self, start: int) -> Any:
        raise NotImplementedError

    def _lookup(self, key: SeriesKey) -> Any:
        """The series of ``key`` (lock held): created on first use, the overflow series past the limit."""
        norm = tuple(sorted(key))
        series = self._series.get(norm)
        if series is None:
            if len(self._series) >= _CARDINALITY_LIMIT:
                norm = _OVERFLOW
                series = self._series.get(norm)
            if series is None:
                series = self._series[norm] = self._new(time.time_ns())
        if norm is not _OVERFLOW:
            self._alias[key] = series
        return series

    def _points(self, now: int) -> list[Any]:
        raise NotImplementedError


class _Sum(_Local):
    """A counter (monotonic: negative amounts are ignored with a warning) or an up-down counter."""

    def __init__(self, name: str, unit: str, description: str, monotonic: bool) -> None:
        super().__init__(name, unit, description)
        self.monotonic = monotonic

    def _new(self, start: int) -> _SumSeries:
        return _SumSeries(start)

    def add(self, amount: float, attributes: Attributes | None = None) -> None:
        """Add ``amount`` to the series of ``attributes``."""
        self.add_key(amount, series_key(attributes))

    def add_key(self, amount: float, key: SeriesKey) -> None:
        """:meth:`add` with the attribute items already a tuple (pre-built by hot callers)."""
        if not -math.inf < amount < math.inf or (amount < 0 and self.monotonic):
            log.warning("metric %s: amount %r ignored", self.name, amount)
            return
        with self._lock:
            series = self._alias.get(key) or self._lookup(key)
            series.value += amount

    def _points(self, now: int) -> list[Any]:
        from opentelemetry.sdk.metrics.export import NumberDataPoint

        with self._lock:
            snap = [(dict(k), s.start, s.value) for k, s in self._series.items()]
        return [NumberDataPoint(attributes=a, start_time_unix_nano=start, time_unix_nano=now, value=v)
                for a, start, v in snap]


class _Histogram(_Local):
    """An explicit-bucket histogram (bucket ``i`` counts values ``<= bounds[i]``, as in the SDK)."""

    def __init__(self, name: str, unit: str, description: str, bounds: Sequence[float]) -> None:
        super().__init__(name, unit, description)
        self.bounds = tuple(float(b) for b in bounds)

    def _new(self, start: int) -> _HistogramSeries:
        return _HistogramSeries(start, len(self.bounds) + 1)

    def record(self, amount: float, attributes: Attributes | None = None) -> None:
        """Count ``amount`` (>= 0) in the series of ``attributes``."""
        self.record_key(amount, series_key(attributes))

    def record_key(self, amount: float, key: SeriesKey) -> None:
        """:meth:`record` with the attribute items already a tuple (pre-built by hot callers)."""
        if not 0 <= amount < math.inf:
            log.warning("metric %s: amount %r ignored", self.name, amount)
            return
        i = bisect_left(self.bounds, amount)
        with self._lock:
            s = self._alias.get(key) or self._lookup(key)
            s.counts[i] += 1
            s.count += 1
            s.sum += amount
            if amount < s.min:
                s.min = amount
            if amount > s.max:
                s.max = amount

    def _points(self, now: int) -> list[Any]:
        from opentelemetry.sdk.metrics.export import HistogramDataPoint

        with self._lock:
            snap = [(dict(k), s.start, s.count, s.sum, list(s.counts), s.min, s.max) for k, s in self._series.items()]
        return [HistogramDataPoint(attributes=a, start_time_unix_nano=start, time_unix_nano=now, count=count,
                                   sum=total, bucket_counts=counts, explicit_bounds=self.bounds, min=lo, max=hi)
                for a, start, count, total, counts, lo, hi in snap]


def _local_metrics(instruments: Iterable[_Local]) -> list[Metric]:
    """The series of every instrument that has one, as SDK metric data (cumulative)."""
    from opentelemetry.sdk.metrics.export import AggregationTemporality, Histogram, Metric, Sum

    now = time.time_ns()
    out: list[Metric] = []
    for inst in instruments:
        points = inst._points(now)
        if not points:
            continue
        data: Any
        if isinstance(inst, _Histogram):
            data = Histogram(data_points=points, aggregation_temporality=AggregationTemporality.CUMULATIVE)
        else:
            data = Sum(data_points=points, aggregation_temporality=AggregationTemporality.CUMULATIVE,
                       is_monotonic=isinstance(inst, _Sum) and inst.monotonic)
        out.append(Metric(name=inst.name, description=inst.description, unit=inst.unit, data=data))
    return out


def _merged(data: MetricsData | None, extra: list[Metric], resource: Resource, scope_name: str
            ) -> MetricsData | None:
    """``data`` with ``extra`` appended to the metrics of scope ``scope_name`` (a new scope if absent)."""
    from opentelemetry.sdk.metrics.export import MetricsData, ResourceMetrics, ScopeMetrics
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

    if not extra:
        return data
    if data is None or not data.resource_metrics:
        scope = ScopeMetrics(scope=InstrumentationScope(scope_name), metrics=extra, schema_url="")
        return MetricsData(resource_metrics=[ResourceMetrics(resource=resource, scope_metrics=[scope],
                                                             schema_url=resource.schema_url)])
    first, *rest = data.resource_metrics
    scopes = list(first.scope_metrics)
    for i, sm in enumerate(scopes):
        if sm.scope.name == scope_name:
            scopes[i] = ScopeMetrics(scope=sm.scope, metrics=[*sm.metrics, *extra], schema_url=sm.schema_url)
            break
    else:
        scopes.append(ScopeMetrics(scope=InstrumentationScope(scope_name), metrics=extra, schema_url=""))
    return MetricsData(resource_metrics=[ResourceMetrics(resource=first.resource, scope_metrics=scopes,
                                                         schema_url=first.schema_url), *rest])


class _Stage:
    """Times a block into ``vna.stage.duration`` (one sample on exit, exception or not)."""

    __slots__ = ("hist", "key", "t0")

    def __init__(self, hist: _Histogram, key: SeriesKey) -> None:
        self.hist, self.key = hist, key

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.hist.record_key(time.perf_counter() - self.t0, self.key)


class _CurrentSpan:
    """Makes ``span`` current for the block and ends it after, recording an exception like the SDK does."""

    __slots__ = ("span", "token")

    def __init__(self, span: trace.Span) -> None:
        self.span = span

    def __enter__(self) -> trace.Span:
        self.token = otel_context.attach(trace.set_span_in_context(self.span))
        return self.span

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        otel_context.detach(self.token)
        span = self.span
        if isinstance(ev, Exception) and span.is_recording():
            span.record_exception(ev)
            span.set_status(trace.Status(trace.StatusCode.ERROR, f"{type(ev).__name__}: {ev}"))
        span.end()


class _SpanStage:
    """A stage that is also a span (a span exporter is configured)."""

    __slots__ = ("span", "stage")

    def __init__(self, span: _CurrentSpan, stage: _Stage) -> None:
        self.span, self.stage = span, stage

    def __enter__(self) -> trace.Span:
        span = self.span.__enter__()
        self.stage.__enter__()
        return span

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        try:
            self.stage.__exit__(et, ev, tb)
        finally:
            self.span.__exit__(et, ev, tb)


class _TraceFormatter(logging.Formatter):
    """Appends the current trace and span id to a handler's formatted line."""

    def __init__(self, inner: logging.Formatter | None) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        text = self.inner.format(record)
        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            text += f" trace_id={ctx.trace_id:032x} span_id={ctx.span_id:016x}"
        return text


@dataclass
class JobRun:
    """Filled in by the job inside :meth:`Telemetry.job`."""

    report: JobReport | None = None


class Telemetry:
    """Tracer, meter and the archive's instruments (see module docstring). Shut it down when done."""

    def __init__(
        self,
        cfg: TelemetryConfig,
        *,
        span_exporter: SpanExporter | None = None,
        metric_readers: Sequence[MetricReader] = (),
    ) -> None:
        self.cfg = cfg
        self.enabled = cfg.enabled
        self._tracer_provider: TracerProvider | None = None
        self._meter_provider: MeterProvider | None = None
        self._prometheus: Any = None          # InMemoryMetricReader when the endpoint is configured
        self._http: ThreadingHTTPServer | None = None
        self._formatted: list[tuple[logging.Handler, logging.Formatter | None]] = []
        self._lock = threading.Lock()
        self.endpoint_port: int | None = None
        self._stage_spans = False             # stages are spans only when some processor receives spans
        self._stage_keys: dict[str, SeriesKey] = {}
        self._local: list[_Local] = []
        self._stage_hist: _Histogram
        if not self.enabled:
            self.tracer: trace.Tracer = trace.NoOpTracer()
            for name in METRICS:
                setattr(self, _attr(name), _NOOP)
            return
        self._setup(span_exporter, metric_readers)

    # -- construction -------------------------------------------------------
    @classmethod
    def setup(cls, cfg: TelemetryConfig, **kwargs: Any) -> "Telemetry":
        """Build the telemetry of one process from its config (``kwargs``: test exporters/readers)."""
        return cls(cfg, **kwargs)

    @classmethod
    def disabled(cls) -> "Telemetry":
        """A no-op instance (for services built without an archive)."""
        return cls(TelemetryConfig(enabled=False))

    def _setup(self, span_exporter: SpanExporter | None, metric_readers: Sequence[MetricReader]) -> None:
        from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter, MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader, PeriodicExportingMetricReader
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
        from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased, TraceIdRatioBased

        cfg = self.cfg
        resource = Resource.create({"service.name": cfg.service_name,
                                    "service.instance.id": f"{socket.gethostname()}:{os.getpid()}"})
        readers: list[MetricReader] = list(metric_readers)
        span_processors: list[Any] = []
        if span_exporter is not None:
            span_processors.append(SimpleSpanProcessor(span_exporter))
        if cfg.otlp_endpoint:
            otlp_spans, otlp_metrics = _otlp_exporters(cfg.otlp_endpoint)
            span_processors.append(BatchSpanProcessor(otlp_spans))
            readers.append(PeriodicExportingMetricReader(
                otlp_metrics, export_interval_millis=cfg.export_interval_seconds * 1000.0))
        if cfg.prometheus_port:
            self._prometheus = InMemoryMetricReader()
            readers.append(self._prometheus)
        # Spans nobody exports are not recorded (they still carry trace ids for logs and
        # propagation): recording them costs a measurable share of the ingest path's CPU.
        sampler = ParentBased(TraceIdRatioBased(cfg.trace_sample_ratio)) if span_processors else ALWAYS_OFF
        self._tracer_provider = TracerProvider(resource=resource, sampler=sampler)
        for proc in span_processors:
            self._tracer_provider.add_span_processor(proc)
        self._stage_spans = bool(span_processors)
        # the instruments of METRICS aggregate here (see the module docstring); the SDK keeps the
        # observable gauges, and every reader gets both at each collection
        local: list[_Local] = []
        for name, (kind, unit, desc) in METRICS.items():
            inst: _Local = (_Histogram(name, unit, desc, _SECONDS_BUCKETS) if kind == "histogram"
                            else _Sum(name, unit, desc, monotonic=kind == "counter"))
            local.append(inst)
            setattr(self, _attr(name), inst)
        self._local = local
        self._stage_hist = next(i for i in local if isinstance(i, _Histogram) and i.name == "vna.stage.duration")
        self._meter_provider = MeterProvider(resource=resource, metric_readers=readers,
                                             exemplar_filter=AlwaysOffExemplarFilter())
        for reader in readers:
            _merge_into(reader, local, resource)
        self.tracer = self._tracer_provider.get_tracer("vna")
        self._meter = self._meter_provider.get_meter("vna")
        self._install_log_formatter()

    # -- instruments (set in __init__; typed here for mypy) ------------------
    ingest_instances: _Counting
    ingest_bytes: _Counting
    retrieve_instances: _Counting
    retrieve_bytes: _Counting
    stage_duration: _Recording
    dimse_operations: _Counting
    dimse_duration: _Recording
    dimse_associations: _Counting
    dimse_associations_open: _Counting
    job_runs: _Counting
    job_items: _Counting
    job_bytes: _Counting
    job_duration: _Recording
    lifecycle_studies: _Counting
    audit_records: _Counting
    audit_failures: _Counting
    grpc_calls: _Counting
    grpc_duration: _Recording

    def gauge(self, name: str, unit: str, description: str,
              callback: Callable[[], Iterable[tuple[float, Attributes]]]) -> None:
        """Register an observable gauge whose values ``callback`` returns at collection time."""
        if not self.enabled:
            return

        def observe(_options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(v, dict(a)) for v, a in callback()]

        self._meter.create_observable_gauge(name, callbacks=[observe], unit=unit, description=description)

    # -- spans ------------------------------------------------------------------
    def span(self, name: str, attributes: Attributes | None = None, *,
             parent: trace.Span | None = None, kind: trace.SpanKind = trace.SpanKind.INTERNAL,
             start_ns: int | None = None, inner: bool = False) -> AbstractContextManager[trace.Span | None]:
        """A span made current for the block (child of ``parent`` if given, else of the current span).

        ``start_ns`` (``time.time_ns()``): when the work began, if before the
        block (e.g. receiving the data set the block stores); default now.
        An exception leaving the block is recorded on the span and sets its
        status to ERROR (as the SDK's ``start_as_current_span`` does).
        ``inner``: the span only details a trace; without a span exporter it is
        not made while another span is current (whose ids the log lines carry),
        and the block gets None.
        """
        if not self.enabled:
            return _NULL_CM
        if inner and not self._stage_spans and trace.get_current_span().get_span_context().is_valid:
            return _NULL_CM
        return _CurrentSpan(self._new_span(name, attributes, parent, kind, start_ns))

    def start_span(self, name: str, attributes: Attributes | None = None,
                   kind: trace.SpanKind = trace.SpanKind.INTERNAL, *,
                   parent: trace.Span | None = None) -> trace.Span | None:
        """A span the caller ends (not made current): e.g. one per association (child of ``parent``)."""
        if not self.enabled:
            return None
        return self._new_span(name, attributes, parent, kind)

    def _new_span(self, name: str, attributes: Attributes | None, parent: trace.Span | None,
                  kind: trace.SpanKind, start_ns: int | None = None) -> trace.Span:
        """A started span; without a span processor a non-recording one made here, as the SDK would make it."""
        if self._stage_spans:
            ctx = trace.set_span_in_context(parent) if parent is not None else None
            return self.tracer.start_span(name, context=ctx, attributes=attributes, kind=kind, start_time=start_ns)
        up = (parent if parent is not None else trace.get_current_span()).get_span_context()
        span_id = random.getrandbits(64) or 1
        if up.is_valid:
            flags = _NEW_TRACE_FLAGS if up.trace_flags.random_trace_id else _UNSAMPLED_FLAGS
            sc = trace.SpanContext(up.trace_id, span_id, False, flags, up.trace_state)
        else:
            sc = trace.SpanContext(random.getrandbits(128) or 1, span_id, False, _NEW_TRACE_FLAGS)
        return trace.NonRecordingSpan(sc)

    def stage(self, name: str, attributes: Attributes | None = None) -> AbstractContextManager[Any]:
        """A span plus one ``vna.stage.duration`` sample (attribute ``stage=name``).

        Without a span exporter only the sample is taken (the span would be dropped).
        """
        if not self.enabled:
            return _NULL_CM
        stage = _Stage(self._stage_hist, self._stage_key(name))
        if not self._stage_spans:
            return stage
        return _SpanStage(_CurrentSpan(self._new_span(name, attributes, None, trace.SpanKind.INTERNAL)), stage)

    def stage_done(self, name: str, start_ns: int, end_ns: int, attributes: Attributes | None = None) -> None:
        """A stage that has already run, from ``start_ns`` to ``end_ns`` (``time.time_ns()``).

        Like :meth:`stage`: one ``vna.stage.duration`` sample and, with a span
        exporter, a span (child of the current one) with those start and end times.
        """
        if not self.enabled:
            return
        self._stage_hist.record_key(max(end_ns - start_ns, 0) / 1e9, self._stage_key(name))
        if self._stage_spans:
            self._new_span(name, attributes, None, trace.SpanKind.INTERNAL, start_ns).end(end_time=end_ns)

    def _stage_key(self, name: str) -> SeriesKey:
        """The attribute items of stage ``name``'s ``vna.stage.duration`` series (built once per name)."""
        key = self._stage_keys.get(name)
        if key is None:
            key = self._stage_keys.setdefault(name, series_key({"stage": name}))
        return key

    def job(self, name: str) -> AbstractContextManager[JobRun]:
        """Wrap one job run: a ``job.<name>`` span and the job metrics from the report set on the JobRun."""
        if not self.enabled:
            return nullcontext(JobRun())
        return self._job(name)

    @contextmanager
    def _job(self, name: str) -> Iterator[JobRun]:
        run = JobRun()
        t0 = time.perf_counter()
        outcome = "error"
        with self.tracer.start_as_current_span(f"job.{name}", attributes={"vna.job": name}) as span:
            try:
                yield run
                r = run.report
                if r is not None:
                    outcome = "failures" if r.failures else "findings" if r.findings else "clean"
                    for kind in ("examined", "done", "findings", "failures"):
                        value = int(getattr(r, kind))
                        span.set_attribute(f"vna.job.{kind}", value)
                        if value:
                            self.job_items.add(value, {"job": name, "kind": kind})
                    if r.bytes and not r.dry_run:
                        self.job_bytes.add(r.bytes, {"job": name})
                else:
                    outcome = "clean"
            finally:
                self.job_runs.add(1, {"job": name, "outcome": outcome})
                self.job_duration.record(time.perf_counter() - t0, {"job": name})

    # -- logs -----------------------------------------------------------------
    def _install_log_formatter(self) -> None:
        for handler in logging.getLogger().handlers:
            if isinstance(handler.formatter, _TraceFormatter):
                continue
            self._formatted.append((handler, handler.formatter))
            handler.setFormatter(_TraceFormatter(handler.formatter))

    def _remove_log_formatter(self) -> None:
        for handler, original in self._formatted:
            handler.setFormatter(original)
        self._formatted.clear()

    # -- Prometheus ---------------------------------------------------------------
    def render_metrics(self) -> str:
        """The current metrics in Prometheus text format ("" without a Prometheus endpoint)."""
        if self._prometheus is None:
            return ""
        return render_prometheus(self._prometheus.get_metrics_data())

    def start_endpoint(self, attempts: int = 16) -> int | None:
        """Serve ``/metrics`` on the configured port (idempotent); returns the port, None if not configured.

        When the port is taken (another worker process of the same server
        holds it) the next ones are tried, up to ``attempts``; the port used is logged.
        """
        if self._prometheus is None:
            return None
        with self._lock:
            if self._http is not None:
                return self.endpoint_port
            render = self.render_metrics
            last: OSError | None = None
            for port in range(self.cfg.prometheus_port, min(self.cfg.prometheus_port + attempts, 65536)):
                try:
                    self._http = _MetricsServer((self.cfg.prometheus_host, port), _handler(render))
                    break
                except OSError as exc:
                    if exc.errno != errno.EADDRINUSE:
                        raise
                    last = exc
            if self._http is None:
                raise ConfigError(f"telemetry.prometheus_port: no free port from {self.cfg.prometheus_port}: {last}")
            self.endpoint_port = int(self._http.server_address[1])
            threading.Thread(target=self._http.serve_forever, name="vna-metrics", daemon=True).start()
        log.info("Prometheus metrics on http://%s:%d/metrics", self.cfg.prometheus_host, self.endpoint_port)
        return self.endpoint_port

    def stop_endpoint(self) -> None:
        """Stop serving ``/metrics`` (idempotent)."""
        with self._lock:
            http, self._http = self._http, None
        if http is not None:
            http.shutdown()
            http.server_close()

    def shutdown(self) -> None:
        """Flush exporters, stop the endpoint, restore log formatters. Idempotent."""
        self.stop_endpoint()
        self._remove_log_formatter()
        tp, mp = self._tracer_provider, self._meter_provider
        self._tracer_provider = self._meter_provider = None
        if tp is not None:
            tp.shutdown()
        if mp is not None:
            mp.shutdown()


def _merge_into(reader: MetricReader, local: list[_Local], resource: Resource) -> None:
    """Make ``reader`` receive the series of ``local`` with the SDK's at every collection.

    Wraps the collect callback the MeterProvider installed on the reader (the
    one hook through which every reader, pull or push, gets its data).
    """
    sdk_collect = getattr(reader, "_collect", None)
    if sdk_collect is None:  # pragma: no cover - a different SDK layout
        raise ConfigError(f"telemetry: cannot attach to the metric reader {type(reader).__name__}")

    def collect(r: MetricReader, timeout_millis: float = 10_000) -> MetricsData | None:
        return _merged(sdk_collect(r, timeout_millis=timeout_millis), _local_metrics(local), resource, "vna")

    reader._collect = collect  # type: ignore[assignment]  # the SDK annotates it loosely


def _attr(metric: str) -> str:
    return metric.removeprefix("vna.").replace(".", "_")


def _otlp_exporters(endpoint: str) -> tuple[Any, Any]:
    try:
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    except ImportError as exc:  # pragma: no cover - a dependency of vna
        raise ConfigError(f"telemetry.otlp_endpoint needs opentelemetry-exporter-otlp-proto-grpc: {exc}") from exc
    insecure = endpoint.startswith("http://")
    return OTLPSpanExporter(endpoint=endpoint, insecure=insecure), OTLPMetricExporter(endpoint=endpoint,
                                                                                      insecure=insecure)


# -- Prometheus text format ----------------------------------------------------------

class _MetricsServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def _handler(render: Callable[[], str]) -> type[BaseHTTPRequestHandler]:
    class MetricsHandler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if self.path.split("?")[0] not in ("/metrics", "/"):
                self.send_error(404)
                return
            body = render().encode("utf-8")
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature of the base class
            log.debug("metrics scrape from %s: " + format, self.client_address[0], *args)

    return MetricsHandler


_NAME_BAD = re.compile(r"[^a-zA-Z0-9_:]")
_UNIT_SUFFIX = {"s": "_seconds", "By": "_bytes"}


def _prom_name(name: str, unit: str) -> str:
    out = _NAME_BAD.sub("_", name)
    suffix = _UNIT_SUFFIX.get(unit, "")
    if suffix and not out.endswith(suffix):
        out += suffix
    return out


def _prom_value(v: float) -> str:
    if isinstance(v, int):
        return str(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


def _labels(attrs: Mapping[str, Any] | None, extra: tuple[str, str] | None = None) -> str:
    items = [(_NAME_BAD.sub("_", str(k)), str(v)) for k, v in sorted((attrs or {}).items())]
    if extra is not None:
        items.append(extra)
    if not items:
        return ""
    return "{" + ",".join(f'{k}="{_esc(v)}"' for k, v in items) + "}"


def _esc(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render_prometheus(data: MetricsData | None) -> str:
    """OpenTelemetry metrics data as Prometheus text exposition format 0.0.4 (cumulative).

    Monotonic sums become counters (``_total``), other sums and gauges gauges,
    histograms ``_bucket``/``_sum``/``_count``. Units ``s`` and ``By`` become
    ``_seconds`` / ``_bytes`` suffixes.
    """
    from opentelemetry.sdk.metrics.export import Gauge, Histogram, Sum

    lines: list[str] = []
    if data is None:
        return ""
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                base = _prom_name(m.name, m.unit or "")
                desc = (m.description or "").replace("\\", "\\\\").replace("\n", "\\n")
                agg = m.data
                if isinstance(agg, Sum) and agg.is_monotonic:
                    name = base if base.endswith("_total") else base + "_total"
                    lines += [f"# HELP {name} {desc}", f"# TYPE {name} counter"]
                    lines += [f"{name}{_labels(p.attributes)} {_prom_value(p.value)}" for p in agg.data_points]
                elif isinstance(agg, (Sum, Gauge)):
                    lines += [f"# HELP {base} {desc}", f"# TYPE {base} gauge"]
                    lines += [f"{base}{_labels(p.attributes)} {_prom_value(p.value)}" for p in agg.data_points]
                elif isinstance(agg, Histogram):
                    lines += [f"# HELP {base} {desc}", f"# TYPE {base} histogram"]
                    for p in agg.data_points:
                        cumulative = 0
                        for bound, count in zip(p.explicit_bounds, p.bucket_counts):
                            cumulative += count
                            lines.append(f"{base}_bucket{_labels(p.attributes, ('le', _prom_value(float(bound))))} "
                                         f"{cumulative}")
                        lines.append(f"{base}_bucket{_labels(p.attributes, ('le', '+Inf'))} {p.count}")
                        lines.append(f"{base}_sum{_labels(p.attributes)} {_prom_value(p.sum)}")
                        lines.append(f"{base}_count{_labels(p.attributes)} {p.count}")
    return "\n".join(lines) + "\n" if lines else ""
