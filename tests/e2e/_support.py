"""What the e2e tests share: the daemon as a process, callers that are not ours, and probes of
the host (processes, console logs, the SQLite database) that do not go through metald.

Nothing here imports metald's own code except the generated protobuf messages, which stand
for the wire contract (proto/vmprovisioner/v1/vm.proto).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import sqlite3
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message
from pyroute2 import netns

from metald.gen.vmprovisioner.v1 import vm_pb2 as pb
from metald.host.process import child_pids, read_stat

ROOT = Path(__file__).resolve().parents[2]
METALD = ROOT / ".venv" / "bin" / "metald"
BUF = ROOT / "node_modules" / ".bin" / "buf"
PROTO = ROOT / "proto" / "vmprovisioner" / "v1" / "vm.proto"
ASSETS = Path(os.environ.get("METALD_E2E_ASSETS", str(ROOT / "var" / "assets")))
SERVICE = "vmprovisioner.v1.VmService"
TMP_PREFIX = "metald-e2e-"
MIB = 1024 * 1024

# RPC name -> (request type, response type)
METHODS: dict[str, tuple[type[Message], type[Message]]] = {
    "CreateVm": (pb.CreateVmRequest, pb.CreateVmResponse),
    "DeleteVm": (pb.DeleteVmRequest, pb.DeleteVmResponse),
    "BootVm": (pb.BootVmRequest, pb.BootVmResponse),
    "ShutdownVm": (pb.ShutdownVmRequest, pb.ShutdownVmResponse),
    "PauseVm": (pb.PauseVmRequest, pb.PauseVmResponse),
    "ResumeVm": (pb.ResumeVmRequest, pb.ResumeVmResponse),
    "RebootVm": (pb.RebootVmRequest, pb.RebootVmResponse),
    "GetVmInfo": (pb.GetVmInfoRequest, pb.GetVmInfoResponse),
    "ListVms": (pb.ListVmsRequest, pb.ListVmsResponse),
    "GetVmConsole": (pb.GetVmConsoleRequest, pb.GetVmConsoleResponse),
}

T = TypeVar("T")


# -- waiting ---------------------------------------------------------------------------------


def wait_until(probe: Callable[[], T], timeout: float, what: str, interval: float = 0.1) -> T:
    """Poll `probe` until it returns something truthy; that value, or AssertionError."""
    deadline = time.monotonic() + timeout
    last: T = probe()
    while not last:
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})"
            )
        time.sleep(interval)
        last = probe()
    return last


def stays(probe: Callable[[], bool], duration: float, what: str, interval: float = 0.1) -> None:
    """Assert `probe` holds at every look during `duration` seconds (for absences of events:
    the only place where the suite watches the clock instead of waiting for something)."""
    deadline = time.monotonic() + duration
    while time.monotonic() < deadline:
        assert probe(), f"{what} stopped holding"
        time.sleep(interval)
    assert probe(), f"{what} stopped holding"


# -- processes (read from /proc, never through metald) ---------------------------------------


def proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks) of a process, None if there is none."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text(errors="replace")
    except OSError:
        return None
    rest = text[text.rindex(")") + 2 :].split()
    return rest[0], int(rest[22 - 3])


def proc_state(pid: int) -> str | None:
    st = proc_stat(pid)
    return None if st is None else st[0]


def reap(pid: int) -> None:
    """Collect the exit status if the process is a child of ours (the suite is a subreaper,
    so a VMM orphaned by a killed daemon becomes our child); nothing otherwise."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def pid_alive(pid: int, start_time: int | None = None) -> bool:
    """Running or sleeping (a zombie has exited); with start_time, only that very process."""
    st = proc_stat(pid)
    if st is None:
        return False
    if st[0] in ("Z", "X"):
        reap(pid)
        return False
    return start_time is None or st[1] == start_time


def wait_pid_gone(pid: int, timeout: float = 10.0) -> None:
    wait_until(lambda: not pid_alive(pid), timeout, f"process {pid} to exit")


def cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def qemu_processes(
    mentioning: str | None = None, *, include_zombies: bool = False
) -> dict[int, str]:
    """pid -> command line of every qemu-system-* process (whose command line mentions
    `mentioning`, when given)."""
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm = (entry / "comm").read_text().strip()
        except OSError:
            continue
        if not comm.startswith("qemu-system"):
            continue
        pid = int(entry.name)
        state = proc_state(pid)
        if state is None or (state in ("Z", "X") and not include_zombies):
            if state in ("Z", "X"):
                reap(pid)
            continue
        line = cmdline(pid)
        try:
            stderr = os.readlink(f"/proc/{pid}/fd/2")
        except OSError:
            stderr = ""
        # A jailed QEMU's command line names only paths inside its jail; its stderr is the
        # qemu.stderr in its VM directory.
        if mentioning is None or mentioning in line or stderr.startswith(mentioning):
            found[pid] = line
    return found


def reap_zombie_children() -> None:
    """Reap exited VMMs that were re-parented to us; leave every other child alone."""
    for pid in child_pids(os.getpid()):
        stat = read_stat(pid)
        if stat is not None and stat.state.startswith("Z") and _comm(pid).startswith("qemu-system"):
            reap(pid)


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def spare_helpers_of(pid: int) -> list[int]:
    """The spare jailer helpers (`python -I -m metald.jailer --wait`) daemon `pid` keeps."""
    found = []
    for child in child_pids(pid):
        line = cmdline(child)
        if "metald.jailer" in line and "--wait" in line:
            found.append(child)
    return found


def reap_orphaned(pids: list[int], timeout: float = 10.0) -> None:
    """A daemon killed with SIGKILL leaves its spare helpers to this process (the suite is a
    subreaper): they exit as their socket to the daemon closes; collect them, so no zombie
    is left (tests/integration/test_jailer.py checks this process has no children)."""
    deadline = time.monotonic() + timeout
    for pid in pids:
        while True:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                break  # not ours (no subreaper) or already collected
            if done or time.monotonic() > deadline:
                break
            time.sleep(0.02)


def cpu_ticks(pid: int) -> int:
    text = Path(f"/proc/{pid}/stat").read_text(errors="replace")
    rest = text[text.rindex(")") + 2 :].split()
    return int(rest[14 - 3]) + int(rest[15 - 3])


# -- the network (loopback only) -------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def client_env() -> dict[str, str]:
    """The environment for client programs: no proxies (all traffic is to 127.0.0.1)."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    return env


def http_get(
    url: str, timeout: float = 10.0, context: ssl.SSLContext | None = None
) -> tuple[int, bytes]:
    handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
    if context is not None:  # https: the daemon's CA (and a client certificate for mTLS)
        handlers.append(urllib.request.HTTPSHandler(context=context))
    opener = urllib.request.build_opener(*handlers)
    try:
        with opener.open(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


# -- the daemon ------------------------------------------------------------------------------


def _uid_range(tag: str) -> str:
    """100 VMM ids of a daemon's own, above any host user's (from its random tag)."""
    first = 1_000_000 + int(tag, 16) % 100_000 * 100
    return f"{first}-{first + 99}"


class Daemon:
    """`metald serve` as a separate process in its own session, on a free port and its own
    data directory. stop()/kill9()/start_again() keep the port and the data directory."""

    def __init__(
        self,
        workdir: Path,
        env: dict[str, str],
        name: str = "metald",
        command_prefix: tuple[str, ...] = (),
        client_tls: ssl.SSLContext | None = None,
    ) -> None:
        self.workdir = workdir
        # A daemon with UNKEY_METALD_TLS_MODE set: how its /health is reached (https).
        self.client_tls = client_tls
        self.name = name
        # Run `metald serve` under this (e.g. `unshare --mount ...`, which execs it: the
        # pid stays the daemon's).
        self.command_prefix = command_prefix
        self.port = free_port()
        # The dedicated Prometheus listener: a free port of its own too (the default, 9464,
        # is one per host, and the suite runs many daemons at once).
        self.metrics_port = free_port()
        self.data_dir = workdir / "data"
        self.log_path = workdir / f"{name}.log"
        tag = secrets.token_hex(3)
        self.cgroup_parent = f"metald-test-{tag}"
        self.host_netns = f"mth{tag}"
        self.segments_netns = f"mts{tag}"
        self.vm_netns_prefix = f"mtv{tag}-"
        netns.create(self.host_netns)
        # Jails need a base only root can write: a directory of its own, not the temp tree.
        self.jail_dir = Path(tempfile.mkdtemp(prefix="mj", dir="/tmp"))
        self.env = {
            **client_env(),
            "UNKEY_METALD_ADDRESS": "127.0.0.1",
            "UNKEY_METALD_PORT": str(self.port),
            "UNKEY_METALD_OTEL_PROMETHEUS_PORT": str(self.metrics_port),
            "UNKEY_METALD_BACKEND": "qemu",
            "UNKEY_METALD_DATA_DIR": str(self.data_dir),
            "UNKEY_METALD_ASSETMANAGER_CACHE_DIR": str(ASSETS),
            "UNKEY_METALD_AUTH_DEV_TOKENS": "true",
            "UNKEY_METALD_QEMU_ACCEL": "tcg",
            # The network lives in namespaces of this daemon's own (never the machine's).
            "UNKEY_METALD_NETWORK_HOST_NETNS": self.host_netns,
            "UNKEY_METALD_NETWORK_SEGMENTS_NETNS": self.segments_netns,
            "UNKEY_METALD_NETWORK_NETNS_PREFIX": self.vm_netns_prefix,
            "UNKEY_METALD_JAILER_CHROOT_DIR": str(self.jail_dir),
            # Two daemons on one host need their own cgroup parents, as their own jail bases.
            "UNKEY_METALD_JAILER_CGROUP_PARENT": self.cgroup_parent,
            # The tests read pids and host paths from backend_info (a tenant does not see
            # them: tests/e2e/test_tenant_view.py runs a daemon without this).
            "UNKEY_METALD_EXPOSE_HOST_DETAILS": "true",
            # The suite's daemons outlive many tests' VMs; the host's committed-vCPU ceiling
            # (cores x 4 by default: 8 here) is tested by test_quotas.py with its own daemon.
            "UNKEY_METALD_HOST_VCPUS": "256",
            # ...and their own VMM uid ranges (each daemon has its own store).
            "UNKEY_METALD_JAILER_UID_RANGE": _uid_range(tag),
            # Billing is on by default (to localhost:8081): a test that wants it starts its
            # own `metald billing-sink` and passes its endpoint with _ENABLED=true.
            "UNKEY_METALD_BILLING_ENABLED": "false",
            **env,
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.exit_codes: list[int] = []
        self.killed = False  # stopped with SIGKILL at least once (no clean exit expected)

    @property
    def url(self) -> str:
        scheme = "https" if self.client_tls is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        """The dedicated Prometheus listener's /metrics."""
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def db_path(self) -> Path:
        return self.data_dir / "metald.db"

    def jail_ids(self) -> dict[str, int]:
        """The uid (and gid: the same number) each VM's VMM runs as, from the store."""
        con = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=10)
        try:
            return {vm: int(uid) for vm, uid in con.execute("SELECT vm_id, uid FROM jail_ids")}
        finally:
            con.close()

    @property
    def pid(self) -> int:
        assert self.proc is not None, "the daemon is not running"
        return self.proc.pid

    def start(self, timeout: float = 60.0) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        with open(self.log_path, "ab") as log:
            log.write(f"\n===== {self.name}: start at {time.strftime('%X')} =====\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [*self.command_prefix, str(METALD), "serve"],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=self.workdir,
            )
        proc = self.proc

        def healthy() -> bool:
            if proc.poll() is not None:
                raise AssertionError(
                    f"{self.name} exited with {proc.returncode} during start-up:\n{self.log_tail()}"
                )
            try:
                status, _ = http_get(self.url + "/health", timeout=2, context=self.client_tls)
            except OSError:
                return False
            return status == 200

        try:
            wait_until(healthy, timeout, f"{self.name} to answer /health with 200", interval=0.1)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.log_tail()}\n{self.port_holders()}") from None

    def port_holders(self) -> str:
        """Who listens on our port (`ss`), to explain an "Address already in use"."""
        out = subprocess.run(
            ["ss", "-Hltnp", f"sport = :{self.port}"], capture_output=True, text=True, check=False
        )
        return f"listening on port {self.port}: {out.stdout.strip() or '(nobody)'}"

    start_again = start

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM by pid; its exit code. SIGKILL (and AssertionError) if it does not stop."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return proc.returncode if proc else 0
        os.kill(proc.pid, signal.SIGTERM)
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            spares = spare_helpers_of(proc.pid)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
            self.killed = True
            reap_orphaned(spares)
            raise AssertionError(
                f"{self.name} (pid {proc.pid}) did not exit within {timeout}s of SIGTERM"
            ) from None
        self.exit_codes.append(code)
        return code

    def kill9(self) -> None:
        proc = self.proc
        assert proc is not None and proc.poll() is None, "the daemon is not running"
        spares = spare_helpers_of(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        self.killed = True
        reap_orphaned(spares)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def remove_namespaces(self) -> list[str]:
        """Remove this daemon's namespaces and jail base; a VM namespace or jail still there
        is a leak."""
        problems = []
        for backend in ("qemu", "firecracker"):
            jails = self.jail_dir / backend
            if jails.is_dir() and any(jails.iterdir()):
                problems.append(f"{backend} jails left behind: {sorted(os.listdir(jails))}")
        shutil.rmtree(self.jail_dir, ignore_errors=True)
        for hierarchy in ("/sys/fs/cgroup/unified", "/sys/fs/cgroup"):
            parent = Path(hierarchy) / self.cgroup_parent
            if parent.is_dir():
                try:
                    parent.rmdir()  # a cgroup directory goes with rmdir once it has no children
                except OSError as exc:
                    problems.append(f"cgroup left behind: {parent}: {exc.strerror}")
        for name in netns.listnetns():
            if name.startswith(self.vm_netns_prefix):
                problems.append(f"network namespace left behind: {name}")
            if name.startswith(self.vm_netns_prefix) or name in (
                self.host_netns,
                self.segments_netns,
            ):
                netns.remove(name)
        return problems

    # What the host holds for this daemon, looked at directly.

    def vm_dir(self, vm_id: str) -> Path:
        return self.data_dir / "vms" / vm_id

    def vm_dirs(self) -> set[str]:
        d = self.data_dir / "vms"
        return {p.name for p in d.iterdir()} if d.is_dir() else set()

    def qemu_pids(self) -> set[int]:
        return set(qemu_processes(str(self.data_dir)))

    def recorded_processes(self) -> dict[str, tuple[int, int | None]]:
        """vm id -> (pid, start time) from every <data>/vms/*/process.json."""
        found: dict[str, tuple[int, int | None]] = {}
        for pj in sorted((self.data_dir / "vms").glob("*/process.json")):
            try:
                data = json.loads(pj.read_text())
                found[pj.parent.name] = (int(data["pid"]), data.get("start_time"))
            except (OSError, ValueError, KeyError, TypeError):
                continue
        return found

    def db_rows(self) -> dict[str, dict[str, Any]]:
        """Every row of the vms table, read with sqlite3 (not through metald)."""
        if not self.db_path.exists():
            return {}
        con = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=10)
        try:
            con.row_factory = sqlite3.Row
            rows = con.execute("SELECT * FROM vms").fetchall()
        finally:
            con.close()
        return {r["id"]: dict(r) for r in rows}

    def snapshot(self) -> tuple[dict[str, tuple[Any, ...]], set[int], set[str]]:
        """(rows: id -> (customer, state, pid, deleted_at), qemu pids, per-VM dirs)."""
        rows = {
            vm_id: (r["customer_id"], r["state"], r["pid"], r["deleted_at"])
            for vm_id, r in self.db_rows().items()
        }
        return rows, self.qemu_pids(), self.vm_dirs()


# -- callers ---------------------------------------------------------------------------------

DEFAULT = object()  # "the caller's own token"


@dataclass
class Reply:
    """An RPC outcome as any client saw it: code "ok" or a Connect code; for ok, the response
    parsed strictly into the schema's message (so a misnamed field fails) and as a dict with
    proto field names and every field present."""

    code: str
    message: str = ""
    msg: Any = None
    http_status: int | None = None
    raw: str = ""
    body: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.code == "ok"

    def __repr__(self) -> str:
        if self.ok:
            return f"Reply(ok, {self.body})"
        return (
            f"Reply({self.code}, {self.message!r}, http={self.http_status}, raw={self.raw[:300]!r})"
        )


def _ok(method: str, payload: dict[str, Any] | Message, **extra: Any) -> Reply:
    resp_type = METHODS[method][1]
    # A JSON answer is parsed strictly: a field the schema does not have fails the test.
    msg = payload if isinstance(payload, Message) else json_format.ParseDict(payload, resp_type())
    body = json_format.MessageToDict(
        msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return Reply("ok", msg=msg, body=body, **extra)


def _error_from_json(text: str, http_status: int | None = None) -> Reply:
    try:
        data = json.loads(text)
        if isinstance(data, dict) and "code" in data:
            return Reply(
                str(data["code"]), str(data.get("message", "")), http_status=http_status, raw=text
            )
    except ValueError:
        pass
    return Reply(
        f"http_{http_status}" if http_status else "client_error",
        text.strip(),
        http_status=http_status,
        raw=text,
    )


def state_name(value: int | str) -> str:
    """'RUNNING' from pb.VM_STATE_RUNNING or 'VM_STATE_RUNNING'."""
    if isinstance(value, int):
        value = pb.VmState.Name(value)
    return value.removeprefix("VM_STATE_")


class Caller:
    """Calls one RPC with a JSON-ish request dict: `caller("BootVm", {"vm_id": x})`."""

    name = "abstract"

    def __init__(self, url: str, token: str | None = "dev_customer_acme") -> None:
        self.url = url
        self.token = token

    def _token(self, token: Any) -> str | None:
        return self.token if token is DEFAULT else token

    def __call__(
        self,
        method: str,
        request: dict[str, Any] | None = None,
        *,
        token: Any = DEFAULT,
        timeout: float = 120.0,
    ) -> Reply:
        raise NotImplementedError

    def close(self) -> None:
        pass

    # Conveniences for the usual steps; each asserts that the call worked.

    def must(self, method: str, request: dict[str, Any] | None = None, **kw: Any) -> Reply:
        reply = self(method, request, **kw)
        assert reply.ok, f"{self.name}: {method}({request}) failed: {reply!r}"
        return reply

    def info(self, vm_id: str) -> Reply:
        return self.must("GetVmInfo", {"vm_id": vm_id})

    def state(self, vm_id: str) -> str:
        return state_name(self.info(vm_id).body["state"])


class CurlConnect(Caller):
    """curl, Connect protocol with JSON, HTTP/1.1."""

    name = "curl-connect-json"

    def __call__(
        self,
        method: str,
        request: dict[str, Any] | None = None,
        *,
        token: Any = DEFAULT,
        timeout: float = 120.0,
    ) -> Reply:
        headers = {"Content-Type": "application/json"}
        tok = self._token(token)
        if tok is not None:
            headers["Authorization"] = f"Bearer {tok}"
        status, text = curl_raw(
            f"{self.url}/{SERVICE}/{method}",
            json.dumps(request or {}).encode(),
            headers,
            timeout=timeout,
        )
        if status == 200:
            return _ok(method, json.loads(text), http_status=status, raw=text)
        return _error_from_json(text, status)


def curl_raw(
    url: str,
    body: bytes | None,
    headers: dict[str, str],
    *,
    method: str = "POST",
    timeout: float = 120.0,
    extra: Iterable[str] = (),
) -> tuple[int, str]:
    """Send one HTTP/1.1 request with curl; (status, body text). The body goes via stdin."""
    argv = ["curl", "-sS", "--http1.1", "--noproxy", "*", "-X", method, "--max-time", str(timeout)]
    for k, v in headers.items():
        argv += ["-H", f"{k}: {v}"]
    if body is not None:
        argv += ["--data-binary", "@-"]
    argv += [*extra, "-w", "\n%{http_code}", url]
    out = subprocess.run(
        argv,
        input=body if body is not None else b"",
        capture_output=True,
        timeout=timeout + 10,
        env=client_env(),
        check=False,
    )
    if out.returncode != 0:
        raise AssertionError(
            f"curl failed ({out.returncode}): {out.stderr.decode(errors='replace')}"
        )
    text, _, status = out.stdout.decode(errors="replace").rpartition("\n")
    return int(status), text


_GRPC_TO_CONNECT = {"CANCELLED": "canceled"}


class Grpcio(Caller):
    """The official gRPC client (grpcio) over h2c, generic unary calls."""

    name = "grpcio"

    def __init__(self, url: str, token: str | None = "dev_customer_acme") -> None:
        super().__init__(url, token)
        target = url.removeprefix("http://")
        self.channel = grpc.insecure_channel(
            target,
            options=[
                ("grpc.enable_http_proxy", 0),
                ("grpc.max_send_message_length", 16 * MIB),
                ("grpc.max_receive_message_length", 16 * MIB),
            ],
        )

    def close(self) -> None:
        self.channel.close()

    def __call__(
        self,
        method: str,
        request: dict[str, Any] | Message | None = None,
        *,
        token: Any = DEFAULT,
        timeout: float = 120.0,
    ) -> Reply:
        req_type, resp_type = METHODS[method]
        req = (
            request
            if isinstance(request, Message)
            else json_format.ParseDict(request or {}, req_type())
        )
        stub = self.channel.unary_unary(
            f"/{SERVICE}/{method}",
            request_serializer=req_type.SerializeToString,
            response_deserializer=resp_type.FromString,
        )
        tok = self._token(token)
        metadata = [("authorization", f"Bearer {tok}")] if tok is not None else []
        try:
            resp = stub(req, metadata=metadata, timeout=timeout)
        except grpc.RpcError as e:
            name = e.code().name
            return Reply(_GRPC_TO_CONNECT.get(name, name.lower()), e.details() or "", raw=str(e))
        return _ok(method, resp)


class BufCurl(Caller):
    """`buf curl` (npm @bufbuild/buf) with the schema from the .proto, h2c, in one protocol."""

    def __init__(self, url: str, protocol: str, token: str | None = "dev_customer_acme") -> None:
        super().__init__(url, token)
        self.protocol = protocol
        self.name = f"buf-{protocol}"

    def __call__(
        self,
        method: str,
        request: dict[str, Any] | None = None,
        *,
        token: Any = DEFAULT,
        timeout: float = 120.0,
    ) -> Reply:
        argv = [
            str(BUF),
            "curl",
            "--schema",
            str(PROTO),
            "--http2-prior-knowledge",
            "--protocol",
            self.protocol,
            "--connect-timeout",
            "10",
            "-d",
            json.dumps(request or {}),
        ]
        tok = self._token(token)
        if tok is not None:
            argv += ["-H", f"Authorization: Bearer {tok}"]
        argv.append(f"{self.url}/{SERVICE}/{method}")
        out = subprocess.run(
            argv, capture_output=True, timeout=timeout + 30, env=client_env(), cwd=ROOT, check=False
        )
        stdout = out.stdout.decode(errors="replace")
        stderr = out.stderr.decode(errors="replace")
        if out.returncode == 0:
            return _ok(method, json.loads(stdout) if stdout.strip() else {}, raw=stdout)
        # buf prints the RPC error as JSON {"code", "message"} on stderr.
        start = stderr.find("{")
        reply = _error_from_json(stderr[start:] if start >= 0 else stderr)
        reply.raw = f"rc={out.returncode} stderr={stderr}"
        return reply


CALLER_NAMES = ["curl-connect-json", "grpcio", "buf-connect", "buf-grpc", "buf-grpcweb"]


def make_caller(name: str, url: str, token: str | None = "dev_customer_acme") -> Caller:
    if name == "curl-connect-json":
        return CurlConnect(url, token)
    if name == "grpcio":
        return Grpcio(url, token)
    if name.startswith("buf-"):
        return BufCurl(url, name.removeprefix("buf-"), token)
    raise ValueError(name)


# -- the guest's console ---------------------------------------------------------------------

_READY = re.compile(r"METALD-GUEST READY\b")
_HEARTBEAT = re.compile(r"METALD-GUEST HEARTBEAT (\d+)")
_SHUTDOWN = re.compile(r"METALD-GUEST SHUTDOWN\b")


class _ConsoleLines:
    """What the tests look for in a console's text."""

    def text(self) -> str:
        raise NotImplementedError

    def ready_count(self) -> int:
        return len(_READY.findall(self.text()))

    def heartbeats(self) -> int:
        """How many heartbeat lines the console holds (over every boot of this process)."""
        return len(_HEARTBEAT.findall(self.text()))

    def shutdown_seen(self) -> bool:
        return bool(_SHUTDOWN.search(self.text()))

    def tail(self, n: int = 15) -> str:
        return "\n".join(self.text().splitlines()[-n:])


@dataclass
class Console(_ConsoleLines):
    """The console log read on the host (what only the host can see: a jail's file)."""

    path: Path

    def text(self) -> str:
        try:
            return self.path.read_text(errors="replace")
        except OSError:
            return ""


@dataclass
class ApiConsole(_ConsoleLines):
    """The console as its owner reads it: GetVmConsole, followed by offsets. A log that
    starts anew (the VM was started again) is read from its beginning."""

    call: Caller
    vm_id: str
    data: bytes = b""
    offset: int = 0

    def read(self) -> bytes:
        """What is new since the last read (all of it the first time)."""
        new = b""
        while True:
            reply = self.call.must("GetVmConsole", {"vm_id": self.vm_id, "offset": self.offset})
            chunk = reply.msg
            if chunk.offset < self.offset:  # a new log
                self.data = b""
            self.data += chunk.data
            new += chunk.data
            self.offset = chunk.next_offset
            if chunk.next_offset >= chunk.size:
                return new

    def text(self) -> str:
        self.read()
        return self.data.decode(errors="replace")
