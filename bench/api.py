"""Benchmark 1 (API): metald's read path against the same server doing nothing.

A benchmark daemon (bench/daemon.py) holds one RUNNING QEMU guest of customer `bench` (with
a NIC unless --no-nic) and ROWS SHUTDOWN rows of four other customers (written into its
store while it was stopped: load.insert_rows). Measured, each with 16 connections:

- GetVmInfo of the running VM;
- ListVms of `bench` (1 VM), and ListVms of `c0` (the first page of 50 of its ROWS/4);

over Connect JSON (wrk -t2 -c16, HTTP/1.1) and over gRPC (h2load -t2 -c16 -m1, h2c).

The ceiling is the same server doing nothing (bench/trivial.py): metald's server function,
ASGI wrapper, generated application, interceptors and settings, with handlers that answer
a constant, the real daemon's own answer to the same call (so the same bytes are encoded).
The two alternate, real first in even rounds and trivial first in odd ones; each figure is
the median of ROUNDS runs with its range, and the ratio real/trivial is taken per round.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metald.client import AsyncMetaldClient

from .daemon import TOKEN, BenchDaemon, free_port
from .harness import Report, Spread, arguments
from .load import (
    LoadResult,
    connect_call,
    grpc_check,
    h2load,
    insert_rows,
    parse,
    remove_vms,
    wait_healthy,
    wrk,
)

CUSTOMER = TOKEN.removeprefix("dev_customer_")
OTHERS = ["c0", "c1", "c2", "c3"]


@dataclass(frozen=True)
class Case:
    name: str
    method: str
    customer: str
    body: dict[str, Any]


async def running_vm(url: str, nic: bool) -> str:
    async with AsyncMetaldClient(url, TOKEN) as client:
        created = await client.create_vm(network="dual-stack" if nic else None)
        await client.boot_vm(created.vm_id)
        return created.vm_id


def start_trivial(daemon: BenchDaemon, answers: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {**daemon.env, "UNKEY_METALD_PORT": str(port)}
    log = open(daemon.workdir / "trivial.log", "ab")  # noqa: SIM115 - the child keeps it
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.trivial", str(answers)], env=env,
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
        start_new_session=True,
    )  # fmt: skip
    log.close()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url)
    except BaseException:
        stop(proc)
        raise
    return proc, url


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def token_of(customer: str) -> str:
    return f"dev_customer_{customer}"


def runner(protocol: str, case: Case, seconds: float) -> Callable[[str], LoadResult]:
    token = token_of(case.customer)
    if protocol == "connect":
        return lambda url: wrk(url, case.method, case.body, token, seconds=seconds)
    message = parse(case.method, case.body)
    return lambda url: h2load(url, case.method, message, token, seconds=seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--no-nic", action="store_true", help="the VM without a network")
    parser.add_argument("--only", default="", help="comma-separated case names")
    args = arguments(__doc__ or "", parser)
    if args.tiny:
        args.rows, args.rounds, args.seconds = 200, 1, 1.0
    report = Report("api", args.tiny)
    report.parameters.update(
        rows=args.rows, rounds=args.rounds, seconds=args.seconds, nic=not args.no_nic,
        connections=16, connect="wrk -t2 -c16", grpc="h2load -t2 -c16 -m1",
    )  # fmt: skip
    with BenchDaemon() as daemon, tempfile.TemporaryDirectory() as tmp:
        daemon.stop()
        insert_rows(daemon.db_path, args.rows, OTHERS)
        daemon.start()
        try:
            measure_daemon(report, daemon, args, Path(tmp))
        finally:
            remove_vms(daemon, [TOKEN])
    columns = [
        ("case", "case"), ("protocol", "protocol"), ("ratio_shown", "real/trivial req/s"),
        ("real_rps", "real req/s"), ("trivial_rps", "trivial req/s"),
        ("real_p50", "real p50 ms"), ("real_p99", "real p99 ms"),
        ("trivial_p50", "trivial p50 ms"), ("trivial_p99", "trivial p99 ms"),
    ]  # fmt: skip
    report.table("calls", columns)
    report.save(args.out)


def measure_daemon(
    report: Report, daemon: BenchDaemon, args: argparse.Namespace, tmp: Path
) -> None:
    vm_id = asyncio.run(running_vm(daemon.url, nic=not args.no_nic))
    cases = [
        Case("GetVmInfo (running VM)", "GetVmInfo", CUSTOMER, {"vmId": vm_id}),
        Case("ListVms (1 VM)", "ListVms", CUSTOMER, {}),
        Case(f"ListVms (50 of {args.rows // len(OTHERS):,})", "ListVms", OTHERS[0], {}),
    ]
    if args.only:
        wanted = set(args.only.split(","))
        cases = [c for c in cases if c.method in wanted or c.name in wanted]
    answers: dict[str, dict[str, Any]] = {"GetVmInfo": {}, "ListVms": {}}
    for case in cases:
        answer = connect_call(daemon.url, case.method, case.body, token_of(case.customer))
        answers[case.method][case.customer] = answer
    path = tmp / "answers.json"
    path.write_text(json.dumps(answers))
    trivial, trivial_url = start_trivial(daemon, path)
    try:
        sides = {"real": daemon.url, "trivial": trivial_url}
        for side_url in sides.values():  # both answer, over both protocols
            for case in cases:
                message = parse(case.method, case.body)
                grpc_check(side_url, case.method, message, token_of(case.customer))
                wrk(side_url, case.method, case.body, token_of(case.customer), seconds=1)
        measure(report, cases, sides, args.rounds, args.seconds)
    finally:
        stop(trivial)
    report.parameters["daemon_rss_mib"] = round(daemon.rss() / 2**20, 1)


def measure(
    report: Report, cases: list[Case], sides: dict[str, str], rounds: int, seconds: float
) -> None:
    for protocol in ("connect", "grpc"):
        for case in cases:
            run = runner(protocol, case, seconds)
            results: dict[str, list[LoadResult]] = {"real": [], "trivial": []}
            for r in range(rounds):
                order = ("real", "trivial") if r % 2 == 0 else ("trivial", "real")
                for side in order:
                    results[side].append(run(sides[side]))
            ratios = [
                real.rps / trivial.rps
                for real, trivial in zip(results["real"], results["trivial"], strict=True)
            ]
            row: dict[str, Any] = {
                "case": case.name,
                "protocol": "Connect JSON" if protocol == "connect" else "gRPC",
                "ratio": Spread.of(ratios),
            }
            row["ratio_shown"] = row["ratio"].show(2)
            for side, runs in results.items():
                row[f"{side}_rps"] = Spread.of([x.rps for x in runs])
                row[f"{side}_p50"] = Spread.of([x.p50_ms for x in runs])
                row[f"{side}_p99"] = Spread.of([x.p99_ms for x in runs])
            report.add("calls", row)
            print(f"{row['protocol']} {case.name}: ratio {row['ratio'].show(2)}", flush=True)


if __name__ == "__main__":
    main()
