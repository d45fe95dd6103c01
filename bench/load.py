"""Load generators and store fixtures for the API benchmarks (bench/api.py, bench/scale.py).

The load comes from wrk (Connect JSON over HTTP/1.1, a Lua script for the POST body and the
bearer token) and h2load (gRPC over h2c, a length-prefixed protobuf body; its per-request
log gives the percentiles): C programs, so the figures are the server's, not a Python
client's (notes/connect-stack.md: an httpx loop measures itself). Every run checks that
every answer was a success: a benchmark of errors is no benchmark.

Rows for a big store are written straight into the stopped daemon's SQLite, as the store
would write them (VmConfig.to_dict, this host's node name), all SHUTDOWN: start-up adopts
nothing and ListVms pages through them like any other.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message

from metald.core.models import VmConfig

from .daemon import BenchDaemon
from .harness import percentile

SERVICE = "vmprovisioner.v1.VmService"


@dataclass(frozen=True)
class LoadResult:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int


class LoadError(RuntimeError):
    """The load generator saw failures (or none of its requests completed)."""


def connect_call(url: str, method: str, body: dict[str, Any], token: str) -> dict[str, Any]:
    """One Connect JSON call; its answer (raises for a non-200 answer)."""
    request = urllib.request.Request(
        f"{url}/{SERVICE}/{method}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=30) as answer:
        result: dict[str, Any] = json.loads(answer.read())
        return result


def wrk(
    url: str,
    method: str,
    body: dict[str, Any],
    token: str,
    *,
    seconds: float,
    connections: int = 16,
    threads: int = 2,
) -> LoadResult:
    """Connect JSON unary calls with wrk for `seconds`; every answer must be a 2xx."""
    script = (
        'wrk.method = "POST"\n'
        f"wrk.body = {_lua_string(json.dumps(body))}\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["Authorization"] = {_lua_string("Bearer " + token)}\n'
    )
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as lua:
        lua.write(script)
        lua.flush()
        out = subprocess.run(
            ["wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s",
             "--latency", "-s", lua.name, f"{url}/{SERVICE}/{method}"],
            capture_output=True, text=True, timeout=seconds + 60, check=False,
        )  # fmt: skip
    text = out.stdout
    if out.returncode != 0 or "Requests/sec" not in text:
        raise LoadError(f"wrk failed: {text}\n{out.stderr}")
    if "Non-2xx" in text or "Socket errors" in text:
        raise LoadError(f"wrk saw failed requests:\n{text}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))  # type: ignore[union-attr]
    done = int(re.search(r"(\d+) requests in", text).group(1))  # type: ignore[union-attr]
    quantiles = {
        m.group(1): _ms(float(m.group(2)), m.group(3))
        for m in re.finditer(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$", text, re.MULTILINE)
    }
    return LoadResult(rps, quantiles["50"], quantiles["99"], done)


def h2load(
    url: str,
    method: str,
    message: Message,
    token: str,
    *,
    seconds: float,
    connections: int = 16,
    threads: int = 2,
) -> LoadResult:
    """gRPC unary calls over h2c with h2load (one stream in flight per connection) for
    `seconds`; every request must complete with HTTP 200 (grpc-status is checked once, by
    grpc_check, before the load)."""
    payload = message.SerializeToString()
    framed = struct.pack(">BI", 0, len(payload)) + payload
    with (
        tempfile.NamedTemporaryFile(suffix=".bin") as body,
        tempfile.NamedTemporaryFile("r", suffix=".log") as log,
    ):
        body.write(framed)
        body.flush()
        out = subprocess.run(
            ["h2load", f"-c{connections}", f"-t{threads}", "-m1", f"-D{max(1, round(seconds))}",
             "--warm-up-time=1", "-d", body.name, f"--log-file={log.name}",
             "-H", "content-type: application/grpc", "-H", "te: trailers",
             "-H", f"authorization: Bearer {token}", f"{url}/{SERVICE}/{method}"],
            capture_output=True, text=True, timeout=seconds + 60, check=False,
        )  # fmt: skip
        lines = Path(log.name).read_text().splitlines()
    text = out.stdout
    match = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded", text)
    if out.returncode != 0 or match is None:
        raise LoadError(f"h2load failed: {text}\n{out.stderr}")
    done, succeeded = int(match.group(2)), int(match.group(3))
    if done == 0 or succeeded != done or re.search(r"\b[1-9]\d* (failed|errored)", text):
        raise LoadError(f"h2load saw failed requests:\n{text}")
    if not re.search(r"status codes: \d+ 2xx, 0 3xx, 0 4xx, 0 5xx", text):
        raise LoadError(f"h2load saw answers other than 200:\n{text}")
    # Status 0: a request the end of the duration cut short (not counted as done).
    statuses = [s for s in (line.split("\t") for line in lines if line.strip()) if s[1] != "0"]
    if any(s[1] != "200" for s in statuses):
        seen = Counter(s[1] for s in statuses)
        raise LoadError(f"h2load saw non-200 answers: {dict(seen)}\n{text}")
    durations = [int(s[2]) / 1000 for s in statuses]
    rps = float(re.search(r"finished in [\d.]+\w*, ([\d.]+) req/s", text).group(1))  # type: ignore[union-attr]
    return LoadResult(rps, percentile(durations, 0.5), percentile(durations, 0.99), done)


def grpc_check(url: str, method: str, message: Message, token: str) -> None:
    """One gRPC call with grpcio: the call h2load repeats must succeed."""
    import grpc

    from metald.gen.vmprovisioner.v1 import vm_pb2

    host = url.removeprefix("http://")
    response: Any = {"GetVmInfo": vm_pb2.GetVmInfoResponse, "ListVms": vm_pb2.ListVmsResponse}[
        method
    ]
    with grpc.insecure_channel(host, options=[("grpc.enable_http_proxy", 0)]) as channel:
        call = channel.unary_unary(
            f"/{SERVICE}/{method}",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=response.FromString,
        )
        call(message, metadata=[("authorization", f"Bearer {token}")], timeout=30)


def parse(method: str, body: dict[str, Any]) -> Message:
    """A request message of `method` from its JSON body."""
    from metald.gen.vmprovisioner.v1 import vm_pb2

    request: Any = {"GetVmInfo": vm_pb2.GetVmInfoRequest, "ListVms": vm_pb2.ListVmsRequest}[method]
    message: Message = json_format.ParseDict(body, request())
    return message


def insert_rows(db: Path, count: int, customers: list[str], *, start: float = 1.7e9) -> None:
    """`count` SHUTDOWN VM rows, spread round-robin over `customers`, into a migrated store
    whose daemon is stopped. Ids `bench-<customer>-<n>`; one second apart in created_at."""
    config = json.dumps(VmConfig(metadata={"purpose": "bench"}).to_dict())
    node = socket.gethostname()
    rows = (
        (f"bench-{customers[i % len(customers)]}-{i}", customers[i % len(customers)], config,
         "SHUTDOWN", "qemu", None, None, "{}", node, start + i, start + i, None)
        for i in range(count)
    )  # fmt: skip
    with sqlite3.connect(db) as conn:
        conn.executemany(
            "INSERT INTO vms (id, customer_id, config, state, backend, pid, pid_start_time,"
            " backend_info, node, created_at, updated_at, deleted_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
    conn.close()


def wait_healthy(url: str, timeout: float = 60.0) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + timeout
    while True:
        try:
            with opener.open(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise LoadError(f"{url} did not become healthy")
        time.sleep(0.05)


def _ms(value: float, unit: str) -> float:
    return value * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def _lua_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def remove_vms(daemon: BenchDaemon, tokens: list[str]) -> None:
    """Delete (force) every VM of `tokens`' customers through the API, then end any VMM
    still in the daemon's cgroup parent by its pid and remove the emptied cgroups: VMMs
    outlive their daemon by design, so a benchmark that did not do this would leave its
    guests running on the shared machine."""
    if daemon.proc is not None and daemon.proc.poll() is None:
        for token in tokens:
            try:
                listed = connect_call(daemon.url, "ListVms", {"pageSize": 1000}, token)
                for vm in listed.get("vms", []):
                    body = {"vmId": vm["vmId"], "force": True}
                    connect_call(daemon.url, "DeleteVm", body, token)
            except OSError as e:
                print(f"could not delete the VMs of {token}: {e}", file=sys.stderr)
    parent = Path("/sys/fs/cgroup") / daemon.env["UNKEY_METALD_JAILER_CGROUP_PARENT"]
    if not parent.is_dir():
        return
    for group in [p for p in parent.iterdir() if p.is_dir()]:
        for pid in (group / "cgroup.procs").read_text().split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        for _ in range(100):
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.05)
    with contextlib.suppress(OSError):
        parent.rmdir()
