"""The billing client against a real `metald billing-sink` process, and the sink against
clients nobody here wrote: curl (Connect JSON), grpcio (gRPC), buf curl (gRPC-Web).

The sink records the X-Tenant-ID header it received with everything it keeps, so the
client's header is checked by the other side, not by reading our own request. Processes are
started and ended by pid (tests/integration/_billing_sink.py); fake servers for the failure
mappings (silent, 5xx) are asyncio servers on loopback ports of their own."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from _billing_sink import METALD, ROOT, SinkProcess, free_port, no_proxy_env

from metald.billing import codec
from metald.billing.client import ConnectBilling
from metald.billing_sink.store import Notice
from metald.core.errors import BillingRejected, BillingUnavailable
from metald.core.metering import UsageRecord
from metald.gen.billing.v1 import billing_pb2 as pb

SERVICE = "billing.v1.BillingService"
BUF = ROOT / "node_modules" / ".bin" / "buf"
PROTO = ROOT / "proto" / "billing" / "v1" / "billing.proto"
T0 = 1_764_619_200_000_000_000  # 2025-12-01T20:00:00Z in ns


def records(vm_id: str, customer: str, *seconds: int) -> list[UsageRecord]:
    return [
        UsageRecord(
            vm_id, customer, T0 + s * 10**9 + 123, cpu_time_ns=s * 10**8,
            memory_bytes=2**28, disk_read_bytes=s * 10, disk_write_bytes=s * 20,
            network_rx_bytes=s * 30, network_tx_bytes=s * 40,
        )
        for s in seconds
    ]  # fmt: skip


@pytest.fixture
def sink(tmp_path: Path) -> Iterator[SinkProcess]:
    with SinkProcess(tmp_path) as running:
        yield running


@pytest.fixture
async def client(sink: SinkProcess) -> AsyncIterator[ConnectBilling]:
    billing = ConnectBilling(sink.url, timeout=10.0, connect_timeout=5.0)
    yield billing
    await billing.close()


async def test_every_call_arrives_with_the_customer_as_tenant(
    sink: SinkProcess, client: ConnectBilling
) -> None:
    sent = records("vm-1", "acme", 1, 2, 3)
    await client.send_batch("vm-1", "acme", sent)
    await client.vm_started("vm-1", "acme", T0)
    await client.possible_gap("vm-1", "acme", T0 + 3, T0 + 9)
    await client.vm_stopped("vm-1", "acme", T0 + 10)
    await client.heartbeat("host-1", ["vm-1", "vm-2"])
    store = sink.store()
    try:
        assert store.samples() == sent  # every field, the instants to the nanosecond
        tenants = store._db.execute("SELECT DISTINCT tenant_id FROM samples").fetchall()
        assert tenants == [("acme",)]
        assert store.notices() == [
            Notice("started", "vm-1", "acme", "acme", at_ns=T0),
            Notice("gap", "vm-1", "", "acme", last_sent_ns=T0 + 3, resume_ns=T0 + 9),
            Notice("stopped", "vm-1", "", "acme", at_ns=T0 + 10),
        ]
        [beat] = store.heartbeats()
        assert (beat.instance_id, beat.active_vms) == ("host-1", ("vm-1", "vm-2"))
    finally:
        store.close()


async def test_duplicates_are_dropped_and_usage_counts_each_sample_once(
    sink: SinkProcess, client: ConnectBilling
) -> None:
    await client.send_batch("vm-1", "acme", records("vm-1", "acme", 0, 1, 2))
    # At-least-once: the same batch again, and one that overlaps it.
    await client.send_batch("vm-1", "acme", records("vm-1", "acme", 0, 1, 2))
    await client.send_batch("vm-1", "acme", records("vm-1", "acme", 2, 3, 4))
    await client.send_batch("vm-9", "globex", records("vm-9", "globex", 0, 10))
    store = sink.store()
    try:
        assert [r.timestamp_ns for r in store.samples("acme")] == [
            r.timestamp_ns for r in records("vm-1", "acme", 0, 1, 2, 3, 4)
        ]
    finally:
        store.close()
    argv = [str(METALD), "billing", "usage", "--db", str(sink.db), "--json", "--customer", "acme"]
    out = await asyncio.to_thread(
        subprocess.run, argv, capture_output=True, text=True, check=True, timeout=60
    )
    [vm] = json.loads(out.stdout)["vms"]
    assert (vm["vm_id"], vm["samples"], vm["cpu_time_ns"]) == ("vm-1", 5, 4 * 10**8)
    assert (vm["disk_read_bytes"], vm["network_tx_bytes"]) == (40, 160)


async def test_success_false_is_rejected(client: ConnectBilling) -> None:
    with pytest.raises(BillingRejected, match="no metrics provided"):
        await client.send_batch("vm-1", "acme", [])


async def test_a_call_without_a_customer_is_refused_by_the_sink(client: ConnectBilling) -> None:
    """No customer, no X-Tenant-ID header: the sink says unauthenticated. Who-is-calling
    refusals are a deployment fault, so the records are kept to retry (client.py)."""
    with pytest.raises(BillingUnavailable, match="unauthenticated: tenant ID is required"):
        await client.vm_started("vm-1", "", T0)


async def test_a_sink_that_is_down_is_unavailable_until_it_returns(
    sink: SinkProcess, client: ConnectBilling
) -> None:
    await client.send_batch("vm-1", "acme", records("vm-1", "acme", 0))
    assert sink.stop() == 0  # SIGTERM: a clean exit
    with pytest.raises(BillingUnavailable, match="cannot reach"):
        await client.send_batch("vm-1", "acme", records("vm-1", "acme", 1))
    with pytest.raises(BillingUnavailable):
        await client.heartbeat("host-1", [])
    sink.start()  # same port, same file: the same client delivers again
    await client.send_batch("vm-1", "acme", records("vm-1", "acme", 1))
    store = sink.store()
    try:
        assert len(store.samples()) == 2
    finally:
        store.close()


async def test_what_the_sink_acknowledged_survives_its_kill_9(
    sink: SinkProcess, client: ConnectBilling
) -> None:
    sent = records("vm-1", "acme", *range(50))
    await client.send_batch("vm-1", "acme", sent)
    await client.vm_stopped("vm-1", "acme", T0)
    sink.kill9()
    store = sink.store()
    try:
        assert store.samples() == sent
        assert len(store.notices("stopped")) == 1
    finally:
        store.close()


async def test_nothing_listening_is_unavailable() -> None:
    billing = ConnectBilling(f"http://127.0.0.1:{free_port()}", timeout=5.0)
    try:
        with pytest.raises(BillingUnavailable, match="cannot reach"):
            await billing.vm_stopped("vm-1", "acme", T0)
    finally:
        await billing.close()


async def _server(answer: bytes | None) -> asyncio.Server:
    """An HTTP/1.1 'server' on loopback that reads the request, then answers `answer` (raw
    bytes) or nothing at all (holding the connection open)."""
    held: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        if answer is None:
            held.append(writer)  # silent until the test ends
            return
        writer.write(answer)
        await writer.drain()
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


def _http(status: str, body: bytes = b"", content_type: str = "text/plain") -> bytes:
    return (
        f"HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    ).encode() + body


@pytest.mark.parametrize(
    ("answer", "error", "match"),
    [
        (None, BillingUnavailable, "no answer from .* within 0.5s"),
        (_http("503 Service Unavailable"), BillingUnavailable, "answered unavailable"),
        (_http("502 Bad Gateway"), BillingUnavailable, "answered unavailable"),
        (_http("500 Internal Server Error", b"boom"), BillingUnavailable, "answered unknown"),
        (
            _http("500 Internal Server Error", b'{"code":"internal","message":"db"}',
                  "application/json"),
            BillingUnavailable, "answered internal: db",
        ),
        (_http("429 Too Many Requests"), BillingUnavailable, "answered unavailable"),
        (
            _http("400 Bad Request", b'{"code":"invalid_argument","message":"bad vm"}',
                  "application/json"),
            BillingRejected, "answered invalid_argument: bad vm",
        ),
        (_http("401 Unauthorized"), BillingUnavailable, "answered unauthenticated"),
        (_http("403 Forbidden"), BillingUnavailable, "answered permission_denied"),
        (_http("404 Not Found"), BillingUnavailable, "answered unimplemented"),
        (
            _http("409 Conflict", b'{"code":"already_exists","message":"dup"}',
                  "application/json"),
            BillingRejected, "answered already_exists: dup",
        ),
    ],
)  # fmt: skip
async def test_failures_map_to_retry_or_give_up(
    answer: bytes | None, error: type[Exception], match: str
) -> None:
    server = await _server(answer)
    port = server.sockets[0].getsockname()[1]
    billing = ConnectBilling(f"http://127.0.0.1:{port}", timeout=0.5)
    try:
        with pytest.raises(error, match=match):
            await billing.send_batch("vm-1", "acme", records("vm-1", "acme", 1))
    finally:
        await billing.close()
        server.close()


def _curl(url: str, body: object, tenant: str | None) -> tuple[int, dict[str, object]]:
    argv = ["curl", "-sS", "-o", "-", "-w", "\n%{http_code}", "-X", "POST", "--max-time", "20",
            "-H", "Content-Type: application/json", "-d", json.dumps(body)]  # fmt: skip
    if tenant is not None:
        argv += ["-H", f"X-Tenant-ID: {tenant}"]
    out = subprocess.run(
        [*argv, url], capture_output=True, text=True, check=True, env=no_proxy_env(), timeout=60
    )
    text, _, status = out.stdout.rpartition("\n")
    return int(status), json.loads(text)


def test_curl_connect_json(sink: SinkProcess) -> None:
    url = f"{sink.url}/{SERVICE}"
    batch = {
        "vmId": "vm-c",
        "customerId": "acme",
        "metrics": [
            {"timestamp": "2025-12-01T20:00:00.000000001Z", "cpuTimeNanos": "5"},
            {"timestamp": "2025-12-01T20:00:01Z", "cpuTimeNanos": "9", "networkRxBytes": "3"},
        ],
    }
    assert _curl(f"{url}/SendMetricsBatch", batch, None) == (
        401,
        {"code": "unauthenticated", "message": "tenant ID is required"},
    )
    assert _curl(f"{url}/SendMetricsBatch", batch, "acme") == (
        200,
        {"success": True, "message": "2 stored, 0 duplicates dropped"},
    )
    assert _curl(f"{url}/SendMetricsBatch", batch, "acme")[1]["message"] == (
        "0 stored, 2 duplicates dropped"
    )
    empty = {"vmId": "vm-c", "customerId": "acme"}
    assert _curl(f"{url}/SendMetricsBatch", empty, "acme") == (
        200,
        {"message": "no metrics provided"},  # success=false is proto3's default: not written
    )
    assert _curl(f"{url}/SendHeartbeat", {"instanceId": "h"}, None) == (200, {"success": True})
    stopped = {"vmId": "vm-c", "stopTime": str(T0)}
    assert _curl(f"{url}/NotifyVmStopped", stopped, None)[0] == 401
    assert _curl(f"{url}/NotifyVmStopped", stopped, "acme") == (200, {"success": True})
    store = sink.store()
    try:
        first = store.samples()[0]
        assert (first.timestamp_ns, first.cpu_time_ns) == (T0 + 1, 5)
        assert store.notices("stopped") == [Notice("stopped", "vm-c", "", "acme", at_ns=T0)]
    finally:
        store.close()


def test_grpcio(sink: SinkProcess) -> None:
    channel = grpc.insecure_channel(
        f"127.0.0.1:{sink.port}", options=[("grpc.enable_http_proxy", 0)]
    )
    try:
        send = channel.unary_unary(
            f"/{SERVICE}/SendMetricsBatch",
            request_serializer=pb.SendMetricsBatchRequest.SerializeToString,
            response_deserializer=pb.SendMetricsBatchResponse.FromString,
        )
        request = codec.batch_request("vm-g", "acme", records("vm-g", "acme", 1, 2))
        with pytest.raises(grpc.RpcError) as err:
            send(request, timeout=20)
        assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert err.value.details() == "tenant ID is required"
        answer = send(request, metadata=[("x-tenant-id", "acme")], timeout=20)
        assert (answer.success, answer.message) == (True, "2 stored, 0 duplicates dropped")
        beat = channel.unary_unary(
            f"/{SERVICE}/SendHeartbeat",
            request_serializer=pb.SendHeartbeatRequest.SerializeToString,
            response_deserializer=pb.SendHeartbeatResponse.FromString,
        )
        assert beat(pb.SendHeartbeatRequest(instance_id="h"), timeout=20).success
    finally:
        channel.close()


@pytest.mark.skipif(not BUF.exists(), reason="buf is installed by `make buf`")
def test_buf_curl_grpc_web(sink: SinkProcess) -> None:
    def call(tenant: str | None) -> subprocess.CompletedProcess[str]:
        body = {"vmId": "vm-w", "startTime": str(T0), "customerId": "acme"}
        argv = [str(BUF), "curl", "--schema", str(PROTO), "--protocol", "grpcweb",
                "-d", json.dumps(body)]  # fmt: skip
        if tenant is not None:
            argv += ["-H", f"X-Tenant-ID: {tenant}"]
        argv.append(f"{sink.url}/{SERVICE}/NotifyVmStarted")
        return subprocess.run(
            argv, capture_output=True, text=True, env=no_proxy_env(), cwd=ROOT, timeout=120,
            check=False,
        )  # fmt: skip

    refused = call(None)
    assert refused.returncode != 0
    assert "unauthenticated" in refused.stderr and "tenant ID is required" in refused.stderr
    accepted = call("acme")
    assert accepted.returncode == 0, accepted.stderr
    assert json.loads(accepted.stdout) == {"success": True}
    store = sink.store()
    try:
        assert store.notices() == [Notice("started", "vm-w", "acme", "acme", at_ns=T0)]
    finally:
        store.close()
