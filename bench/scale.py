"""Benchmark 5 (scale): reads and start-up with a big store.

Two benchmark daemons side by side: `small` (an empty store but for its live VMs) and `big`
(ROWS SHUTDOWN rows of four customers, c0..c3, written into its store while it was stopped,
as load.insert_rows does), each with live VMs of customer `bench`: 1 on small, LIVE on big
(created, booted and paused: live, adopted at each start, and idle). Measured, alternating
small and big in every round:

- GetVmInfo of a live VM, one call at a time (wrk -t1 -c1): its latency on big against
  small is the "unchanged by the row count" ratio;
- ListVms of c0 on big (ROWS/4 rows): the first page of 50, a page from the middle (a
  cursor), and a state filter nothing matches (the index is walked to its end); with
  total_count each time;
- start-up, from `metald serve` to /health answering (after adoption and orphan removal),
  with ROWS rows and LIVE live VMs against small's 1 live VM.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from metald.client import AsyncMetaldClient
from metald.core.paging import encode_token

from .daemon import TOKEN, BenchDaemon
from .harness import Report, Spread, arguments
from .load import connect_call, insert_rows, remove_vms, wrk

OTHERS = ["c0", "c1", "c2", "c3"]
START = 1.7e9  # created_at of the first inserted row (load.insert_rows)


async def live_vms(url: str, count: int, nic: bool) -> list[str]:
    """`count` VMs created, booted and paused (live, idle)."""
    ids = []
    async with AsyncMetaldClient(url, TOKEN) as client:
        for _ in range(count):
            created = await client.create_vm(network="dual-stack" if nic else None)
            await client.boot_vm(created.vm_id)
            await client.pause_vm(created.vm_id)
            ids.append(created.vm_id)
    return ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--live", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--no-nic", action="store_true", help="live VMs without a network")
    args = arguments(__doc__ or "", parser)
    if args.tiny:
        args.rows, args.live, args.rounds, args.seconds = 1_000, 1, 1, 1.0
    nic = not args.no_nic
    report = Report("scale", args.tiny)
    report.parameters.update(
        rows=args.rows, live=args.live, rounds=args.rounds, seconds=args.seconds, nic=nic,
        latency="wrk -t1 -c1 (one call at a time)",
    )  # fmt: skip
    with BenchDaemon() as small, BenchDaemon() as big:
        try:
            measure(report, small, big, args)
        finally:
            remove_vms(small, [TOKEN])
            remove_vms(big, [TOKEN])
    report.table("reads", [("call", "call"), ("store", "store"), ("p50", "p50 ms"),
                           ("p99", "p99 ms")])  # fmt: skip
    report.table("start-up", [("store", "store"), ("live", "live VMs"),
                              ("seconds", "ready to serve, s")])  # fmt: skip
    report.save(args.out)


def measure(report: Report, small: BenchDaemon, big: BenchDaemon, args: argparse.Namespace) -> None:
    nic = not args.no_nic
    big.stop()
    t0 = time.monotonic()
    insert_rows(big.db_path, args.rows, OTHERS, start=START)
    report.parameters["insert_seconds"] = round(time.monotonic() - t0, 1)
    big.start()
    small_vm = asyncio.run(live_vms(small.url, 1, nic))[0]
    big_vms = asyncio.run(live_vms(big.url, args.live, nic))
    per_customer = args.rows // len(OTHERS)
    # The row in the middle of c0's rows (c0 holds rows 0, 4, 8, ...).
    middle = (per_customer // 2) * len(OTHERS)
    token = encode_token(START + middle, f"bench-c0-{middle}")
    reads: list[tuple[str, str, BenchDaemon, str, dict[str, Any]]] = [
        ("GetVmInfo", "small", small, TOKEN, {"vmId": small_vm}),
        ("GetVmInfo", "big", big, TOKEN, {"vmId": big_vms[0]}),
        ("ListVms first page", "big", big, "dev_customer_c0", {}),
        ("ListVms middle page", "big", big, "dev_customer_c0", {"pageToken": token}),
        (
            "ListVms state filter, no match",
            "big",
            big,
            "dev_customer_c0",
            {"stateFilter": ["VM_STATE_RUNNING"]},
        ),
    ]
    for method, _, daemon, tok, body in reads:  # each answers, and as expected
        rpc = "GetVmInfo" if method == "GetVmInfo" else "ListVms"
        answer = connect_call(daemon.url, rpc, body, tok)
        if rpc == "ListVms" and "stateFilter" not in body:
            assert int(answer["totalCount"]) == per_customer, answer.get("totalCount")
            assert len(answer["vms"]) == min(50, per_customer), len(answer["vms"])
    latencies: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for r in range(args.rounds):
        ordered = reads if r % 2 == 0 else list(reversed(reads))
        for method, side, daemon, tok, body in ordered:
            rpc = "GetVmInfo" if method == "GetVmInfo" else "ListVms"
            result = wrk(daemon.url, rpc, body, tok, seconds=args.seconds, connections=1,
                         threads=1)  # fmt: skip
            latencies.setdefault((method, side), []).append((result.p50_ms, result.p99_ms))
    for (method, side), runs in latencies.items():
        rows = args.rows if side == "big" else 0
        report.add(
            "reads",
            {
                "call": method,
                "store": f"{rows:,} rows, {args.live if side == 'big' else 1} live",
                "p50": Spread.of([p50 for p50, _ in runs]),
                "p99": Spread.of([p99 for _, p99 in runs]),
            },
        )
    small_get = [p50 for p50, _ in latencies[("GetVmInfo", "small")]]
    big_get = [p50 for p50, _ in latencies[("GetVmInfo", "big")]]
    ratio = Spread.of([b / s for b, s in zip(big_get, small_get, strict=True)])
    report.add(
        "reads",
        {"call": "GetVmInfo p50, big/small", "store": "ratio", "p50": ratio.show(2)},
    )
    starts: dict[str, list[float]] = {"small": [], "big": []}
    for r in range(args.rounds):
        for side in ("small", "big") if r % 2 == 0 else ("big", "small"):
            daemon = small if side == "small" else big
            daemon.stop()
            starts[side].append(daemon.start())
    for vm_id, daemon in [(small_vm, small), *[(v, big) for v in big_vms]]:
        state = connect_call(daemon.url, "GetVmInfo", {"vmId": vm_id}, TOKEN)["state"]
        assert state == "VM_STATE_PAUSED", (vm_id, state)  # adopted, not lost
    for side, seconds in starts.items():
        rows = args.rows if side == "big" else 0
        live = args.live if side == "big" else 1
        report.add(
            "start-up",
            {"store": f"{rows:,} rows", "live": live, "seconds": Spread.of(seconds)},
        )
    report.parameters["big_rss_mib"] = round(big.rss() / 2**20, 1)
    report.parameters["small_rss_mib"] = round(small.rss() / 2**20, 1)


if __name__ == "__main__":
    main()
