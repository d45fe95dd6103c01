"""`metald serve` for a benchmark: a separate process on a free loopback port with its own
data directory, jail base, cgroup parent, VMM uid range and network namespaces (never the
machine's own), ended by its pid and cleaned up afterwards.

Benchmarks measure the daemon as a user runs it, so it is the real `metald serve` with its
real settings; only what would collide with another daemon on the host is made unique.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from types import TracebackType

from pyroute2 import netns

from metald.jailer.cgroups import cgroup_mount
from metald.jailer.spec import CgroupSpec

from .harness import ROOT

METALD = Path(sys.executable).parent / "metald"
ASSETS = ROOT / "var" / "assets"
TOKEN = "dev_customer_bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise ProcessLookupError(pid)


class BenchDaemon:
    """with BenchDaemon(**env) as d: ... d.url, d.pid, d.rss(); stop() and start() again keep
    the port and the data directory (start-up benchmarks)."""

    def __init__(self, **env: str) -> None:
        tag = secrets.token_hex(3)
        self.port = free_port()
        self.workdir = Path(tempfile.mkdtemp(prefix="metald-bench-"))
        self.jails = Path(tempfile.mkdtemp(prefix="mb", dir="/tmp"))
        self.host_netns = f"mbh{tag}"
        self.cgroup_parent = f"metald-bench-{tag}"
        self._prefixes = (f"mbs{tag}", f"mbv{tag}-")
        first = 2_000_000 + int(tag, 16) % 100_000 * 1000
        self.env = {
            **{k: v for k, v in os.environ.items() if "proxy" not in k.lower()},
            "NO_PROXY": "127.0.0.1,localhost",
            "UNKEY_METALD_ADDRESS": "127.0.0.1",
            "UNKEY_METALD_PORT": str(self.port),
            # One 9464 per host: benchmark daemons read /metrics on the API port.
            "UNKEY_METALD_OTEL_PROMETHEUS_ENABLED": "false",
            "UNKEY_METALD_BACKEND": "qemu",
            "UNKEY_METALD_DATA_DIR": str(self.workdir / "data"),
            "UNKEY_METALD_ASSETMANAGER_CACHE_DIR": str(ASSETS),
            "UNKEY_METALD_AUTH_DEV_TOKENS": "true",
            "UNKEY_METALD_JAILER_CHROOT_DIR": str(self.jails),
            "UNKEY_METALD_JAILER_CGROUP_PARENT": self.cgroup_parent,
            "UNKEY_METALD_JAILER_UID_RANGE": f"{first}-{first + 999}",
            "UNKEY_METALD_NETWORK_HOST_NETNS": self.host_netns,
            "UNKEY_METALD_NETWORK_SEGMENTS_NETNS": self._prefixes[0],
            "UNKEY_METALD_NETWORK_NETNS_PREFIX": self._prefixes[1],
            "UNKEY_METALD_HOST_VCPUS": "1024",
            "UNKEY_METALD_HOST_MEMORY_BYTES": str(64 * 1024**3),  # paused density VMs
            "UNKEY_METALD_BILLING_ENABLED": "false",  # not to whatever holds localhost:8081
            **env,
        }
        self.proc: subprocess.Popen[bytes] | None = None
        netns.create(self.host_netns)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def db_path(self) -> Path:
        return self.workdir / "data" / "metald.db"

    @property
    def pid(self) -> int:
        assert self.proc is not None, "the daemon is not running"
        return self.proc.pid

    def rss(self) -> int:
        return rss_bytes(self.pid)

    def start(self, timeout: float = 120.0) -> float:
        """Start it; returns the seconds until /health answered 200."""
        log = open(self.workdir / "metald.log", "ab")  # noqa: SIM115 - the child keeps it
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [str(METALD), "serve"], env=self.env, stdin=subprocess.DEVNULL,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        log.close()
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        while True:
            try:
                with opener.open(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return time.monotonic() - t0
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() - t0 > timeout:
                raise SystemExit(f"metald did not start; its log:\n{self.log_tail()}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def log_tail(self, lines: int = 40) -> str:
        path = self.workdir / "metald.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> BenchDaemon:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self.stop()
        for name in netns.listnetns():
            if name == self.host_netns or name.startswith(self._prefixes):
                netns.remove(name)
        shutil.rmtree(self.workdir, ignore_errors=True)
        shutil.rmtree(self.jails, ignore_errors=True)
        self._remove_cgroups()

    def _remove_cgroups(self) -> None:
        """The VM cgroups' parent the daemon made (empty once its VMs are gone)."""
        mount = cgroup_mount(CgroupSpec())
        if mount is None:
            return
        parent = Path(mount) / self.cgroup_parent
        if not parent.is_dir():
            return
        for child in parent.iterdir():
            if child.is_dir():
                with contextlib.suppress(OSError):
                    child.rmdir()
        with contextlib.suppress(OSError):
            parent.rmdir()
