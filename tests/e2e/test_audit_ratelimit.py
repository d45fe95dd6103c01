"""Rate limits and the audit log with the real daemon and clients nobody here wrote.

A customer's burst beyond its limit is refused (`resource_exhausted`, with a retry hint in
the message, a Retry-After header and a google.rpc.RetryInfo detail) for that customer only,
while another customer's calls pass: on separate connections (curl) and on one shared
HTTP/2 connection (grpcio, both customers' tokens on one channel). Mutating calls weigh
more. The audit log holds rows for a create and a delete, a refused access and a refused
authentication, each also one security log line; `metald audit verify` passes, and fails
naming the row once the test edits it with sqlite3. Failed authentication from one source is
throttled: past its burst the source is refused before its token is looked at.

The limits are set so that nothing refills during the test (0.001 tokens per second):
what passes and what is refused does not depend on timing.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2

from metald.gen.vmprovisioner.v1 import vm_pb2 as pb

from ._support import (
    METALD,
    MIB,
    SERVICE,
    Daemon,
    Grpcio,
    client_env,
    curl_raw,
    http_get,
)

SLOW = "0.001"  # tokens per second: no refill within a test


def _call(
    daemon: Daemon, method: str, body: dict[str, Any], token: str | None, **headers: str
) -> tuple[int, dict[str, Any], str]:
    """curl (a connection per call); (HTTP status, JSON body, response headers)."""
    sent = {"Content-Type": "application/json", **headers}
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    status, text = curl_raw(
        f"{daemon.url}/{SERVICE}/{method}", json.dumps(body).encode(), sent, extra=["-i"]
    )
    head, _, body_text = text.replace("\r\n", "\n").partition("\n\n")
    return status, json.loads(body_text) if body_text.strip() else {}, head.lower()


def _log_events(daemon: Daemon) -> list[dict[str, Any]]:
    return [
        json.loads(line)
        for line in daemon.log_path.read_text(errors="replace").splitlines()
        if line.startswith("{")
    ]


def _metald(daemon: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**client_env(), "UNKEY_METALD_DATA_DIR": str(daemon.data_dir), "COLUMNS": "250"}
    return subprocess.run(
        [str(METALD), *args], capture_output=True, text=True, env=env, timeout=60, check=False
    )


def _metric(daemon: Daemon, name: str) -> float:
    """One sample of /metrics by its exact name and labels."""
    status, body = http_get(daemon.metrics_url)
    assert status == 200
    for line in body.decode().splitlines():
        if line.rsplit(" ", 1)[0] == name:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def _start(metald_factory: Callable[..., Daemon], tmp_path: Path) -> Daemon:
    limits = tmp_path / "limits"
    limits.write_text("# customer rate burst\nlimited 0.001 4\nshared 0.001 3\nheavy 0.001 10\n")
    return metald_factory(
        UNKEY_METALD_LOG_FORMAT="json",
        UNKEY_METALD_RATE_LIMIT_ENABLED="true",
        UNKEY_METALD_RATE_LIMIT_RATE=SLOW,
        UNKEY_METALD_RATE_LIMIT_BURST="1000",
        UNKEY_METALD_RATE_LIMIT_MUTATING_COST="5",
        UNKEY_METALD_RATE_LIMIT_FILE=str(limits),
        UNKEY_METALD_RATE_LIMIT_AUTH_FAILURES_RATE=SLOW,
        UNKEY_METALD_RATE_LIMIT_AUTH_FAILURES_BURST="3",
    )


def _retry_info(error: grpc.RpcError) -> error_details_pb2.RetryInfo:
    trailers = dict(error.trailing_metadata() or ())  # type: ignore[attr-defined]
    status = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
    info = error_details_pb2.RetryInfo()
    assert status.details and status.details[0].Unpack(info), status
    return info


def test_rate_limits_and_the_audit_log(
    metald_factory: Callable[..., Daemon], tmp_path: Path
) -> None:
    daemon = _start(metald_factory, tmp_path)

    # -- separate connections (curl): "limited" has a burst of 4 calls ---------------------
    for _ in range(4):
        assert _call(daemon, "ListVms", {}, "dev_customer_limited")[0] == 200
    status, body, head = _call(daemon, "ListVms", {}, "dev_customer_limited")
    assert (status, body["code"]) == (429, "resource_exhausted"), body
    assert "rate limit exceeded: retry in" in body["message"]
    assert "retry-after: " in head, head
    assert body["details"][0]["type"] == "google.rpc.RetryInfo", body
    for _ in range(10):  # another customer is not held back
        assert _call(daemon, "ListVms", {}, "dev_customer_acme")[0] == 200
    assert _call(daemon, "ListVms", {}, "dev_customer_limited")[0] == 429

    # -- one shared HTTP/2 connection (grpcio): "shared" (burst 3) and acme ----------------
    channel = Grpcio(daemon.url, token=None)
    try:
        stub = channel.channel.unary_unary(
            f"/{SERVICE}/ListVms",
            request_serializer=pb.ListVmsRequest.SerializeToString,
            response_deserializer=pb.ListVmsResponse.FromString,
        )

        def call(customer: str) -> grpc.StatusCode:
            metadata = [("authorization", f"Bearer dev_customer_{customer}")]
            try:
                stub(pb.ListVmsRequest(), metadata=metadata, timeout=30)
            except grpc.RpcError as error:
                code: grpc.StatusCode = error.code()  # type: ignore[attr-defined]
                if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
                    assert _retry_info(error).retry_delay.seconds > 0
                return code
            return grpc.StatusCode.OK

        codes = [(call("shared"), call("acme")) for _ in range(5)]
        ok, over = grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED
        assert codes == [(ok, ok)] * 3 + [(over, ok)] * 2, codes
    finally:
        channel.close()

    # -- mutating calls weigh 5: "heavy" (burst 10) gets two, then none --------------------
    bad = {"config": {"cpu": {"vcpu_count": 10_000}}}  # invalid_argument: no VM is made
    assert [_call(daemon, "CreateVm", bad, "dev_customer_heavy")[0] for _ in range(3)] == [
        400,
        400,
        429,
    ]
    assert _call(daemon, "ListVms", {}, "dev_customer_heavy")[0] == 429  # none left at all

    # -- audited: a create and a delete, a refused access, a refused authentication -------
    create = {"vm_id": "audited", "config": {"memory": {"size_bytes": 128 * MIB}}}
    assert (
        _call(daemon, "CreateVm", create, "dev_customer_acme", **{"X-Tenant-ID": "t-1"})[0] == 200
    )
    try:
        assert _call(daemon, "GetVmInfo", {"vm_id": "audited"}, "dev_customer_eve")[0] == 404
        assert _call(daemon, "ListVms", {}, None)[0] == 401
        assert _call(daemon, "GetVmInfo", {"vm_id": "audited"}, "dev_customer_acme")[0] == 200
    finally:
        assert _call(daemon, "DeleteVm", {"vm_id": "audited"}, "dev_customer_acme")[0] == 200
    assert _metric(daemon, 'metald_rate_limit_refusals_total{reason="customer"}') >= 6
    assert daemon.stop() == 0  # a clean stop writes every queued row

    listed = _metald(daemon, "audit", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    seen = [(r["method"].rsplit("/", 1)[1], r["actor"], r["customer_id"], r["vm_id"], r["code"])
            for r in rows]  # fmt: skip
    assert seen == [
        ("CreateVm", "dev:heavy", "heavy", None, "invalid_argument"),
        ("CreateVm", "dev:heavy", "heavy", None, "invalid_argument"),
        ("CreateVm", "dev:acme", "acme", "audited", "ok"),
        ("GetVmInfo", "dev:eve", "eve", "audited", "not_found"),
        ("ListVms", "anonymous", None, None, "unauthenticated"),
        ("DeleteVm", "dev:acme", "acme", "audited", "ok"),
    ], rows
    assert rows[2]["tenant_header"] == "t-1" and rows[2]["role"] == "customer"
    assert all(r["source"].startswith("127.0.0.1:") for r in rows)
    assert [r["seq"] for r in rows] == list(range(1, len(rows) + 1))
    # Each row is one security log line, no more.
    lines = [e for e in _log_events(daemon) if e.get("event") in ("security", "audit")]
    assert [(e["event"], e.get("reason"), e["method"].rsplit("/", 1)[1]) for e in lines] == [
        ("audit", None, "CreateVm"),
        ("audit", None, "CreateVm"),
        ("audit", None, "CreateVm"),
        ("security", "not_found_not_owner", "GetVmInfo"),
        ("security", "unauthenticated", "ListVms"),
        ("audit", None, "DeleteVm"),
    ], lines
    table = _metald(daemon, "audit", "list", "--customer", "acme")
    assert table.returncode == 0 and "audited" in table.stdout and "eve" not in table.stdout

    verified = _metald(daemon, "audit", "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert f"{len(rows)} rows" in verified.stdout

    # A restarted daemon continues the chain; after kill -9 the rows of calls answered just
    # before may be lost (they were queued), but the chain still holds and goes on.
    daemon.start_again()
    assert _call(daemon, "CreateVm", bad, "dev_customer_acme")[0] == 400
    daemon.kill9()
    daemon.start_again()
    assert _call(daemon, "CreateVm", bad, "dev_customer_acme")[0] == 400
    assert daemon.stop() == 0
    after = [json.loads(x) for x in _metald(daemon, "audit", "list", "--json").stdout.splitlines()]
    assert len(rows) + 1 <= len(after) <= len(rows) + 2, after
    assert [r["seq"] for r in after] == list(range(1, len(after) + 1))
    verified = _metald(daemon, "audit", "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    con = sqlite3.connect(daemon.db_path)
    con.execute("UPDATE audit_log SET customer_id = 'acme' WHERE seq = 4")  # eve's refusal
    con.commit()
    con.close()
    broken = _metald(daemon, "audit", "verify")
    assert broken.returncode == 3, broken.stdout + broken.stderr
    assert "seq 4" in broken.stderr, broken.stderr


def test_failed_authentication_is_throttled_per_source(
    metald_factory: Callable[..., Daemon], tmp_path: Path
) -> None:
    daemon = _start(metald_factory, tmp_path)
    assert _call(daemon, "ListVms", {}, "dev_customer_acme")[0] == 200
    for token in ("wrong-1", None, "wrong-3"):  # the source's burst: 3 failures
        assert _call(daemon, "ListVms", {}, token)[0] == 401
    status, body, head = _call(daemon, "ListVms", {}, "wrong-4")
    assert (status, body["code"]) == (429, "resource_exhausted"), body
    assert "too many failed authentications" in body["message"] and "retry-after: " in head
    # Refused before the token is looked at: a good token from this source too (the price
    # of throttling by address: a source shared with an attacker waits with it).
    assert _call(daemon, "ListVms", {}, "dev_customer_acme")[0] == 429
    assert _metric(daemon, 'metald_rate_limit_refusals_total{reason="auth_failures"}') == 2
    assert _metric(daemon, 'metald_auth_refusals_total{reason="invalid"}') == 2
    assert daemon.stop() == 0
    rows = [
        json.loads(line) for line in _metald(daemon, "audit", "list", "--json").stdout.splitlines()
    ]
    throttled = [e for e in _log_events(daemon) if e.get("reason") == "auth_failures_throttled"]
    assert [e["throttled_source"] for e in throttled] == ["127.0.0.1"], throttled
    # The three refused authentications are rows; the throttled calls are not.
    assert [(r["actor"], r["code"]) for r in rows] == [("anonymous", "unauthenticated")] * 3
