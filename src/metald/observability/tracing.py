"""OpenTelemetry traces over OTLP/HTTP: the adapter behind core/tracing.py.

Only this module (and billing.py beside it) imports OpenTelemetry: the layers report to the
tracing port, app.py installs an `OtelTracer` when UNKEY_METALD_OTEL_ENABLED is on. Spans go
to a batch processor whose thread exports them (protobuf over HTTP, `/v1/traces`), so the
event loop never waits for the collector, and a collector that is down costs dropped spans,
never a failed RPC.

The provider is this tracer's own (not OpenTelemetry's global one): a daemon, and each test,
has its own pipeline, and nothing else in the process can reconfigure it.

What a trace holds: one SERVER span per RPC (`<package.Service>/<Method>`, the rpc.*
attributes, the caller's W3C trace context honoured, the Connect code, an error status for
the codes that are the server's fault), the customer and VM ids (metald.customer_id,
metald.vm_id), and a child span for each step core/timing.py names (store, admission,
network and its stages, disks, ids, jailer and the helper's own steps, vmm_start, control,
tap, configure, sync, vmm.<verb> for the other RPCs) and each billing call.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from urllib.parse import urlsplit

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBasedTraceIdRatio
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from metald import __version__
from metald.core.tracing import Attributes

TRACES_PATH = "/v1/traces"

# Connect codes that are the server's fault: the span's status is ERROR (OpenTelemetry's RPC
# conventions for servers); the others (a caller's bad input, not_found, ...) leave it unset.
SERVER_FAULTS = frozenset(
    {"unknown", "deadline_exceeded", "unimplemented", "internal", "unavailable", "data_loss"}
)


def traces_url(endpoint: str) -> str:
    """UNKEY_METALD_OTEL_ENDPOINT to the URL spans are posted to: `host:port` (the existing
    metald's form, default localhost:4318) means http://host:port/v1/traces; a URL without
    a path gets /v1/traces; a URL with a path is used as it is."""
    endpoint = endpoint.strip()
    if "://" not in endpoint:
        endpoint = "http://" + endpoint
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"{endpoint!r} is not host:port or an http(s) URL")
    if parts.path in ("", "/"):
        return f"{parts.scheme}://{parts.netloc}{TRACES_PATH}"
    return endpoint


class _RpcSpan:
    def __init__(self, span: trace.Span, token: object) -> None:
        self._span = span
        self._token = token

    def end(self, code: str | None) -> None:
        span = self._span
        if code is not None:
            span.set_attribute("rpc.connect_rpc.error_code", code)
            if code in SERVER_FAULTS:
                span.set_status(Status(StatusCode.ERROR, code))
        span.end()
        otel_context.detach(self._token)  # type: ignore[arg-type]


class OtelTracer:
    """core.tracing.Tracer over an OpenTelemetry SDK pipeline of its own."""

    def __init__(
        self,
        *,
        endpoint: str,
        service_name: str,
        sampling_rate: float,
        exporter: SpanExporter | None = None,
    ) -> None:
        """`exporter`: where spans go (default: OTLP/HTTP protobuf to `endpoint`)."""
        if not 0.0 <= sampling_rate <= 1.0:
            raise ValueError(f"sampling rate {sampling_rate} is not between 0 and 1")
        self.url = traces_url(endpoint)
        resource = Resource.create({"service.name": service_name, "service.version": __version__})
        self._provider = TracerProvider(
            resource=resource, sampler=ParentBasedTraceIdRatio(sampling_rate)
        )
        self._provider.add_span_processor(
            BatchSpanProcessor(exporter or OTLPSpanExporter(endpoint=self.url, timeout=5))
        )
        self._tracer = self._provider.get_tracer("metald", __version__)
        self._propagator = TraceContextTextMapPropagator()

    def start_rpc(
        self,
        service: str,
        method: str,
        headers: Mapping[str, str],
        client_address: str | None,
    ) -> _RpcSpan:
        parent = self._propagator.extract(carrier=headers)
        attributes: dict[str, str | int] = {
            "rpc.system": "connect_rpc",
            "rpc.service": service,
            "rpc.method": method,
        }
        if client_address:
            host, _, port = client_address.rpartition(":")
            attributes["client.address"] = host.strip("[]") or client_address
            if port.isdigit():
                attributes["client.port"] = int(port)
        span = self._tracer.start_span(
            f"{service}/{method}", context=parent, kind=SpanKind.SERVER, attributes=attributes
        )
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        return _RpcSpan(span, token)

    def span(self, name: str, attributes: Attributes | None = None) -> AbstractContextManager[None]:
        return self._child(name, attributes)

    @contextmanager
    def _child(self, name: str, attributes: Attributes | None) -> Iterator[None]:
        with self._tracer.start_as_current_span(name, attributes=attributes):
            yield

    def record(
        self, name: str, start_ns: int, end_ns: int, attributes: Attributes | None = None
    ) -> None:
        span = self._tracer.start_span(name, start_time=start_ns, attributes=attributes)
        span.end(end_time=max(start_ns, end_ns))

    def set_attributes(self, attributes: Attributes) -> None:
        trace.get_current_span().set_attributes(attributes)

    def current_ids(self) -> tuple[str, str] | None:
        context = trace.get_current_span().get_span_context()
        if not context.is_valid:
            return None
        return format(context.trace_id, "032x"), format(context.span_id, "016x")

    def flush(self, timeout_millis: int = 5000) -> bool:
        return self._provider.force_flush(timeout_millis)

    def shutdown(self) -> None:
        self._provider.shutdown()
