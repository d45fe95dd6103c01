"""Benchmark: which ASGI server, measured. metald's trivial VmService (bench/servers_app.py: the
whole request path but the handler's work) on every ASGI server worth trying, over Connect
JSON (wrk, HTTP/1.1) and gRPC (h2load, h2c) where the server speaks it.

All servers are started at once, each on its own loopback port, and measured in turn, the
order rotated every round, so each round compares servers under the same background load;
ratios are taken within a round (to the round's fastest, and to the fastest server that
passes metald's three-protocol e2e suite) and reported as medians over the rounds with their
spread. A server whose package is not installed (`pip install -e '.[bench]'`, which
`make bench` does) is reported as such, not measured.

Whether a server passes the suite is not measured here (it takes the e2e files with
UNKEY_METALD_HTTP_SERVER set; see docs/performance.md, "The server"): SUITE_VERDICT records it.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from metald.gen.vmprovisioner.v1 import vm_pb2 as pb

from .daemon import free_port
from .harness import ROOT, Report, Spread, arguments, percentile

PATH = "/vmprovisioner.v1.VmService/GetVmInfo"
TOKEN = "dev_customer_bench"
CONNECTIONS = 16
BIN = Path(sys.executable).parent


class Ratio(Spread):
    """A ratio: shown with two decimals."""

    def show(self, digits: int = 2, unit: str = "") -> str:
        return super().show(digits, unit)


@dataclass(frozen=True)
class Server:
    name: str
    needs: tuple[str, ...]  # importable modules
    grpc: bool  # speaks gRPC (h2c with trailers)
    env: dict[str, str] = field(default_factory=dict)

    def command(self, port: int) -> list[str]:
        if self.name.startswith("granian"):
            return [
                str(BIN / "granian"), "--interface", "asgi", "--host", "127.0.0.1",
                "--port", str(port), "--http", "auto", "--workers", "1", "--no-ws",
                "--log-level", "warning", "--loop", "uvloop", "bench.servers_app:app",
            ]  # fmt: skip
        if self.name.startswith("pyvoy"):
            return [
                str(BIN / "pyvoy"), "--address", "127.0.0.1", "--port", str(port),
                "--log-level", "off", "bench.servers_app:app",
            ]  # fmt: skip
        runner = self.name.removesuffix("-bare")
        return [sys.executable, "-m", "bench.servers_app", runner, str(port)]

    def missing(self) -> list[str]:
        return [m for m in self.needs if importlib.util.find_spec(m) is None]


SERVERS = (
    Server("hypercorn", ("hypercorn",), grpc=True),
    Server("hypercorn-untuned", ("hypercorn",), grpc=True),
    Server("hypercorn-bare", ("hypercorn",), grpc=True, env={"BENCH_CHAIN": "bare"}),
    Server("hypercorn-uvloop", ("hypercorn", "uvloop"), grpc=True),
    Server("uvicorn-zttp", ("uvicorn", "zttp"), grpc=True),
    Server("uvicorn-zttp-uvloop", ("uvicorn", "zttp", "uvloop"), grpc=True),
    Server("granian", ("granian", "uvloop"), grpc=False),
    Server("pyvoy", ("pyvoy",), grpc=True),
)
TINY = ("hypercorn", "hypercorn-untuned")  # always installed (the others are the bench extra)
NOTES = {
    "hypercorn-untuned": "main before api/hypercorn_tuning.py",
    "hypercorn-bare": "connectrpc app alone: no interceptors, no MetaldASGI",
    "hypercorn-uvloop": "metald's hypercorn on uvloop (metald has no such setting)",
    "pyvoy": "Envoy; RSS includes it",
}

# Whether metald served by the server passes tests/e2e/test_protocols.py and
# tests/e2e/test_api_abuse.py, run with UNKEY_METALD_HTTP_SERVER=<server> (docs/performance.md,
# "The server", says why each fails). Absent: not run (metald has no uvloop setting).
SUITE_VERDICT: dict[str, bool] = {
    "hypercorn": True,
    "hypercorn-untuned": True,
    "uvicorn-zttp": False,  # early answers end the h2 connection; no stream limit
    "uvicorn-zttp-uvloop": False,
    "granian": False,  # no ASGI trailers: no gRPC at all
    "pyvoy": False,  # early answers end the h2 connection; a stream over the limit hangs
}


class Running:
    """One server process (its own session, ended by its pid)."""

    def __init__(self, server: Server, workdir: Path) -> None:
        self.server = server
        self.port = free_port()
        self.log = workdir / f"{server.name}.log"
        env = {
            **{k: v for k, v in os.environ.items() if "proxy" not in k.lower()},
            "PYTHONPATH": str(ROOT),
            **server.env,
        }
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                server.command(self.port), cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{PATH}"

    def wait_ready(self, timeout: float = 60.0) -> None:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        request = urllib.request.Request(
            self.url,
            data=b'{"vm_id": "vm-bench"}',
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"},
        )
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError), opener.open(request, timeout=2) as r:
                if r.status == 200 and b"vm-bench" in r.read():
                    return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = self.log.read_text(errors="replace")[-2000:]
                raise SystemExit(f"{self.server.name} did not start:\n{tail}")
            time.sleep(0.1)

    def grpc_ok(self) -> bool:
        """One gRPC call answered with grpc-status 0 (nghttp shows the trailers)."""
        out = subprocess.run(
            [
                "nghttp", "-v", "-d", str(GRPC_BODY), "-H", "content-type: application/grpc",
                "-H", "te: trailers", "-H", f"authorization: Bearer {TOKEN}", self.url,
            ],
            capture_output=True, timeout=30, check=False,
        )  # fmt: skip
        return re.search(rb"grpc-status: 0\b", out.stdout) is not None

    def rss_mib(self) -> float:
        """Resident memory of the server's process tree (pyvoy runs the app in Envoy)."""
        total = 0
        for pid in _tree(self.proc.pid):
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        return total / 1024

    def cpu_seconds(self) -> float:
        """CPU time (user and system) of the server's process tree so far."""
        ticks = 0
        for pid in _tree(self.proc.pid):
            with contextlib.suppress(OSError):
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                ticks += int(fields[11]) + int(fields[12])
        return ticks / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: only its tree
                self.proc.wait()


def _tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


GRPC_BODY = Path(tempfile.gettempdir()) / f"metald-bench-grpc-{os.getpid()}.bin"
WRK_SCRIPT = Path(tempfile.gettempdir()) / f"metald-bench-wrk-{os.getpid()}.lua"


def _write_inputs() -> None:
    message = pb.GetVmInfoRequest(vm_id="vm-bench").SerializeToString()
    GRPC_BODY.write_bytes(b"\0" + len(message).to_bytes(4, "big") + message)
    WRK_SCRIPT.write_text(
        'wrk.method = "POST"\n'
        'wrk.body = \'{"vm_id": "vm-bench"}\'\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["Authorization"] = "Bearer {TOKEN}"\n'
    )


_UNIT = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def wrk(url: str, seconds: float) -> dict[str, float]:
    """Connect JSON over HTTP/1.1: req/s, p50 and p99 in ms, failed responses."""
    out = subprocess.run(
        [
            "wrk", "-t2", f"-c{CONNECTIONS}", f"-d{seconds:g}s", "--latency",
            "-s", str(WRK_SCRIPT), url,
        ],
        capture_output=True, text=True, timeout=seconds + 60, check=True,
    ).stdout  # fmt: skip
    quantiles = re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)", out, re.M)
    latency = {q: float(v) * _UNIT[u] for q, v, u in quantiles}
    failed = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses: (\d+)", out))
    failed += sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
        "requests": int(re.search(r"(\d+) requests in", out).group(1)),  # type: ignore[union-attr]
        "p50_ms": latency["50"],
        "p99_ms": latency["99"],
        "failed": failed,
    }


def _h2load_seconds(url: str, workdir: Path, seconds: float) -> dict[str, float]:
    return h2load(url, seconds, workdir)


def h2load(url: str, seconds: float, workdir: Path) -> dict[str, float]:
    """gRPC over h2c, one stream per connection: req/s, p50 and p99 in ms, failed calls."""
    log = workdir / "h2load.log"
    log.unlink(missing_ok=True)
    out = subprocess.run(
        [
            "h2load", f"-c{CONNECTIONS}", "-m1", "-t2", f"-D{seconds:g}", "-d", str(GRPC_BODY),
            "-H", "content-type: application/grpc", "-H", "te: trailers",
            "-H", f"authorization: Bearer {TOKEN}", f"--log-file={log}", url,
        ],
        capture_output=True, text=True, timeout=seconds + 60, check=True,
    ).stdout  # fmt: skip
    rps = float(re.search(r"finished in [\d.]+s, ([\d.]+) req/s", out).group(1))  # type: ignore[union-attr]
    counts = re.search(r"(\d+) succeeded, (\d+) failed, (\d+) errored", out)
    assert counts is not None, out
    times = [
        int(line.split("\t")[2]) / 1000
        for line in log.read_text().splitlines()
        if line.count("\t") >= 2 and line.split("\t")[1] == "200"
    ]
    return {
        "rps": rps,
        "requests": int(counts.group(1)),
        "p50_ms": percentile(times, 0.5) if times else 0.0,
        "p99_ms": percentile(times, 0.99) if times else 0.0,
        "failed": int(counts.group(2)) + int(counts.group(3)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", default="", help="comma-separated servers (default: all)")
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    args = arguments(__doc__ or "", parser)
    for tool in ("wrk", "h2load", "nghttp"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing (make system-deps)")
    seconds, warmup, rounds = (1.0, 0.0, 1) if args.tiny else (args.seconds, 1.0, args.rounds)
    wanted = args.only.split(",") if args.only else TINY if args.tiny else None
    chosen = [s for s in SERVERS if wanted is None or s.name in wanted]
    report = Report(
        "servers",
        args.tiny,
        parameters={
            "connections": CONNECTIONS, "seconds": seconds, "warmup": warmup, "rounds": rounds,
            "connect": "wrk -t2 -c16, POST Connect JSON GetVmInfo over HTTP/1.1",
            "grpc": "h2load -t2 -c16 -m1, gRPC GetVmInfo over h2c",
            "versions": _versions(),
        },
    )  # fmt: skip
    _write_inputs()
    workdir = Path(tempfile.mkdtemp(prefix="metald-bench-servers-"))
    running: dict[str, Running] = {}
    try:
        for server in chosen:
            missing = server.missing()
            if missing:
                report.add("servers", {"server": server.name, "note": f"not installed: {missing}"})
                continue
            running[server.name] = Running(server, workdir)
        grpc: dict[str, bool] = {}
        for name, r in running.items():
            r.wait_ready()
            grpc[name] = r.server.grpc and r.grpc_ok()
        runs: dict[tuple[str, str], list[dict[str, float]]] = {}
        names = list(running)
        for round_ in range(rounds):
            order = names[round_ % len(names) :] + names[: round_ % len(names)]
            for name in order:
                r = running[name]
                for protocol in ("connect", "grpc"):
                    if protocol == "grpc" and not grpc[name]:
                        continue
                    measure: Callable[[float], dict[str, float]] = (
                        functools.partial(wrk, r.url)
                        if protocol == "connect"
                        else functools.partial(_h2load_seconds, r.url, workdir)
                    )
                    if warmup:
                        measure(warmup)
                    cpu = r.cpu_seconds()
                    result = measure(seconds)
                    # CPU per answer: what the server costs, much less disturbed by the
                    # machine's other load than req/s (a busy machine slows it down, but
                    # does not make it spend more CPU per call).
                    cpu = r.cpu_seconds() - cpu
                    result["cpu_us"] = cpu / max(1, result["requests"]) * 1e6
                    result["round"] = round_
                    runs.setdefault((name, protocol), []).append(result)
                    print(f"  round {round_} {name} {protocol}: {result}", file=sys.stderr)
        _summarise(report, running, runs, grpc, rounds)
        _compare(report, runs)
    finally:
        for r in running.values():
            r.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        GRPC_BODY.unlink(missing_ok=True)
        WRK_SCRIPT.unlink(missing_ok=True)
    columns = [
        ("server", "server"), ("protocol", "protocol"), ("suite", "passes suite"),
        ("rps", "req/s"), ("cpu_us", "CPU µs/call"), ("p50_ms", "p50 ms"), ("p99_ms", "p99 ms"),
        ("vs_fastest", "vs fastest"), ("vs_passing", "vs fastest passing"),
        ("failed", "failed"), ("rss_mib", "RSS MiB"), ("note", "note"),
    ]  # fmt: skip
    report.table("servers", columns, title="trivial GetVmInfo, 16 connections")
    report.table(
        "changes",
        [
            ("change", "change"), ("protocol", "protocol"), ("rps", "req/s after/before"),
            ("cpu", "CPU per call after/before"), ("p99", "p99 after/before"),
        ],
        title="each change against its before, same rounds",
    )  # fmt: skip
    report.save(args.out)


# (after, before, what changed): compared round by round.
CHANGES = (
    ("hypercorn", "hypercorn-untuned", "api/hypercorn_tuning.py"),
    ("hypercorn-uvloop", "hypercorn", "uvloop under metald's hypercorn"),
    ("hypercorn-bare", "hypercorn", "without metald's interceptors and MetaldASGI"),
)


def _compare(report: Report, runs: dict[tuple[str, str], list[dict[str, float]]]) -> None:
    for after, before, what in CHANGES:
        for protocol in ("connect", "grpc"):
            a, b = runs.get((after, protocol), []), runs.get((before, protocol), [])
            pairs = list(zip(a, b, strict=False))
            if not pairs:
                continue
            report.add(
                "changes",
                {
                    "change": what,
                    "protocol": protocol,
                    **{
                        column: _ratio([x[key] / y[key] for x, y in pairs if y[key]])
                        for column, key in (("rps", "rps"), ("cpu", "cpu_us"), ("p99", "p99_ms"))
                    },
                },
            )


def _ratio(values: list[float]) -> Ratio | None:
    return Ratio.of(values) if values else None


def _versions() -> dict[str, str]:
    found = {}
    for name in ("hypercorn", "h2", "h11", "uvicorn", "zttp", "granian", "pyvoy", "uvloop"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[name] = metadata.version(name)
    return found


def _summarise(
    report: Report,
    running: dict[str, Running],
    runs: dict[tuple[str, str], list[dict[str, float]]],
    grpc: dict[str, bool],
    rounds: int,
) -> None:
    for protocol in ("connect", "grpc"):
        # Per round: the fastest of all, and the fastest that passes the suite.
        fastest, passing = [], []
        for round_ in range(rounds):
            of_round = {
                name: rs[round_]["rps"]
                for (name, p), rs in runs.items()
                if p == protocol and len(rs) > round_
            }
            fastest.append(max(of_round.values(), default=0.0))
            passing.append(
                max((v for n, v in of_round.items() if SUITE_VERDICT.get(n)), default=0.0)
            )
        for name, r in running.items():
            rs = runs.get((name, protocol), [])
            row: dict[str, Any] = {
                "server": name,
                "protocol": protocol,
                "suite": {True: "yes", False: "no", None: "not run"}[SUITE_VERDICT.get(name)],
                "rss_mib": r.rss_mib(),
                "note": NOTES.get(name, ""),
            }
            if not rs:
                row["note"] = "no gRPC (no trailers)" if not grpc[name] else "not measured"
                report.add("servers", row)
                continue
            row["rps"] = Spread.of([x["rps"] for x in rs])
            row["p50_ms"] = Spread.of([x["p50_ms"] for x in rs])
            row["p99_ms"] = Spread.of([x["p99_ms"] for x in rs])
            row["cpu_us"] = Spread.of([x["cpu_us"] for x in rs])
            row["failed"] = sum(int(x["failed"]) for x in rs)
            row["vs_fastest"] = Ratio.of(
                [x["rps"] / fastest[int(x["round"])] for x in rs if fastest[int(x["round"])]]
            )
            ratios = [x["rps"] / passing[int(x["round"])] for x in rs if passing[int(x["round"])]]
            if ratios:
                row["vs_passing"] = Ratio.of(ratios)
            row["runs"] = rs
            report.add("servers", row)


if __name__ == "__main__":
    main()
