"""Telemetry of the gRPC API: a server span per call (continuing the caller's trace), call counts and latency.

The caller's W3C ``traceparent`` metadata, when present, makes the call's span a
child of the calling span (another front-end or site); :func:`trace_metadata`
gives a client the metadata that carries its current span. Every call, refused
ones included, is counted in ``vna.grpc.calls`` by method and status code, and
timed in ``vna.grpc.duration``.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterator

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace

from vna.api.auth import handler_kind
from vna.telemetry import Telemetry

__all__ = ["ObservingInterceptor", "trace_metadata"]


def trace_metadata() -> list[tuple[str, str]]:
    """gRPC metadata carrying the current span (empty when no span is active or telemetry is off)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return list(carrier.items())


class ObservingInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    """Wraps every handler in a ``grpc.<Method>`` server span and records its outcome."""

    def __init__(self, telemetry: Telemetry) -> None:
        self.telemetry = telemetry

    def intercept_service(self, continuation: Callable[[Any], Any], handler_call_details: Any) -> Any:
        handler = continuation(handler_call_details)
        if handler is None or not self.telemetry.enabled:
            return handler
        method = str(handler_call_details.method)
        short = method.rsplit("/", 1)[-1]
        if method.startswith("/grpc.health."):
            return handler
        carrier = {k: v for k, v in (handler_call_details.invocation_metadata or ()) if isinstance(v, str)}
        kind = handler_kind(handler)
        behaviour: Callable[..., Any] = getattr(handler, kind)
        tel = self.telemetry

        def finish(span: trace.Span, context: Any, t0: float, failed: BaseException | None) -> None:
            code = _code(context, failed)
            span.set_attribute("rpc.grpc.status_code", code.value[0])
            if code is not grpc.StatusCode.OK:
                span.set_status(trace.Status(trace.StatusCode.ERROR, code.name))
            span.end()
            tel.grpc_calls.add(1, {"method": short, "code": code.name})
            tel.grpc_duration.record(time.perf_counter() - t0, {"method": short})

        def start(context: Any) -> tuple[trace.Span, float]:
            parent = propagate.extract(carrier)
            span = tel.tracer.start_span(f"grpc.{short}", context=parent, kind=trace.SpanKind.SERVER,
                                         attributes={"rpc.system": "grpc", "rpc.method": short,
                                                     "net.peer.name": str(context.peer())})
            return span, time.perf_counter()

        if handler.response_streaming:
            def run_stream(request: Any, context: Any) -> Iterator[Any]:
                span, t0 = start(context)
                failed: BaseException | None = None
                try:
                    with trace.use_span(span, end_on_exit=False):
                        items = behaviour(request, context)
                    while True:
                        token = otel_context.attach(trace.set_span_in_context(span))
                        try:
                            item = next(items)
                        except StopIteration:
                            return
                        finally:
                            otel_context.detach(token)
                        yield item
                except BaseException as exc:
                    failed = exc
                    raise
                finally:
                    finish(span, context, t0, failed)
            wrapped: Callable[..., Any] = run_stream
        else:
            def run_unary(request: Any, context: Any) -> Any:
                span, t0 = start(context)
                failed: BaseException | None = None
                try:
                    with trace.use_span(span, end_on_exit=False):
                        return behaviour(request, context)
                except BaseException as exc:
                    failed = exc
                    raise
                finally:
                    finish(span, context, t0, failed)
            wrapped = run_unary
        return handler._replace(**{kind: wrapped})


def _code(context: Any, failed: BaseException | None) -> grpc.StatusCode:
    """The call's status: the one the servicer set or aborted with; UNKNOWN for an unexpected exception."""
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(failed, GeneratorExit):
        return grpc.StatusCode.CANCELLED  # the client stopped reading a stream
    return grpc.StatusCode.OK if failed is None else grpc.StatusCode.UNKNOWN
