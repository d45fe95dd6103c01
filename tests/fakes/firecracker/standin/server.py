"""HTTP/1.1 on the api socket, and the main loop that owns the VMM.

Connection threads only parse HTTP and hand each request to the main thread through a queue:
Firecracker handles API requests one at a time on its VMM thread, and QEMU must be forked by a
thread that lives as long as the process (PR_SET_PDEATHSIG fires when the forking thread
ends). The main loop also runs the 60 s metrics flush, notices QEMU's exit (the guest reset:
the stand-in then exits 0, as Firecracker does) and SIGTERM/SIGINT (QEMU is killed, then the
stand-in dies of the same signal).
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import socketserver
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from .vmm import Reply, Vmm

_EXITED = object()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass  # requests are logged to the configured logger by the VMM

    def _serve(self) -> None:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        limit = self.server.max_payload
        if length < 0 or length > limit:
            self.close_connection = True
            self._reply(400, {"fault_message": f"Request payload with size {length} is larger "
                              f"than the limit of {limit} allowed by server."})  # fmt: skip
            return
        raw = self.rfile.read(length) if length else b""
        body: Any = None
        if raw.strip():
            try:
                body = json.loads(raw)
            except ValueError as e:
                self._reply(400, {"fault_message": f"The request body is not valid JSON: {e}"})
                return
        future: Future[Reply] = Future()
        self.server.requests.put((self.command, self.path.split("?", 1)[0], body, future))
        status, payload = future.result()
        self._reply(status, payload)

    def _reply(self, status: int, payload: Any) -> None:
        self.send_response_only(status)
        self.send_header("Server", "Firecracker API")
        if payload is None:
            self.end_headers()
            return
        data = json.dumps(payload).encode()
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_PUT = do_PATCH = do_POST = do_DELETE = do_OPTIONS = _serve


class _Server(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True

    def __init__(self, path: str, max_payload: int) -> None:
        self.max_payload = max_payload
        self.requests: queue.Queue[Any] = queue.Queue()
        super().__init__(path, _Handler)


def serve(vmm_factory: Any, api_sock: Path, max_payload: int) -> int:
    """Serve until the guest ends or a signal comes; returns the exit status."""
    if api_sock.exists() or api_sock.is_symlink():
        api_sock.unlink()  # a stale socket from an earlier run, as Firecracker removes it
    server = _Server(str(api_sock), max_payload)
    private_dir = Path(os.path.dirname(api_sock)) / f".standin-{os.getpid()}"
    private_dir.mkdir(mode=0o700)
    got_signal: list[int] = []

    def on_signal(signum: int, frame: Any) -> None:
        got_signal.append(signum)

    def on_started(proc: subprocess.Popen[bytes]) -> None:
        def wait() -> None:
            proc.wait()
            server.requests.put(_EXITED)

        threading.Thread(target=wait, name="qemu-wait", daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        vmm: Vmm = vmm_factory(private_dir, on_started)
    except BaseException:
        server.server_close()
        api_sock.unlink(missing_ok=True)
        shutil.rmtree(private_dir, ignore_errors=True)
        raise
    threading.Thread(target=server.serve_forever, name="fc_api", daemon=True).start()
    status = 0
    try:
        while not got_signal:
            try:
                item = server.requests.get(timeout=0.2)
            except queue.Empty:
                item = None
            if item is _EXITED:
                assert vmm.proc is not None
                status = 0 if vmm.proc.returncode == 0 else 1
                print(f"firecracker-api-standin: the guest ended (QEMU status "
                      f"{vmm.proc.returncode})", file=sys.stderr)  # fmt: skip
                break
            if item is not None:
                method, path, body, future = item
                try:
                    future.set_result(vmm.handle(method, path, body))
                except Exception as e:  # a bug: answer 500 rather than hang the client
                    future.set_result((500, {"fault_message": f"internal error: {e!r}"}))
            if vmm.next_flush is not None and time.monotonic() >= vmm.next_flush:
                vmm.flush_metrics()
    finally:
        vmm.flush_metrics()  # Firecracker writes the metrics once more on its way out
        vmm.stop_guest()
        server.shutdown()
        server.server_close()
        api_sock.unlink(missing_ok=True)
        shutil.rmtree(private_dir, ignore_errors=True)
    if got_signal:
        signal.signal(got_signal[0], signal.SIG_DFL)
        os.kill(os.getpid(), got_signal[0])
    return status
