"""A real `metald billing-sink` process on a free loopback port, for tests: started, waited
for (GET /health), and ended by its pid; its database read with the sink's own store.

Usable from any test directory (`from tests.integration._billing_sink import SinkProcess`,
or `import _billing_sink` beside it)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from metald.billing_sink.store import SinkStore

ROOT = Path(__file__).resolve().parents[2]
METALD = ROOT / ".venv" / "bin" / "metald"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def no_proxy_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    return env


class SinkProcess:
    """`metald billing-sink --port P --db <dir>/sink.db`; restartable on the same port and
    file (an outage and a return)."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.db = workdir / "sink.db"
        self.log_path = workdir / "sink.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self._log = self.log_path.open("ab")
        argv = [str(METALD), "billing-sink", "--port", str(self.port), "--db", str(self.db)]
        self.proc = subprocess.Popen(
            argv, stdout=self._log, stderr=subprocess.STDOUT, env=no_proxy_env()
        )
        deadline = time.monotonic() + timeout
        while not self._healthy():
            if self.proc.poll() is not None:
                raise AssertionError(f"the sink exited ({self.proc.returncode}): {self.log()}")
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"the sink did not answer in {timeout:.0f}s: {self.log()}")
            time.sleep(0.05)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM by pid (SIGKILL if it does not end); its exit code."""
        proc = self.proc
        if proc is None:
            return 0
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(10)
        if self._log is not None:
            self._log.close()
            self._log = None
        return proc.returncode

    def kill9(self) -> None:
        """SIGKILL by pid: a crash, with no chance to checkpoint or close anything."""
        assert self.proc is not None and self.proc.poll() is None, "the sink is not running"
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self.stop()

    def store(self) -> SinkStore:
        return SinkStore(self.db, read_only=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() else ""

    def _healthy(self) -> bool:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(f"{self.url}/health", timeout=2) as reply:
                return bool(reply.status == 200)
        except OSError:
            return False

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
