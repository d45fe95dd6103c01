"""The Firecracker API stand-in (tests/fakes/firecracker) against the spec's promises.

The stand-in is what metald's Firecracker backend is tested against, so it has to be right:
these tests start it through its launcher (the "firecracker binary"), talk HTTP over its Unix
socket with httpx, and check the command line, spec validation (bad input gets 400 and a
fault_message and changes nothing), the ordering rules, and, with a real guest (the default
guest image under QEMU/TCG), console, pause/resume, Ctrl-Alt-Del, metrics and its exit paths.

As root, each stand-in runs in a network namespace the test makes, with a TAP there (the
guest's network); the namespace is removed afterwards. Every process started is ended by pid.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from itertools import count
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
from fakes.firecracker.make_launcher import SPEC, STANDIN, standin_host_paths, write_launcher
from fakes.firecracker.standin.spec import Spec

from metald.assets.store import LocalAssetStore

STORE_DIR = Path(os.environ.get("METALD_TEST_ASSETS", Path(__file__).parents[2] / "var" / "assets"))
DEADLINE = 90.0  # generous: TCG guests on a busy 2-CPU machine
READY = re.compile(r"^METALD-GUEST READY vm=fc-test ", re.M)
HEARTBEAT = re.compile(r"^METALD-GUEST HEARTBEAT (\d+)\s*$", re.M)
SHUTDOWN = re.compile(r"^METALD-GUEST SHUTDOWN\s*$", re.M)
NET = re.compile(r"^METALD-GUEST NET eth0 ", re.M)
BOOT_ARGS = "console=ttyS0 reboot=k panic=-1 quiet metald.vm_id=fc-test metald.on_shutdown=reboot"
HOST_IP, GUEST_IP = "172.30.99.1", "172.30.99.2"
_ns_ids = count()


def wait_for(predicate: Callable[[], Any], what: str, timeout: float = DEADLINE) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"not seen within {timeout:.0f} s: {what}")


@pytest.fixture(scope="module")
def spec() -> Spec:
    if not SPEC.exists():
        pytest.fail(f"the Firecracker API spec is missing: {SPEC}")
    return Spec(SPEC)


@pytest.fixture(scope="module")
def launcher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Named "firecracker": the process's comm, which the session leak check looks for.
    return write_launcher(tmp_path_factory.mktemp("bin") / "firecracker", Path(sys.executable))


@pytest.fixture
def netns() -> Iterator[str | None]:
    """A namespace with TAP `tap0` (HOST_IP/24, up) as root; None otherwise."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        yield None
        return
    name = f"fcst{os.getpid()}x{next(_ns_ids)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        for cmd in (
            "tuntap add dev tap0 mode tap",
            f"addr add {HOST_IP}/24 dev tap0",
            "link set tap0 up",
            "link set lo up",
        ):
            subprocess.run(["ip", "-n", name, *cmd.split()], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


class Standin:
    """One stand-in process and an HTTP client on its socket."""

    def __init__(
        self, launcher: Path, netns: str | None, *args: str, sock: Path | None = None
    ) -> None:
        # Short paths: the socket and QMP paths must fit in sun_path (108 bytes).
        self.dir = Path(tempfile.mkdtemp(prefix="fc"))
        self.sock = sock or self.dir / "api.sock"
        self.stderr = self.dir / "stderr"
        prefix = ["ip", "netns", "exec", netns] if netns else []
        argv = [*prefix, str(launcher), "--api-sock", str(self.sock), "--id", "fc-test", *args]
        with self.stderr.open("wb") as err:
            self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err)
        wait_for(lambda: self._answers() or self.proc.poll() is not None, "the api socket")
        assert self.proc.poll() is None, self.stderr.read_text()
        self.http = httpx.Client(
            transport=httpx.HTTPTransport(uds=str(self.sock)), base_url="http://localhost"
        )

    def _answers(self) -> bool:
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect(str(self.sock))
            except OSError:
                return False
            return True

    def call(self, method: str, path: str, body: Any = None) -> httpx.Response:
        if body is None:
            return self.http.request(method, path)
        return self.http.request(method, path, json=body)

    def ok(self, method: str, path: str, body: Any = None) -> None:
        r = self.call(method, path, body)
        assert r.status_code == 204, f"{method} {path}: {r.status_code} {r.text}"
        assert r.content == b""

    def refused(self, method: str, path: str, body: Any = None) -> str:
        r = self.call(method, path, body)
        assert r.status_code == 400, f"{method} {path}: {r.status_code} {r.text}"
        message = r.json()["fault_message"]
        assert isinstance(message, str) and message
        return message

    def get(self, path: str) -> Any:
        r = self.call("GET", path)
        assert r.status_code == 200, r.text
        return r.json()

    def close(self) -> None:
        self.http.close()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def start(launcher: Path) -> Iterator[Callable[..., Standin]]:
    started: list[Standin] = []

    def _start(*args: str, netns: str | None = None, sock: Path | None = None) -> Standin:
        started.append(Standin(launcher, netns, *args, sock=sock))
        return started[-1]

    yield _start
    for s in started:
        s.close()


def valid(spec: Spec, definition: str, value: Any) -> None:
    jsonschema.Draft4Validator(spec.definitions[definition] | {"definitions": spec.definitions}
                               ).validate(value)  # fmt: skip


# --- the command line ---------------------------------------------------------------------


def test_command_line(launcher: Path, tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(launcher), *args], capture_output=True, text=True, timeout=60)

    v = run("--version")
    assert (v.returncode, v.stdout.strip()) == (0, "Firecracker v1.16.1")
    sock = str(tmp_path / "s")
    for args, fragment in [
        (("--bogus",), "unrecognized"),
        (("--api-sock", sock, "--id", "bad id"), "--id"),
        (("--api-sock", sock, "--id", "x" * 65), "--id"),
        (("--api-sock", sock, "--no-api"), "not supported by the stand-in"),
        (("--api-sock", sock, "--config-file", "/dev/null"), "not supported by the stand-in"),
        (("--no-seccomp", "--seccomp-filter", "/dev/null"), "cannot be used together"),
    ]:
        r = run(*args)
        assert r.returncode == 1, (args, r)
        assert fragment in r.stderr, (args, r.stderr)
    assert not Path(sock).exists()
    assert os.access(STANDIN, os.X_OK)
    assert STANDIN.read_text().startswith("#!/usr/bin/env python3\n")


def test_host_paths_for_a_jail() -> None:
    paths = standin_host_paths(Path(sys.executable))
    assert str(STANDIN.parent) in paths and str(SPEC) in paths
    assert any(p.endswith("site-packages") for p in paths)
    assert "/usr/share/qemu" in paths
    assert all(os.path.exists(p) for p in paths), [p for p in paths if not os.path.exists(p)]


def test_startup_info_and_stale_socket(start: Callable[..., Standin], spec: Spec) -> None:
    s = start("--no-seccomp")
    assert "stand-in" in s.stderr.read_text() and "seccomp would be off" in s.stderr.read_text()
    info = s.get("/")
    valid(spec, "InstanceInfo", info)
    assert info == {"app_name": "Firecracker", "id": "fc-test", "state": "Not started",
                    "vmm_version": "1.16.1"}  # fmt: skip
    assert s.get("/version") == {"firecracker_version": "1.16.1"}
    machine = s.get("/machine-config")
    valid(spec, "MachineConfiguration", machine)
    assert (machine["vcpu_count"], machine["mem_size_mib"], machine["smt"]) == (1, 128, False)
    valid(spec, "FullVmConfiguration", s.get("/vm/config"))
    # A stand-in killed leaves its socket; the next one on that path removes it and serves.
    s.proc.kill()
    s.proc.wait()
    assert s.sock.exists()
    t = start(sock=s.sock)
    assert t.get("/")["state"] == "Not started"


# --- configuration before boot --------------------------------------------------------------


def full_config(s: Standin, d: Path, netns: str | None) -> dict[str, Any]:
    """A configuration touching every pre-boot resource; each PUT must answer 204."""
    (d / "log").touch()
    os.mkfifo(d / "metrics")
    for name in ("vmlinux", "initrd", "rootfs", "pmem"):
        (d / name).write_bytes(b"\0" * 4096)
    bucket = {"size": 1_000_000, "refill_time": 100, "one_time_burst": 0}
    calls: list[tuple[str, dict[str, Any]]] = [
        ("/logger", {"log_path": str(d / "log"), "level": "debug", "show_level": True}),
        ("/metrics", {"metrics_path": str(d / "metrics")}),
        ("/machine-config", {"vcpu_count": 2, "mem_size_mib": 256, "smt": False}),
        ("/boot-source", {"kernel_image_path": str(d / "vmlinux"), "initrd_path": str(d / "initrd"),
                          "boot_args": "console=ttyS0"}),
        ("/drives/rootfs", {"drive_id": "rootfs", "path_on_host": str(d / "rootfs"),
                            "is_root_device": True, "is_read_only": False,
                            "cache_type": "Writeback",
                            "rate_limiter": {"bandwidth": bucket, "ops": bucket}}),
        ("/serial", {"serial_out_path": str(d / "console")}),
        ("/entropy", {"rate_limiter": {"bandwidth": bucket}}),
        ("/vsock", {"guest_cid": 3, "uds_path": str(d / "v.sock")}),
        ("/balloon", {"amount_mib": 16, "deflate_on_oom": True, "stats_polling_interval_s": 1}),
        ("/cpu-config", {"kvm_capabilities": ["!121"]}),
        ("/pmem/pm0", {"id": "pm0", "path_on_host": str(d / "pmem"), "read_only": True}),
        ("/hotplug/memory", {"total_size_mib": 1024}),
        ("/mmds", {"latest": {"meta-data": {"id": "fc-test"}}}),
    ]  # fmt: skip
    if netns is not None:
        calls += [
            ("/network-interfaces/eth0", {"iface_id": "eth0", "host_dev_name": "tap0",
                                          "guest_mac": "06:00:AC:10:00:02", "mtu": 1500,
                                          "rx_rate_limiter": {"bandwidth": bucket},
                                          "tx_rate_limiter": {"ops": bucket}}),
            ("/mmds/config", {"network_interfaces": ["eth0"], "version": "V2"}),
        ]  # fmt: skip
    for path, body in calls:
        s.ok("PUT", path, body)
    return dict(calls)


def test_a_full_pre_boot_configuration_is_accepted(
    start: Callable[..., Standin], spec: Spec, netns: str | None
) -> None:
    s = start(netns=netns)
    calls = full_config(s, s.dir, netns)
    s.ok("PATCH", "/machine-config", {"vcpu_count": 1})
    s.ok("PATCH", "/balloon", {"amount_mib": 32})
    s.ok("PATCH", "/mmds", {"latest": {"meta-data": {"zone": "a"}}})
    config = s.get("/vm/config")
    valid(spec, "FullVmConfiguration", config)
    assert config["machine-config"]["vcpu_count"] == 1
    assert config["machine-config"]["mem_size_mib"] == 256
    assert config["boot-source"] == calls["/boot-source"]
    [drive] = config["drives"]
    assert drive["rate_limiter"] == calls["/drives/rootfs"]["rate_limiter"]
    assert config["balloon"]["amount_mib"] == 32
    if netns is not None:
        [nic] = config["network-interfaces"]
        assert nic["rx_rate_limiter"] == calls["/network-interfaces/eth0"]["rx_rate_limiter"]
        assert config["mmds-config"]["network_interfaces"] == ["eth0"]
    assert s.get("/mmds") == {"latest": {"meta-data": {"id": "fc-test", "zone": "a"}}}
    assert s.get("/balloon/statistics")["target_mib"] == 32
    assert s.get("/hotplug/memory")["total_size_mib"] == 1024
    log = (s.dir / "log").read_text()
    assert 'PUT request on "/drives/rootfs"' in log and ":INFO" in log


BAD: list[tuple[str, str, Any, str]] = [
    ("PUT", "/machine-config", {"vcpu_count": 2}, "mem_size_mib"),  # missing required
    ("PUT", "/machine-config", {"vcpu_count": "2", "mem_size_mib": 128}, "type"),
    ("PUT", "/machine-config", {"vcpu_count": 0, "mem_size_mib": 128}, "minimum"),
    ("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 128, "gdb": 1}, "gdb"),
    ("PUT", "/machine-config", {"vcpu_count": 3, "mem_size_mib": 128, "smt": True}, "SMT"),
    ("PUT", "/boot-source", {"kernel_image_path": "/nonexistent/vmlinux"}, "kernel"),
    ("PUT", "/boot-source", {"boot_args": "x"}, "kernel_image_path"),
    ("PUT", "/drives/rootfs", {"drive_id": "other", "is_root_device": True}, "drive_id"),
    (
        "PUT",
        "/drives/rootfs",
        {"drive_id": "rootfs", "is_root_device": True, "path_on_host": "/nonexistent"},
        "open",
    ),
    (
        "PUT",
        "/drives/rootfs",
        {"drive_id": "rootfs", "is_root_device": True, "cache_type": "Sometimes"},
        "Sometimes",
    ),
    (
        "PUT",
        "/drives/rootfs",
        {"drive_id": "rootfs", "is_root_device": True, "rate_limiter": {"bandwidth": {"size": 1}}},
        "refill_time",
    ),
    ("PUT", "/drives/bad-id", {"drive_id": "bad-id", "is_root_device": True}, "bad-id"),
    ("PUT", "/network-interfaces/eth0", {"iface_id": "eth1", "host_dev_name": "tap0"}, "iface_id"),
    ("PUT", "/network-interfaces/eth0", {"iface_id": "eth0"}, "host_dev_name"),
    ("PUT", "/logger", {"level": "Loud"}, "Loud"),
    ("PUT", "/metrics", {"metrics_path": "/nonexistent/metrics"}, "metrics"),
    ("PUT", "/vsock", {"guest_cid": 2, "uds_path": "/x"}, "minimum"),
    ("PUT", "/actions", {"action_type": "Reboot"}, "Reboot"),
    ("PUT", "/actions", {"action_type": "InstanceStart"}, "kernel"),  # no boot source
    ("PUT", "/actions", {"action_type": "FlushMetrics"}, "before starting"),
    ("PUT", "/actions", {"action_type": "SendCtrlAltDel"}, "before starting"),
    ("PUT", "/actions", None, "body"),
    ("PATCH", "/vm", {"state": "Paused"}, "before starting"),
    ("PATCH", "/vm", {"state": "Sleeping"}, "Sleeping"),
    ("PATCH", "/drives/rootfs", {"drive_id": "rootfs"}, "before starting"),
    ("PATCH", "/network-interfaces/eth0", {"iface_id": "eth0"}, "before starting"),
    ("PUT", "/version", {}, "Invalid request method"),  # wrong method
    ("DELETE", "/", None, "Invalid request method"),
    ("GET", "/no-such-thing", None, "Invalid request method"),
    ("GET", "/balloon", None, "balloon"),  # none configured
    ("PUT", "/snapshot/load", {"snapshot_path": "/x", "mem_file_path": "/y"}, "not supported"),
]


def test_bad_requests_are_refused_and_change_nothing(start: Callable[..., Standin]) -> None:
    s = start()
    s.ok("PUT", "/machine-config", {"vcpu_count": 2, "mem_size_mib": 192})
    before = s.get("/vm/config")
    for method, path, body, fragment in BAD:
        message = s.refused(method, path, body)
        assert fragment.lower() in message.lower(), (method, path, body, message)
        assert s.get("/vm/config") == before, (method, path, body)
    r = s.http.put("/machine-config", content=b"{not json", headers={"Content-Type": "x"})
    assert r.status_code == 400 and "JSON" in r.json()["fault_message"]
    big = {"latest": "x" * 60_000}  # over the default --http-api-max-payload-size
    assert "larger than the limit" in s.refused("PUT", "/mmds", big)
    assert s.get("/")["state"] == "Not started"


def test_metrics_are_configured_once_the_logger_again(start: Callable[..., Standin]) -> None:
    # As a real Firecracker 1.16.1: a second PUT /metrics is refused, a second PUT /logger
    # is taken (its log_path replaces the first), and no metrics line is written before
    # InstanceStart: FlushMetrics is refused until then.
    s = start()
    for name in ("m", "l", "l2"):
        (s.dir / name).touch()
    s.ok("PUT", "/metrics", {"metrics_path": str(s.dir / "m")})
    assert "metrics" in s.refused("PUT", "/metrics", {"metrics_path": str(s.dir / "m")}).lower()
    s.ok("PUT", "/logger", {"log_path": str(s.dir / "l"), "level": "Info"})
    s.ok("PUT", "/logger", {"log_path": str(s.dir / "l2")})
    assert "before starting" in s.refused("PUT", "/actions", {"action_type": "FlushMetrics"})
    # The refusals after the second PUT went to the new log only.
    assert "Status code: 400" not in (s.dir / "l").read_text()
    assert "Status code: 400" in (s.dir / "l2").read_text()
    assert (s.dir / "m").read_text() == ""


def test_metrics_on_the_command_line(start: Callable[..., Standin]) -> None:
    d = Path(tempfile.mkdtemp(prefix="fcm"))
    try:
        (d / "m").touch()
        s = start("--metrics-path", str(d / "m"))
        assert "metrics" in s.refused("PUT", "/metrics", {"metrics_path": str(d / "m")}).lower()
        assert "before starting" in s.refused("PUT", "/actions", {"action_type": "FlushMetrics"})
        assert (d / "m").read_text() == ""  # nothing before InstanceStart
    finally:
        shutil.rmtree(d)


# --- with a real guest ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def boot_files() -> tuple[Path, Path | None]:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed (Debian package qemu-system-x86)")
    store = LocalAssetStore(STORE_DIR)
    if store.default() is None:
        pytest.skip(f"no default guest image in {STORE_DIR}: run `make guest`")
    return store.default_boot()


class FifoReader:
    """The test's end of the metrics FIFO (opened first, so the stand-in's open succeeds)."""

    def __init__(self, path: Path) -> None:
        os.mkfifo(path)
        self.fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        self.buffer = b""

    def lines(self) -> list[dict[str, Any]]:
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(self.fd, 65536):
                self.buffer += chunk
        *complete, self.buffer = self.buffer.split(b"\n")
        return [json.loads(line) for line in complete]

    def close(self) -> None:
        os.close(self.fd)


def configure_guest(
    s: Standin, boot_files: tuple[Path, Path | None], netns: str | None, extra_args: str = ""
) -> None:
    kernel, initrd = boot_files
    boot: dict[str, Any] = {"kernel_image_path": str(kernel), "boot_args": BOOT_ARGS + extra_args}
    if initrd is not None:
        boot["initrd_path"] = str(initrd)
    s.ok("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 256})
    s.ok("PUT", "/boot-source", boot)
    s.ok("PUT", "/serial", {"serial_out_path": str(s.dir / "console")})
    with (s.dir / "data").open("wb") as f:
        f.truncate(4 << 20)
    # A rate limiter (QEMU throttling: an average of 10 MB/s, far above the boot's reads).
    limiter = {"bandwidth": {"size": 1_000_000, "refill_time": 100}}
    s.ok("PUT", "/drives/data", {"drive_id": "data", "path_on_host": str(s.dir / "data"),
                                 "is_root_device": False, "is_read_only": True,
                                 "rate_limiter": limiter})  # fmt: skip
    s.ok("PUT", "/entropy", {})
    if netns is not None:
        s.ok("PUT", "/network-interfaces/eth0", {"iface_id": "eth0", "host_dev_name": "tap0",
                                                 "guest_mac": "06:00:ac:1e:63:02"})  # fmt: skip


def console(s: Standin) -> str:
    path = s.dir / "console"
    return path.read_text(errors="replace") if path.exists() else ""


def heartbeats(s: Standin) -> list[int]:
    return [int(n) for n in HEARTBEAT.findall(console(s))]


def qemu_children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError, IndexError):
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            if entry.name.isdigit() and int(fields[1]) == pid and "qemu" in stat.split()[1]:
                found.append(int(entry.name))
    return found


@pytest.mark.guest
def test_a_guest_lives_and_ends_like_under_firecracker(
    start: Callable[..., Standin], boot_files: tuple[Path, Path | None], netns: str | None
) -> None:
    s = start(netns=netns)
    metrics = FifoReader(s.dir / "metrics")
    try:
        s.ok("PUT", "/metrics", {"metrics_path": str(s.dir / "metrics")})
        net_args = f" metald.ip4={GUEST_IP}/24" if netns else ""
        configure_guest(s, boot_files, netns, net_args)
        assert metrics.lines() == []  # nothing before the start
        s.ok("PUT", "/actions", {"action_type": "InstanceStart"})
        assert s.get("/")["state"] == "Running"
        # One line at once, as Firecracker writes at the start (counting the API calls so far).
        [at_start] = metrics.lines()
        assert at_start["put_api_requests"]["metrics_count"] == 1
        [qemu] = qemu_children(s.proc.pid)
        wait_for(lambda: READY.search(console(s)), "the READY line")

        # After the start: pre-boot calls and a second start are refused; updates are not.
        assert "after starting" in s.refused("PUT", "/actions", {"action_type": "InstanceStart"})
        assert "after starting" in s.refused("PUT", "/machine-config",
                                             {"vcpu_count": 1, "mem_size_mib": 128})  # fmt: skip
        assert "after starting" in s.refused("PUT", "/boot-source",
                                             {"kernel_image_path": str(boot_files[0])})  # fmt: skip
        limiter = {"bandwidth": {"size": 1000, "refill_time": 10}}
        s.ok("PATCH", "/drives/data", {"drive_id": "data", "rate_limiter": limiter})
        assert s.get("/vm/config")["drives"][0]["rate_limiter"] == limiter
        assert "block device" in s.refused("PATCH", "/drives/nope", {"drive_id": "nope"})

        # Metrics: the boot's block reads show once, then counters are deltas (reset).
        if netns is not None:
            wait_for(lambda: NET.search(console(s)), "the guest's NET line")
            ping = subprocess.run(
                [
                    "ip",
                    "netns",
                    "exec",
                    netns,
                    "ping",
                    "-c",
                    "3",
                    "-i",
                    "0.3",
                    "-W",
                    "10",
                    GUEST_IP,
                ],
                capture_output=True,
                text=True,
            )
            assert ping.returncode == 0, ping.stdout + ping.stderr
            # Then traffic one way only: 20 datagrams of 1400 bytes to a closed port (the
            # guest answers with at most 20 small, rate-limited ICMP errors).
            send = (
                "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                f"for _ in range(20): s.sendto(bytes(1400), ({GUEST_IP!r}, 9))"
            )
            subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", send], check=True)
        s.ok("PUT", "/actions", {"action_type": "FlushMetrics"})
        s.ok("PUT", "/actions", {"action_type": "FlushMetrics"})
        s.ok("PUT", "/actions", {"action_type": "FlushMetrics"})
        first, second, third = metrics.lines()[-3:]
        for line in (first, second, third):
            assert isinstance(line["utc_timestamp_ms"], int)
            for group in ("api_server", "block", "block_data", "net", "vcpu", "latencies_us"):
                assert group in line, group
        assert first["block_data"]["read_bytes"] > 0 and first["block_data"]["read_count"] > 0
        assert first["block"]["read_bytes"] == first["block_data"]["read_bytes"]
        for line in (second, third):
            assert line["block_data"]["read_bytes"] == 0 == line["block_data"]["write_bytes"]
        if netns is not None:
            # Three echo requests reached the guest (its rx) and three replies left it (tx).
            assert first["net_eth0"]["rx_packets_count"] >= 3
            assert first["net_eth0"]["tx_packets_count"] >= 3
            assert first["net_eth0"]["rx_bytes_count"] >= 3 * 98 + 20 * 1400
            # The direction: what the guest received (the TAP's tx) outweighs what it sent.
            rx, tx = first["net_eth0"]["rx_bytes_count"], first["net_eth0"]["tx_bytes_count"]
            assert rx - tx > 10_000, (rx, tx)
            assert first["net"]["rx_bytes_count"] == rx
            assert second["net_eth0"]["rx_packets_count"] < first["net_eth0"]["rx_packets_count"]

        # Pause stops the heartbeat; resume brings it back.
        s.ok("PATCH", "/vm", {"state": "Paused"})
        assert s.get("/")["state"] == "Paused"
        paused_at = heartbeats(s)
        time.sleep(3)  # a running guest prints one line a second
        assert heartbeats(s) == paused_at
        s.ok("PATCH", "/vm", {"state": "Resumed"})
        assert s.get("/")["state"] == "Running"
        wait_for(lambda: len(heartbeats(s)) > len(paused_at), "a heartbeat after resume")

        # Ctrl-Alt-Del: the guest's shutdown path, its `reboot -f`, and the stand-in exits 0.
        s.ok("PUT", "/actions", {"action_type": "SendCtrlAltDel"})
        wait_for(lambda: SHUTDOWN.search(console(s)), "the SHUTDOWN line")
        assert s.proc.wait(timeout=DEADLINE) == 0
        assert not s.sock.exists()
        assert [p.name for p in s.dir.iterdir() if p.name.startswith(".standin")] == []
        assert not Path(f"/proc/{qemu}").exists()
        assert "the guest ended" in s.stderr.read_text()
    finally:
        metrics.close()


@pytest.mark.guest
@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_qemu_does_not_outlive_the_standin(
    start: Callable[..., Standin], boot_files: tuple[Path, Path | None], how: signal.Signals
) -> None:
    s = start()
    configure_guest(s, boot_files, None)
    s.ok("PUT", "/actions", {"action_type": "InstanceStart"})
    [qemu] = qemu_children(s.proc.pid)
    assert os.getpgid(qemu) == os.getpgid(s.proc.pid)  # same process group, same session
    assert os.getsid(qemu) == os.getsid(s.proc.pid)
    os.kill(s.proc.pid, how)
    assert s.proc.wait(timeout=DEADLINE) == -how  # it dies of the signal, as Firecracker would
    wait_for(lambda: _ended(qemu), f"QEMU (pid {qemu}) to end")
    if how == signal.SIGTERM:
        assert not s.sock.exists()  # cleaned up on its way out


def _ended(pid: int) -> bool:
    """Gone, or a zombie (re-parented to this process when the suite is a subreaper: reaped)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    if text[text.rindex(")") + 2 :].split()[0] != "Z":
        return False
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    return True
