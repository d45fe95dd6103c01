"""Traces to a real OTLP/HTTP receiver, and the daemon's JSON log, with `metald serve` as a
process called by curl: a CreateVm with a NIC, sent with the caller's W3C traceparent, is
one trace in the caller's trace with a child span for each step (store, network, jailer,
VMM); its log lines name the VM, the customer and the trace; every refused call is a
security event."""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from typing import Any

from ._otlp import OtlpReceiver, ReceivedSpan
from ._support import MIB, SERVICE, Daemon, curl_raw, wait_until

NIC = {"id": "eth0", "mode": "NETWORK_MODE_IPV4_ONLY"}
SPAN_KIND_SERVER = 2


def _call(
    daemon: Daemon, method: str, body: dict[str, Any], token: str | None, **headers: str
) -> tuple[int, dict[str, Any]]:
    sent = {"Content-Type": "application/json", **headers}
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    status, text = curl_raw(f"{daemon.url}/{SERVICE}/{method}", json.dumps(body).encode(), sent)
    return status, json.loads(text) if text else {}


def _log_events(daemon: Daemon) -> list[dict[str, Any]]:
    """The daemon's log lines that are JSON (the fixture writes a text banner between runs)."""
    events = []
    for line in daemon.log_path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            events.append(json.loads(line))
    return events


def _children(spans: list[ReceivedSpan], parent: ReceivedSpan) -> set[str]:
    return {s.name for s in spans if s.parent_span_id == parent.span_id}


def test_a_create_is_one_trace_with_its_steps_and_its_log_lines_name_it(
    metald_factory: Callable[..., Daemon],
) -> None:
    trace_id, parent = secrets.token_hex(16), secrets.token_hex(8)
    with OtlpReceiver() as receiver:
        daemon = metald_factory(
            UNKEY_METALD_OTEL_ENABLED="true",
            UNKEY_METALD_OTEL_ENDPOINT=f"127.0.0.1:{receiver.port}",
            UNKEY_METALD_OTEL_SERVICE_NAME="metald-e2e",
            UNKEY_METALD_LOG_FORMAT="json",
            UNKEY_METALD_LOG_LEVEL="debug",
        )
        config = {"memory": {"size_bytes": 128 * MIB}, "network": [NIC]}
        status, body = _call(
            daemon, "CreateVm", {"config": config}, "dev_customer_acme",
            traceparent=f"00-{trace_id}-{parent}-01",
        )  # fmt: skip
        assert status == 200, body
        vm_id = body["vmId"]
        try:

            def create_span() -> ReceivedSpan | None:
                return next(
                    (s for s in receiver.in_trace(trace_id) if s.name.endswith("/CreateVm")),
                    None,
                )

            # The batch processor exports within seconds of the span's end.
            create = wait_until(create_span, 60, "the CreateVm span at the receiver")
        finally:
            status, body = _call(
                daemon, "DeleteVm", {"vm_id": vm_id, "force": True}, "dev_customer_acme"
            )
            assert status == 200, body
        spans = receiver.in_trace(trace_id)
        assert not receiver.bad, receiver.bad
    assert create.service == "metald-e2e"
    assert create.name == f"{SERVICE}/CreateVm" and create.kind == SPAN_KIND_SERVER
    assert create.parent_span_id == parent  # the caller's span
    assert create.attributes["rpc.system"] == "connect_rpc"
    assert create.attributes["rpc.method"] == "CreateVm"
    assert create.attributes["metald.vm_id"] == vm_id
    assert create.attributes["metald.customer_id"] == "acme"
    steps = _children(spans, create)
    # store, network, jailer and the VMM's own steps, each a child of the RPC's span.
    assert {"store", "admission", "network", "jailer", "vmm_start", "control", "configure"} <= (
        steps
    ), steps
    network = next(s for s in spans if s.name == "network")
    assert any(n.startswith("network.") for n in _children(spans, network)), spans
    assert any(n.startswith("jailer.") for n in steps), steps  # the helper's own steps
    for span in spans:
        assert create.start_ns <= span.start_ns <= span.end_ns <= create.end_ns, span

    events = _log_events(daemon)
    mine = [e for e in events if e.get("vm_id") == vm_id and e.get("trace_id") == trace_id]
    assert mine, [e for e in events if e.get("vm_id") == vm_id]
    for event in mine:
        assert event["customer_id"] == "acme"
        assert {"time", "level", "logger", "message", "span_id"} <= set(event)
    assert any(e["logger"].startswith("metald.backends") for e in mine), mine


def test_refused_calls_are_security_events(metald_factory: Callable[..., Daemon]) -> None:
    daemon = metald_factory(UNKEY_METALD_LOG_FORMAT="json")
    status, body = _call(
        daemon, "CreateVm", {"vm_id": "acmes", "config": {"memory": {"size_bytes": 128 * MIB}}},
        "dev_customer_acme",
    )  # fmt: skip
    assert status == 200, body
    try:
        assert _call(daemon, "ListVms", {}, None)[0] == 401
        assert _call(daemon, "ListVms", {}, "not-a-token")[0] == 401
        theirs = _call(daemon, "GetVmInfo", {"vm_id": "acmes"}, "dev_customer_eve")
        assert theirs == (404, {"code": "not_found", "message": "VM 'acmes' not found"})
        assert _call(daemon, "DeleteVm", {"vm_id": "acmes"}, "dev_customer_eve")[0] == 404
    finally:
        assert _call(daemon, "DeleteVm", {"vm_id": "acmes"}, "dev_customer_acme")[0] == 200
    events = [e for e in _log_events(daemon) if e.get("event") == "security"]
    assert [(e["reason"], e["method"].rsplit("/", 1)[1]) for e in events] == [
        ("unauthenticated", "ListVms"),
        ("unauthenticated", "ListVms"),
        ("not_found_not_owner", "GetVmInfo"),
        ("not_found_not_owner", "DeleteVm"),
    ], events
    assert all(e["source"].startswith("127.0.0.1:") for e in events), events
    assert [e.get("customer_id") for e in events] == [None, None, "eve", "eve"]
    assert all(e["vm_id"] == "acmes" for e in events[2:])
