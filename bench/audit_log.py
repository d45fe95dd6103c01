"""The audit log's write cost (issue 10, audit): what a row costs the daemon's process, and
what `record` costs the RPC that waits for it.

On real SQLite (WAL, synchronous=NORMAL, as metald runs it), in one process:
- `append`, one row per transaction: the cost if every RPC wrote its own row;
- `record` through the queue and the writer (batches of what queued meanwhile), rows
  recorded back to back: the daemon's path under a burst;
- `record` alone (time until it returns): what the RPC pays.
CPU is this process's (every thread: the loop and aiosqlite's worker).

    .venv/bin/python -m bench.audit_log [--rows 2000]

Not part of `make bench`'s SUITE: a quick measurement quoted in docs/architecture.md.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from metald.core.audit import AuditEvent
from metald.store.audit_log import SqlAuditLog
from metald.store.database import Database


def _event(i: int) -> AuditEvent:
    return AuditEvent(
        at_ns=time.time_ns(), actor="token:acme", role="customer", customer_id="acme",
        method="vmprovisioner.v1.VmService/CreateVm", vm_id=f"vm-{i}", code="ok",
        source="127.0.0.1:50000", trace_id="0af7651916cd43dd8448eb211c80319c",
        tenant_header="acme",
    )  # fmt: skip


async def _main(rows: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        database = Database(f"sqlite+aiosqlite:///{Path(tmp) / 'metald.db'}")
        await database.migrate()
        audit = SqlAuditLog(database)
        try:
            cpu, wall = time.process_time(), time.perf_counter()
            for i in range(rows):
                await audit.append([_event(i)])
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            print(f"append, a transaction per row: {cpu / rows * 1e6:.0f} us CPU, "
                  f"{wall / rows * 1e6:.0f} us wall per row")  # fmt: skip

            await audit.start()
            waits = []
            cpu, wall = time.process_time(), time.perf_counter()
            for i in range(rows):
                t = time.perf_counter()
                await audit.record(_event(i))
                waits.append(time.perf_counter() - t)
                if i % 50 == 0:
                    await asyncio.sleep(0)  # calls arrive over loop turns, not all in one
            await audit.stop()
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            waits.sort()
            print(f"record via the queue and writer: {cpu / rows * 1e6:.0f} us CPU, "
                  f"{wall / rows * 1e6:.0f} us wall per row; record() itself: median "
                  f"{waits[len(waits) // 2] * 1e6:.1f} us, p99 "
                  f"{waits[int(len(waits) * 0.99)] * 1e6:.1f} us")  # fmt: skip
            verdict = await audit.verify()
            assert verdict.ok and verdict.rows == 2 * rows, verdict
            cpu = time.process_time()
            await audit.verify()
            print(f"verify: {(time.process_time() - cpu) / (2 * rows) * 1e6:.0f} us CPU per row")
        finally:
            await database.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=2000)
    asyncio.run(_main(parser.parse_args().rows))


if __name__ == "__main__":
    main()
