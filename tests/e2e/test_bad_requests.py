"""Bad requests get the right Connect code, and change nothing: afterwards the rows in the
database (ids, states, pids) and the set of QEMU processes are exactly as before.

Mostly curl with Connect JSON (it can send bodies no real client would), plus grpcio."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from metald.gen.vmprovisioner.v1 import vm_pb2 as pb

from ._support import (
    MIB,
    SERVICE,
    Caller,
    Daemon,
    Grpcio,
    curl_raw,
    pid_alive,
    state_name,
)

HOST_CORES = os.cpu_count() or 1
HOST_MEMORY = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
JSON = {"Content-Type": "application/json", "Authorization": "Bearer dev_customer_acme"}


@dataclass
class Case:
    name: str
    method: str
    body: Any  # a dict (sent as JSON) or bytes (sent as is)
    code: str  # the Connect code expected
    mentions: str = ""  # the error message must name this (a field or a state)
    headers: dict[str, str] | None = None
    http_status: int | None = None


def _metadata(n: int) -> dict[str, str]:
    return {f"k{i}": "v" for i in range(n)}


def cases(store: Path) -> list[Case]:
    def create(config: dict[str, Any], **kw: Any) -> dict[str, Any]:
        return {"config": config, **kw}

    big = json.dumps(create({"metadata": {"k": "x" * (2 * MIB)}})).encode()
    host_mem_mib = -(-HOST_MEMORY // MIB) * MIB
    return [
        # -- CreateVm: the config ----------------------------------------------------------
        Case(
            "vcpu 33",
            "CreateVm",
            create({"cpu": {"vcpu_count": 33}}),
            "invalid_argument",
            "vcpu_count",
        ),
        Case(
            "vcpu above host cores",
            "CreateVm",
            create({"cpu": {"vcpu_count": min(HOST_CORES + 1, 33)}}),
            "invalid_argument",
            "vcpu_count",
        ),
        Case(
            "vcpu negative",
            "CreateVm",
            create({"cpu": {"vcpu_count": -1}}),
            "invalid_argument",
            "vcpu_count",
        ),
        Case(
            "memory 64 MiB",
            "CreateVm",
            create({"memory": {"size_bytes": 64 * MIB}}),
            "invalid_argument",
            "size_bytes",
        ),
        Case(
            "memory = host memory",
            "CreateVm",
            create({"memory": {"size_bytes": host_mem_mib}}),
            "invalid_argument",
            "size_bytes",
        ),
        Case(
            "memory negative",
            "CreateVm",
            create({"memory": {"size_bytes": -MIB}}),
            "invalid_argument",
            "size_bytes",
        ),
        Case("vm_id upper case", "CreateVm", {"vm_id": "Upper-Case"}, "invalid_argument", "vm_id"),
        Case("vm_id 65 chars", "CreateVm", {"vm_id": "a" * 65}, "invalid_argument", "vm_id"),
        Case("vm_id underscore", "CreateVm", {"vm_id": "under_score"}, "invalid_argument", "vm_id"),
        Case("vm_id path", "CreateVm", {"vm_id": "../etc"}, "invalid_argument", "vm_id"),
        Case(
            "metadata 65 entries",
            "CreateVm",
            create({"metadata": _metadata(65)}),
            "invalid_argument",
            "metadata",
        ),
        Case(
            "metadata key 129 chars",
            "CreateVm",
            create({"metadata": {"k" * 129: "v"}}),
            "invalid_argument",
            "metadata",
        ),
        Case(
            "metadata key charset",
            "CreateVm",
            create({"metadata": {"bad key!": "v"}}),
            "invalid_argument",
            "metadata",
        ),
        Case(
            "metadata value 1025 bytes",
            "CreateVm",
            create({"metadata": {"k": "v" * 1025}}),
            "invalid_argument",
            "metadata",
        ),
        Case(
            "kernel_args 1025 bytes",
            "CreateVm",
            create({"boot": {"kernel_args": "x" * 1025}}),
            "invalid_argument",
            "kernel_args",
        ),
        Case(
            "kernel_args newline",
            "CreateVm",
            create({"boot": {"kernel_args": "quiet\ninit=/bin/sh"}}),
            "invalid_argument",
            "kernel_args",
        ),
        Case(
            "kernel_args console=",
            "CreateVm",
            create({"boot": {"kernel_args": "console=ttyS1"}}),
            "invalid_argument",
            "kernel_args",
        ),
        Case(
            "kernel_args metald.*",
            "CreateVm",
            create({"boot": {"kernel_args": "quiet metald.vm_id=x"}}),
            "invalid_argument",
            "kernel_args",
        ),
        Case(
            "kernel_args panic=",
            "CreateVm",
            create({"boot": {"kernel_args": "panic=0"}}),
            "invalid_argument",
            "kernel_args",
        ),
        Case(
            "kernel_args reboot=",
            "CreateVm",
            create({"boot": {"kernel_args": "reboot=k"}}),
            "invalid_argument",
            "kernel_args",
        ),
        Case(
            "kernel_path /etc/shadow",
            "CreateVm",
            create({"boot": {"kernel_path": "/etc/shadow"}}),
            "invalid_argument",
            "kernel_path",
        ),
        Case(
            "kernel_path ..",
            "CreateVm",
            create({"boot": {"kernel_path": "../../../../etc/passwd"}}),
            "invalid_argument",
            "kernel_path",
        ),
        Case(
            "kernel_path .. inside",
            "CreateVm",
            create({"boot": {"kernel_path": "blobs/../../../../etc/passwd"}}),
            "invalid_argument",
            "kernel_path",
        ),
        Case(
            "kernel_path absolute ..",
            "CreateVm",
            create({"boot": {"kernel_path": f"{store}/../../../etc/passwd"}}),
            "invalid_argument",
            "kernel_path",
        ),
        Case(
            "kernel_path symlink out",
            "CreateVm",
            create({"boot": {"kernel_path": "escape"}}),
            "invalid_argument",
            "kernel_path",
        ),
        Case(
            "kernel_path absolute symlink out",
            "CreateVm",
            create({"boot": {"kernel_path": f"{store}/escape"}}),
            "invalid_argument",
            "kernel_path",
        ),
        Case(
            "kernel_path dir symlink out",
            "CreateVm",
            create({"boot": {"kernel_path": "etc-link/passwd"}}),
            "invalid_argument",
            "kernel_path",
        ),
        Case(
            "kernel_path nested symlink out",
            "CreateVm",
            create({"boot": {"kernel_path": "blobs/up/etc/passwd"}}),
            "invalid_argument",
            "kernel_path",
        ),
        Case(
            "kernel_path a directory",
            "CreateVm",
            create({"boot": {"kernel_path": "blobs"}}),
            "invalid_argument",
            "kernel_path",
        ),
        Case(
            "initrd_path /etc/passwd",
            "CreateVm",
            create({"boot": {"initrd_path": "/etc/passwd"}}),
            "invalid_argument",
            "initrd_path",
        ),
        Case(
            "storage /dev/vda",
            "CreateVm",
            create({"storage": [{"id": "root", "path": "/dev/vda", "is_root_device": True}]}),
            "invalid_argument",
            "storage",
        ),
        Case(
            "storage symlink out",
            "CreateVm",
            create({"storage": [{"id": "root", "path": "escape", "is_root_device": True}]}),
            "invalid_argument",
            "storage",
        ),
        Case(
            "network address outside the subnet",
            "CreateVm",
            create({"network": [{"id": "eth0", "ipv4_config": {"address": "192.0.2.7"}}]}),
            "invalid_argument",
            "network",
        ),
        Case(
            "two network interfaces",
            "CreateVm",
            create({"network": [{"id": "eth0"}, {"id": "eth1"}]}),
            "invalid_argument",
            "network",
        ),
        Case("duplicate vm_id", "CreateVm", {"vm_id": "v-created"}, "already_exists", "v-created"),
        # -- ListVms ------------------------------------------------------------------------
        Case("page_size negative", "ListVms", {"page_size": -1}, "invalid_argument", "page_size"),
        Case(
            "page_token garbage",
            "ListVms",
            {"page_token": "not a token!"},
            "invalid_argument",
            "page_token",
        ),
        Case(
            "page_token wrong shape",
            "ListVms",
            {"page_token": base64.urlsafe_b64encode(b'{"a": 1}').decode()},
            "invalid_argument",
            "page_token",
        ),
        # -- wrong state ------------------------------------------------------------------------
        Case("pause CREATED", "PauseVm", {"vm_id": "v-created"}, "failed_precondition", "CREATED"),
        Case(
            "resume CREATED", "ResumeVm", {"vm_id": "v-created"}, "failed_precondition", "CREATED"
        ),
        Case(
            "reboot CREATED", "RebootVm", {"vm_id": "v-created"}, "failed_precondition", "CREATED"
        ),
        Case(
            "shutdown CREATED",
            "ShutdownVm",
            {"vm_id": "v-created"},
            "failed_precondition",
            "CREATED",
        ),
        Case(
            "resume RUNNING", "ResumeVm", {"vm_id": "v-running"}, "failed_precondition", "RUNNING"
        ),
        Case("boot RUNNING", "BootVm", {"vm_id": "v-running"}, "failed_precondition", "RUNNING"),
        Case(
            "delete RUNNING without force",
            "DeleteVm",
            {"vm_id": "v-running"},
            "failed_precondition",
            "RUNNING",
        ),
        Case("pause PAUSED", "PauseVm", {"vm_id": "v-paused"}, "failed_precondition", "PAUSED"),
        Case("reboot PAUSED", "RebootVm", {"vm_id": "v-paused"}, "failed_precondition", "PAUSED"),
        Case("boot PAUSED", "BootVm", {"vm_id": "v-paused"}, "failed_precondition", "PAUSED"),
        Case(
            "delete PAUSED without force",
            "DeleteVm",
            {"vm_id": "v-paused"},
            "failed_precondition",
            "PAUSED",
        ),
        Case("pause SHUTDOWN", "PauseVm", {"vm_id": "v-off"}, "failed_precondition", "SHUTDOWN"),
        Case("resume SHUTDOWN", "ResumeVm", {"vm_id": "v-off"}, "failed_precondition", "SHUTDOWN"),
        Case("reboot SHUTDOWN", "RebootVm", {"vm_id": "v-off"}, "failed_precondition", "SHUTDOWN"),
        Case(
            "shutdown SHUTDOWN",
            "ShutdownVm",
            {"vm_id": "v-off", "force": True},
            "failed_precondition",
            "SHUTDOWN",
        ),
        Case(
            "shutdown negative timeout",
            "ShutdownVm",
            {"vm_id": "v-running", "timeout_seconds": -1},
            "invalid_argument",
            "timeout_seconds",
        ),
        # -- ids --------------------------------------------------------------------------------
        Case("get unknown id", "GetVmInfo", {"vm_id": "no-such-vm"}, "not_found"),
        Case("boot unknown id", "BootVm", {"vm_id": "no-such-vm"}, "not_found"),
        Case("delete unknown id", "DeleteVm", {"vm_id": "no-such-vm", "force": True}, "not_found"),
        Case("get empty id", "GetVmInfo", {}, "invalid_argument", "vm_id"),
        Case("get malformed id", "GetVmInfo", {"vm_id": "NOT VALID"}, "invalid_argument", "vm_id"),
        # -- the transport ----------------------------------------------------------------------
        Case("malformed JSON", "GetVmInfo", b'{"vm_id": ', "invalid_argument", http_status=400),
        Case(
            "JSON of the wrong type",
            "GetVmInfo",
            b'{"vm_id": 5}',
            "invalid_argument",
            http_status=400,
        ),
        Case(
            "int64 not a number",
            "CreateVm",
            b'{"config": {"memory": {"size_bytes": "lots"}}}',
            "invalid_argument",
            http_status=400,
        ),
        Case(
            "unknown state number",
            "ListVms",
            b'{"state_filter": [99]}',
            "invalid_argument",
            "state_filter",
            http_status=400,
        ),
        Case(
            "page_size beyond int32",
            "ListVms",
            b'{"page_size": 2147483648}',
            "invalid_argument",
            http_status=400,
        ),
        Case("empty body", "GetVmInfo", b"", "invalid_argument", http_status=400),
        Case(
            "content type text/plain",
            "ListVms",
            b"{}",
            "",
            headers={"Content-Type": "text/plain"},
            http_status=415,
        ),
        Case(
            "content type xml",
            "CreateVm",
            b"<vm/>",
            "",
            headers={"Content-Type": "application/xml"},
            http_status=415,
        ),
        Case("body over 1 MiB", "CreateVm", big, "resource_exhausted"),
        Case("unknown method", "RebuildVm", {}, "", http_status=404),
    ]


def _send(daemon: Daemon, case: Case) -> tuple[int, dict[str, Any]]:
    body = case.body if isinstance(case.body, bytes) else json.dumps(case.body).encode()
    headers = {**JSON, **(case.headers or {})}
    status, text = curl_raw(
        f"{daemon.url}/{SERVICE}/{case.method}", body, headers, extra=["-H", "Expect:"]
    )
    try:
        data = json.loads(text) if text.strip() else {}
    except ValueError:
        data = {"unparsed": text[:200]}
    return status, data if isinstance(data, dict) else {"unparsed": text[:200]}


def test_bad_requests_change_nothing(
    metald_factory: Callable[..., Daemon], private_store: Path, callers: Callable[..., Caller]
) -> None:
    daemon = metald_factory(UNKEY_METALD_ASSETMANAGER_CACHE_DIR=str(private_store))
    call = callers("curl-connect-json", daemon.url)
    # One VM in each kind of state (none needs its guest to be up).
    call.must("CreateVm", {"vm_id": "v-created"})
    call.must("CreateVm", {"vm_id": "v-running"})
    call.must("BootVm", {"vm_id": "v-running"})
    call.must("CreateVm", {"vm_id": "v-paused"})
    call.must("BootVm", {"vm_id": "v-paused"})
    call.must("PauseVm", {"vm_id": "v-paused"})
    call.must("CreateVm", {"vm_id": "v-off"})
    call.must("BootVm", {"vm_id": "v-off"})
    call.must("ShutdownVm", {"vm_id": "v-off", "force": True})
    states = {
        v: state_name(call.info(v).body["state"])
        for v in ("v-created", "v-running", "v-paused", "v-off")
    }
    assert states == {
        "v-created": "CREATED",
        "v-running": "RUNNING",
        "v-paused": "PAUSED",
        "v-off": "SHUTDOWN",
    }
    before = daemon.snapshot()
    assert len(before[1]) == 3, f"expected 3 QEMU processes (created, running, paused): {before[1]}"

    wrong: list[str] = []
    all_cases = cases(private_store)
    assert len(all_cases) >= 25
    for case in all_cases:
        status, data = _send(daemon, case)
        got = data.get("code", "")
        problems = []
        if case.http_status is not None and status != case.http_status:
            problems.append(f"HTTP {status}, expected {case.http_status}")
        if case.code and got != case.code:
            problems.append(f"code {got or '(none)'!r}, expected {case.code!r}")
        message = str(data.get("message", ""))
        if case.mentions and case.mentions.lower() not in message.lower():
            problems.append(f"message {message!r} does not name {case.mentions!r}")
        sent = (
            case.body.decode(errors="replace")
            if isinstance(case.body, bytes)
            else json.dumps(case.body)
        )
        if "/etc" in message and "/etc" not in sent:
            problems.append(f"message reveals a host path it was not sent: {message!r}")
        if problems:
            wrong.append(
                f"{case.name}: {case.method} -> HTTP {status} {data}: " + "; ".join(problems)
            )

    wrong += _grpc_cases(callers("grpcio", daemon.url))  # type: ignore[arg-type]

    after = daemon.snapshot()
    assert not wrong, f"{len(wrong)} bad requests answered wrongly:\n" + "\n".join(wrong)
    assert after == before, f"bad requests changed the host:\nbefore {before}\nafter  {after}"
    assert pid_alive(int(call.info("v-running").body["backend_info"]["pid"]))

    for vm_id in ("v-created", "v-running", "v-paused", "v-off"):
        call.must("DeleteVm", {"vm_id": vm_id, "force": True})
    assert not daemon.qemu_pids()


def _grpc_cases(g: Grpcio) -> list[str]:
    expectations: list[tuple[str, str, Any, str]] = [
        ("vcpu 33", "CreateVm", {"config": {"cpu": {"vcpu_count": 33}}}, "invalid_argument"),
        ("pause CREATED", "PauseVm", {"vm_id": "v-created"}, "failed_precondition"),
        ("delete RUNNING without force", "DeleteVm", {"vm_id": "v-running"}, "failed_precondition"),
        ("unknown id", "GetVmInfo", {"vm_id": "no-such-vm"}, "not_found"),
        (
            "network IPv6 address outside the subnet",
            "CreateVm",
            {"config": {"network": [{"id": "eth0", "ipv6_config": {"address": "2001:db8::1"}}]}},
            "invalid_argument",
        ),
        ("duplicate", "CreateVm", {"vm_id": "v-running"}, "already_exists"),
        (
            "kernel symlink out",
            "CreateVm",
            {"config": {"boot": {"kernel_path": "escape"}}},
            "invalid_argument",
        ),
        (
            "over 1 MiB",
            "CreateVm",
            {"config": {"metadata": {"k": "x" * (2 * MIB)}}},
            "resource_exhausted",
        ),
    ]
    wrong = []
    for name, method, body, code in expectations:
        reply = g(method, body)
        if reply.code != code:
            wrong.append(f"grpcio {name}: {method} -> {reply!r}, expected {code}")
    # Bytes that are not a protobuf message at all.
    stub = g.channel.unary_unary(
        f"/{SERVICE}/GetVmInfo",
        request_serializer=lambda b: b,
        response_deserializer=pb.GetVmInfoResponse.FromString,
    )
    try:
        stub(
            b"\xff\xff\xff\xff",
            metadata=[("authorization", "Bearer dev_customer_acme")],
            timeout=30,
        )
        wrong.append("grpcio garbage bytes: answered ok")
    except grpc.RpcError as e:
        if e.code() not in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INTERNAL):
            wrong.append(f"grpcio garbage bytes: {e.code()} {e.details()}")
    return wrong
