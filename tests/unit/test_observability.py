"""Traces, call context, JSON logs and security events, over the real API on fakes.

The tracer is the real adapter (observability/tracing.py) with an in-memory exporter in
place of OTLP/HTTP (tests/e2e/test_traces_logs.py sends real OTLP to a real receiver); the
API is the real Connect stack on fakes (tests/fakes/daemon.py), called over HTTP with httpx.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import httpx
import pytest
from fakes.daemon import FakeDaemon, build_fake_daemon, serve_fake_daemon
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from metald.core import callcontext, timing, tracing
from metald.core.metering import UsageRecord
from metald.observability import logs
from metald.observability.billing import TracedBilling
from metald.observability.tracing import OtelTracer, traces_url

SERVICE = "vmprovisioner.v1.VmService"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_SPAN}-01"


@pytest.mark.parametrize(
    ("endpoint", "url"),
    [
        ("localhost:4318", "http://localhost:4318/v1/traces"),
        ("127.0.0.1:9999", "http://127.0.0.1:9999/v1/traces"),
        ("http://collector:4318", "http://collector:4318/v1/traces"),
        ("https://collector/", "https://collector/v1/traces"),
        ("http://collector:4318/custom/path", "http://collector:4318/custom/path"),
    ],
)
def test_the_endpoint_becomes_the_traces_url(endpoint: str, url: str) -> None:
    assert traces_url(endpoint) == url


@pytest.mark.parametrize("endpoint", ["ftp://x:1", "http://", ""])
def test_a_bad_endpoint_is_refused(endpoint: str) -> None:
    with pytest.raises(ValueError, match="not host:port"):
        traces_url(endpoint)


class Traced:
    def __init__(self, sampling_rate: float = 1.0) -> None:
        self.exporter = InMemorySpanExporter()
        self.tracer = OtelTracer(
            endpoint="localhost:4318",
            service_name="metald-test",
            sampling_rate=sampling_rate,
            exporter=self.exporter,
        )

    def spans(self) -> list[ReadableSpan]:
        assert self.tracer.flush()
        return list(self.exporter.get_finished_spans())

    def named(self, name: str) -> list[ReadableSpan]:
        return [s for s in self.spans() if s.name == name]


@pytest.fixture
def traced() -> Iterator[Traced]:
    t = Traced()
    with tracing.installed(t.tracer):
        yield t
    t.tracer.shutdown()


def _children(spans: Sequence[ReadableSpan], parent: ReadableSpan) -> list[str]:
    assert parent.context is not None
    return [
        s.name for s in spans if s.parent is not None and s.parent.span_id == parent.context.span_id
    ]


def test_steps_laps_and_measured_steps_are_nested_spans(traced: Traced) -> None:
    with tracing.span("op"), timing.collecting() as times:
        with timing.step("network"):
            timing.lap("network.netns")
            timing.lap("network.veth")
        with timing.step("jailer"):
            pass
        timing.record_run([("jailer.mount", 0.002), ("jailer.exec", 0.003)])
    spans = traced.spans()
    by_name = {s.name: s for s in spans}
    assert _children(spans, by_name["op"]) == ["network", "jailer", "jailer.mount", "jailer.exec"]
    assert sorted(_children(spans, by_name["network"])) == ["network.netns", "network.veth"]
    # The helper's steps are laid back to back with their measured lengths.
    mount, exec_ = by_name["jailer.mount"], by_name["jailer.exec"]
    assert mount.end_time == exec_.start_time
    assert mount.end_time is not None and mount.start_time is not None
    assert mount.end_time - mount.start_time == 2_000_000
    # The timers still add up as before.
    assert set(times.steps) == {"network", "network.netns", "network.veth", "jailer"} | {
        "jailer.mount",
        "jailer.exec",
    }


def test_without_a_tracer_steps_only_time() -> None:
    assert tracing.active() is None
    with timing.collecting() as times, timing.step("store"):
        pass
    assert list(times.steps) == ["store"]
    with timing.step("outside"):  # neither a collection nor a tracer: nothing at all
        pass
    assert tracing.current_ids() is None


def test_a_failing_step_is_an_error_span(traced: Traced) -> None:
    with pytest.raises(RuntimeError), timing.step("vmm.boot"):
        raise RuntimeError("no")
    (span,) = traced.named("vmm.boot")
    assert span.status.status_code is StatusCode.ERROR


def _post(daemon: FakeDaemon, method: str, body: dict[str, Any], **headers: str) -> httpx.Response:
    return httpx.post(
        f"{daemon.address}/{SERVICE}/{method}",
        json=body,
        headers={"Content-Type": "application/json", **headers},
        timeout=30,
        trust_env=False,
    )


def _auth(customer: str) -> dict[str, str]:
    return {"Authorization": f"Bearer dev_customer_{customer}"}


class Lines:
    """The root logger's records as the daemon's JSON log would write them."""

    def __init__(self) -> None:
        self.stream = io.StringIO()
        self.handler = logging.StreamHandler(self.stream)
        self.handler.setFormatter(logs.JsonFormatter())

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stream.getvalue().splitlines()]


@pytest.fixture
def json_log() -> Iterator[Lines]:
    lines = Lines()
    root = logging.getLogger()
    level = root.level
    root.addHandler(lines.handler)
    root.setLevel(logging.DEBUG)
    yield lines
    root.removeHandler(lines.handler)
    root.setLevel(level)


def test_an_rpc_is_a_server_span_in_the_callers_trace_with_its_steps(
    traced: Traced, json_log: Lines
) -> None:
    with serve_fake_daemon() as daemon:
        network = [{"id": "eth0", "mode": "NETWORK_MODE_IPV4_ONLY"}]
        created = _post(
            daemon, "CreateVm", {"config": {"network": network}}, traceparent=TRACEPARENT,
            **_auth("acme"),
        )  # fmt: skip
        assert created.status_code == 200, created.text
        vm_id = created.json()["vmId"]
        booted = _post(daemon, "BootVm", {"vm_id": vm_id}, **_auth("acme"))
        assert booted.status_code == 200, booted.text
    spans = traced.spans()
    (create,) = [s for s in spans if s.name == f"{SERVICE}/CreateVm"]
    assert create.kind is SpanKind.SERVER
    assert create.context is not None and create.parent is not None
    assert format(create.context.trace_id, "032x") == TRACE_ID
    assert format(create.parent.span_id, "016x") == PARENT_SPAN
    attributes = dict(create.attributes or {})
    assert attributes["rpc.system"] == "connect_rpc"
    assert attributes["rpc.service"] == SERVICE and attributes["rpc.method"] == "CreateVm"
    assert attributes["metald.customer_id"] == "acme"
    assert attributes["metald.vm_id"] == vm_id  # an id the service picked
    assert attributes["client.address"] == "127.0.0.1"
    assert "rpc.connect_rpc.error_code" not in attributes
    assert {"check", "store", "admission", "network"} <= set(_children(spans, create))
    # A call without a traceparent starts a trace of its own, with its steps.
    (boot,) = [s for s in spans if s.name == f"{SERVICE}/BootVm"]
    assert boot.parent is None and boot.context is not None
    assert boot.context.trace_id != create.context.trace_id
    assert dict(boot.attributes or {})["metald.vm_id"] == vm_id
    assert {"vmm.boot", "store"} <= set(_children(spans, boot))
    # The create's log lines carry the ids and the trace.
    created_lines = [e for e in json_log.events() if e["message"].startswith(f"vm {vm_id} of")]
    assert created_lines, json_log.events()
    line = created_lines[0]
    assert (line["vm_id"], line["customer_id"], line["trace_id"]) == (vm_id, "acme", TRACE_ID)
    assert len(line["span_id"]) == 16 and line["level"] == "info"
    assert line["logger"] == "metald.service.vm_service"


def test_codes_become_span_attributes_and_server_faults_errors(traced: Traced) -> None:
    with serve_fake_daemon() as daemon:
        assert _post(daemon, "GetVmInfo", {"vm_id": "nope"}, **_auth("acme")).status_code == 404
        daemon.backend.faults.fail("create", RuntimeError("boom"))
        assert _post(daemon, "CreateVm", {"config": {}}, **_auth("acme")).status_code == 500
    info = traced.named(f"{SERVICE}/GetVmInfo")[0]
    assert dict(info.attributes or {})["rpc.connect_rpc.error_code"] == "not_found"
    assert info.status.status_code is StatusCode.UNSET  # the caller's business
    create = traced.named(f"{SERVICE}/CreateVm")[0]
    assert dict(create.attributes or {})["rpc.connect_rpc.error_code"] == "internal"
    assert create.status.status_code is StatusCode.ERROR


def test_sampling_follows_the_callers_decision() -> None:
    never = Traced(sampling_rate=0.0)
    with tracing.installed(never.tracer), serve_fake_daemon() as daemon:
        _post(daemon, "ListVms", {}, **_auth("acme"))
        _post(daemon, "ListVms", {}, traceparent=TRACEPARENT, **_auth("acme"))
    (span,) = never.spans()  # only the call whose caller sampled it
    assert span.context is not None and format(span.context.trace_id, "032x") == TRACE_ID
    never.tracer.shutdown()


def test_without_tracing_log_lines_still_name_the_callers_trace(json_log: Lines) -> None:
    assert tracing.active() is None
    with serve_fake_daemon() as daemon:
        _post(daemon, "CreateVm", {"vm_id": "mine", "config": {}}, **_auth("acme"))
        _post(daemon, "GetVmInfo", {"vm_id": "mine"}, traceparent=TRACEPARENT, **_auth("eve"))
    (event,) = [e for e in json_log.events() if e.get("event") == "security"]
    assert event["trace_id"] == TRACE_ID and "span_id" not in event


def _security(lines: Lines) -> list[dict[str, Any]]:
    return [e for e in lines.events() if e.get("event") == "security"]


def test_every_refusal_is_one_security_event(json_log: Lines) -> None:
    with serve_fake_daemon() as daemon:
        assert _post(daemon, "CreateVm", {"vm_id": "mine", "config": {}}, **_auth("acme"))
        assert not _security(json_log)
        # No token, a bad token, someone else's VM, acting for another customer.
        assert _post(daemon, "ListVms", {}).status_code == 401
        bad = _post(daemon, "ListVms", {}, Authorization="Bearer nope")
        assert bad.status_code == 401
        theirs = _post(daemon, "GetVmInfo", {"vm_id": "mine"}, **_auth("eve"))
        missing = _post(daemon, "GetVmInfo", {"vm_id": "nobody"}, **_auth("eve"))
        # Someone else's VM is answered exactly like a missing one.
        assert (theirs.status_code, theirs.json()["code"]) == (404, "not_found")
        assert theirs.json()["message"] == missing.json()["message"].replace("nobody", "mine")
        other = _post(daemon, "CreateVm", {"config": {}, "customer_id": "acme"}, **_auth("eve"))
        assert other.status_code == 403
    events = _security(json_log)
    assert [e["reason"] for e in events] == [
        "unauthenticated",
        "unauthenticated",
        "not_found_not_owner",
        "permission_denied",
    ]
    for e in events:
        assert e["level"] == "warning" and e["logger"] == "metald.security"
        assert e["source"].startswith("127.0.0.1:")
    assert events[0]["method"] == f"{SERVICE}/ListVms"
    assert "customer_id" not in events[0] and "customer_id" not in events[1]
    assert (events[2]["customer_id"], events[2]["vm_id"]) == ("eve", "mine")
    assert events[2]["method"] == f"{SERVICE}/GetVmInfo"
    assert events[3]["customer_id"] == "eve"


def test_another_customers_asset_is_a_security_event(json_log: Lines) -> None:
    daemon = build_fake_daemon()
    daemon.assets.files.add("bobs-kernel")
    daemon.assets.owners["bobs-kernel"] = "bob"
    with serve_fake_daemon(daemon=daemon):
        config = {"boot": {"kernel_path": "bobs-kernel"}}
        refused = _post(daemon, "CreateVm", {"config": config}, **_auth("alice"))
        assert (refused.status_code, refused.json()["code"]) == (404, "not_found")
        assert _post(daemon, "CreateVm", {"config": config}, **_auth("bob")).status_code == 200
    (event,) = _security(json_log)
    assert (event["reason"], event["customer_id"]) == ("not_found_not_owner", "alice")
    assert event["method"] == f"{SERVICE}/CreateVm"


def test_json_lines_hold_extras_and_exceptions() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    logger = logging.getLogger("metald.test.json")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        with callcontext.scope():
            callcontext.bind(vm_id="vm-1", customer_id="")
            logger.warning("a %s line", "formatted", extra={"reason": "why"})
        try:
            raise ValueError("bad\nthing")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["message"] == "a formatted line" and first["reason"] == "why"
    assert first["vm_id"] == "vm-1" and "customer_id" not in first  # empty ids are not bound
    assert first["time"].endswith("+00:00") and first["level"] == "warning"
    assert "vm_id" not in second  # the scope ended
    assert "ValueError: bad\nthing" in second["exception"]


def test_the_log_format_setting() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert logs.use_json("auto", io.StringIO()) and not logs.use_json("auto", Tty())
    assert logs.use_json("json", Tty()) and not logs.use_json("text", io.StringIO())
    with pytest.raises(ValueError):
        logs.use_json("yaml", io.StringIO())


class RecordingBilling:
    def __init__(self) -> None:
        self.calls: list[str] = []

    async def send_batch(
        self, vm_id: str, customer_id: str, records: Sequence[UsageRecord]
    ) -> None:
        self.calls.append(f"batch {vm_id} {customer_id} {len(records)}")

    async def heartbeat(self, instance_id: str, active_vm_ids: Sequence[str]) -> None:
        self.calls.append(f"heartbeat {instance_id}")

    async def vm_started(self, vm_id: str, customer_id: str, at_ns: int) -> None:
        self.calls.append(f"started {vm_id}")

    async def vm_stopped(self, vm_id: str, customer_id: str, at_ns: int) -> None:
        self.calls.append(f"stopped {vm_id}")

    async def possible_gap(
        self, vm_id: str, customer_id: str, last_sent_ns: int, resume_ns: int
    ) -> None:
        self.calls.append(f"gap {vm_id}")

    async def close(self) -> None:
        self.calls.append("close")


async def test_billing_calls_are_spans(traced: Traced) -> None:
    inner = RecordingBilling()
    billing = TracedBilling(inner)
    with tracing.span("rpc"):
        await billing.vm_started("vm-1", "acme", 1)
        await billing.send_batch("vm-1", "acme", [])
    await billing.heartbeat("host", ["vm-1"])
    await billing.vm_stopped("vm-1", "acme", 2)
    await billing.possible_gap("vm-1", "acme", 1, 2)
    await billing.close()
    assert inner.calls == [
        "started vm-1", "batch vm-1 acme 0", "heartbeat host", "stopped vm-1", "gap vm-1",
        "close",
    ]  # fmt: skip
    spans = traced.spans()
    rpc = next(s for s in spans if s.name == "rpc")
    assert _children(spans, rpc) == ["billing.vm_started", "billing.send_batch"]
    batch = next(s for s in spans if s.name == "billing.send_batch")
    assert dict(batch.attributes or {}) == {
        "metald.vm_id": "vm-1",
        "metald.customer_id": "acme",
        "metald.billing.records": 0,
    }
    names = {s.name for s in spans}
    assert {"billing.heartbeat", "billing.vm_stopped", "billing.possible_gap"} <= names


def test_the_settings_and_their_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    from metald.app import StartupError, build_tracer
    from metald.config import ConfigError, load_settings

    settings = load_settings()
    assert (settings.otel_enabled, settings.otel_endpoint) == (False, "localhost:4318")
    assert (settings.otel_service_name, settings.otel_sampling_rate) == ("metald", 1.0)
    assert (settings.log_format.value, settings.log_level.value) == ("auto", "info")
    assert build_tracer(settings) is None
    monkeypatch.setenv("UNKEY_METALD_OTEL_ENABLED", "true")
    monkeypatch.setenv("UNKEY_METALD_OTEL_ENDPOINT", "127.0.0.1:1")
    monkeypatch.setenv("UNKEY_METALD_OTEL_SAMPLING_RATE", "0.25")
    tracer = build_tracer(load_settings())
    assert tracer is not None and tracer.url == "http://127.0.0.1:1/v1/traces"
    tracer.shutdown()
    monkeypatch.setenv("UNKEY_METALD_OTEL_ENDPOINT", "ftp://collector")
    with pytest.raises(StartupError, match="UNKEY_METALD_OTEL_ENDPOINT"):
        build_tracer(load_settings())
    for variable, value in [
        ("UNKEY_METALD_OTEL_SAMPLING_RATE", "1.5"),
        ("UNKEY_METALD_LOG_FORMAT", "yaml"),
        ("UNKEY_METALD_LOG_LEVEL", "loud"),
    ]:
        monkeypatch.setenv(variable, value)
        with pytest.raises(ConfigError, match=variable):
            load_settings()
        monkeypatch.delenv(variable)


def test_only_the_observability_adapter_imports_opentelemetry() -> None:
    import ast
    from pathlib import Path

    import metald

    src = Path(metald.__file__).parent
    importers = set()
    for path in src.rglob("*.py"):
        if path.relative_to(src).parts[0] == "gen":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if any(n == "opentelemetry" or n.startswith("opentelemetry.") for n in names):
                importers.add(path.relative_to(src).as_posix())
    assert importers == {"observability/tracing.py"}


def test_tracing_off_does_not_even_import_opentelemetry() -> None:
    import subprocess
    import sys

    code = (
        "import sys, metald.app, metald.api.interceptors, metald.service.vm_service\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout
