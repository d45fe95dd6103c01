"""Benchmark 4 of issue 8: metald's resident memory with 0, 10 and 50 managed VMs, so its
memory per VM (target <= 1 MiB), and the VMM's own memory per VM.

The VMs are CREATED (QEMU started with its vCPUs stopped, 128 MiB of guest memory, no NIC):
what metald holds per VM (its registry, process watch, control connection, timers) is the
same for a running one, and the guest's own memory is the VMM's, not metald's. metald's RSS
is sampled a few times after each step (median); its spare jailer helpers (separate
processes, jailer/spares.py) are shown on their own line, as they are part of what metald
costs the host but not of its per-VM cost.

    .venv/bin/python -m bench.density [--counts 0,10,50] [--tiny] [--out DIR]
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from metald.client import MetaldClient
from metald.host.process import child_pids

from .daemon import TOKEN, BenchDaemon, rss_bytes
from .harness import Report, arguments

MIB = 1024 * 1024


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def sampled_rss(pid: int, samples: int = 5, gap: float = 0.2) -> int:
    values = []
    for _ in range(samples):
        values.append(rss_bytes(pid))
        time.sleep(gap)
    return int(statistics.median(values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--counts", default="0,10,50", help="managed VMs at each step")
    parser.add_argument("--memory-mib", type=int, default=128)
    args = arguments(__doc__ or "", parser)
    counts = [0, 2] if args.tiny else sorted({int(c) for c in args.counts.split(",")})
    report = Report(
        "density", args.tiny, parameters={"counts": counts, "memory_mib": args.memory_mib}
    )
    with BenchDaemon() as daemon, MetaldClient(daemon.url, TOKEN) as client:
        made: list[str] = []
        try:
            base = 0
            for count in counts:
                with ThreadPoolExecutor(4) as pool:
                    new = list(
                        pool.map(
                            lambda _: client.create_vm(vcpus=1, memory_mib=args.memory_mib).vm_id,
                            range(count - len(made)),
                        )
                    )
                made += new
                time.sleep(1.0)
                rss = sampled_rss(daemon.pid)
                kids = child_pids(daemon.pid)
                vmms = [p for p in kids if cmdline(p)[0].endswith(("qemu-system-x86_64",))]
                spares = [
                    p for p in kids if "--wait" in cmdline(p) and "metald.jailer" in cmdline(p)
                ]
                vmm_rss = [rss_bytes(p) for p in vmms]
                if count == counts[0]:
                    base = rss
                per_vm = (rss - base) / count if count and count != counts[0] else None
                report.add(
                    "memory",
                    {
                        "vms": count,
                        "vmm_processes": len(vmms),
                        "metald_rss_mib": rss / MIB,
                        "metald_per_vm_kib": None if per_vm is None else per_vm / 1024,
                        "vmm_rss_mib_per_vm": statistics.median(vmm_rss) / MIB if vmm_rss else None,
                        "spare_helpers": len(spares),
                        "spare_helpers_rss_mib": sum(rss_bytes(p) for p in spares) / MIB,
                        "target_per_vm_kib": 1024,
                    },
                )
        finally:
            with ThreadPoolExecutor(4) as pool:
                list(pool.map(lambda vm_id: client.delete_vm(vm_id, force=True), made))
    report.table(
        "memory",
        [
            ("vms", "VMs"),
            ("vmm_processes", "VMMs seen"),
            ("metald_rss_mib", "metald RSS MiB"),
            ("metald_per_vm_kib", "metald per VM KiB"),
            ("target_per_vm_kib", "target KiB"),
            ("vmm_rss_mib_per_vm", "VMM RSS per VM MiB (median)"),
            ("spare_helpers", "spare helpers"),
            ("spare_helpers_rss_mib", "their RSS MiB"),
        ],
        title="density: metald's memory by managed VMs (CREATED, no NIC)",
    )
    report.save(args.out)


if __name__ == "__main__":
    main()
