"""Times a VM's life through the API, with the daemon as a separate process.

    .venv/bin/python bench/vm_lifecycle.py [--runs N] [--parallel K]

Prints, per step, the median and worst wall time over the runs: CreateVm, BootVm, BootVm
to the guest's READY console line, CreateVm to READY, PauseVm, ResumeVm, RebootVm to the next
READY line, graceful ShutdownVm, DeleteVm; and the daemon's resident memory at the end.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pyroute2 import netns

from metald.client import MetaldClient

ROOT = Path(__file__).resolve().parents[1]
METALD = Path(sys.executable).parent / "metald"
READY = "METALD-GUEST READY"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_lines(
    client: MetaldClient, vm_id: str, needle: str, count: int, deadline: float
) -> float:
    """Follow the console through GetVmConsole until `needle` was seen `count` times."""
    seen, offset = b"", 0
    while time.monotonic() < deadline:
        chunk = client.get_vm_console(vm_id, offset=offset, max_bytes=1024 * 1024)
        seen = (b"" if chunk.offset < offset else seen) + chunk.data
        offset = chunk.next_offset
        if seen.decode(errors="replace").count(needle) >= count:
            return time.monotonic()
        time.sleep(0.02)
    raise TimeoutError(f"{needle!r} x{count} not seen on {vm_id}'s console")


def one_life(client: MetaldClient, network: bool) -> dict[str, float]:
    t: dict[str, float] = {}
    t0 = time.monotonic()
    vm_id = client.create_vm(
        vcpus=1, memory_mib=256, network="dual-stack" if network else None
    ).vm_id
    t1 = time.monotonic()
    client.boot_vm(vm_id)
    t2 = time.monotonic()
    t3 = wait_for_lines(client, vm_id, READY, 1, t2 + 120)
    t.update(create=t1 - t0, boot=t2 - t1, boot_to_ready=t3 - t2, create_to_ready=t3 - t0)
    s = time.monotonic()
    client.pause_vm(vm_id)
    t["pause"] = time.monotonic() - s
    s = time.monotonic()
    client.resume_vm(vm_id)
    t["resume"] = time.monotonic() - s
    s = time.monotonic()
    client.reboot_vm(vm_id)
    t["reboot_to_ready"] = wait_for_lines(client, vm_id, READY, 2, s + 120) - s
    s = time.monotonic()
    client.shutdown_vm(vm_id, timeout_seconds=30)
    t["shutdown_graceful"] = time.monotonic() - s
    s = time.monotonic()
    client.delete_vm(vm_id)
    t["delete"] = time.monotonic() - s
    return t


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--parallel", type=int, default=1)
    parser.add_argument("--assets", default=str(ROOT / "var" / "assets"))
    parser.add_argument("--network", action="store_true", help="give each VM a NIC")
    args = parser.parse_args()

    port = free_port()
    tag = secrets.token_hex(3)
    host_netns = f"mbh{tag}"
    # The daemon's network lives in namespaces this script makes, never the machine's own.
    netns.create(host_netns)
    with (
        tempfile.TemporaryDirectory(prefix="metald-bench-") as data,
        tempfile.TemporaryDirectory(prefix="mj") as jails,
    ):
        env = dict(
            os.environ,
            UNKEY_METALD_ADDRESS="127.0.0.1",
            UNKEY_METALD_PORT=str(port),
            UNKEY_METALD_DATA_DIR=data,
            UNKEY_METALD_ASSETMANAGER_CACHE_DIR=args.assets,
            UNKEY_METALD_AUTH_DEV_TOKENS="true",
            UNKEY_METALD_JAILER_CHROOT_DIR=jails,
            UNKEY_METALD_NETWORK_HOST_NETNS=host_netns,
            UNKEY_METALD_NETWORK_SEGMENTS_NETNS=f"mbs{tag}",
            UNKEY_METALD_NETWORK_NETNS_PREFIX=f"mbv{tag}-",
        )
        log = open(Path(data) / "metald.log", "w")  # noqa: SIM115 - closed below
        daemon = subprocess.Popen([str(METALD), "serve"], env=env, stderr=log, stdout=log)
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 60
            while True:
                try:
                    urllib.request.urlopen(f"{url}/health", timeout=1).read()
                    break
                except OSError:
                    if time.monotonic() > deadline or daemon.poll() is not None:
                        raise SystemExit("metald did not start; see its log") from None
                    time.sleep(0.1)
            client = MetaldClient(url, "dev_customer_bench")
            with ThreadPoolExecutor(args.parallel) as pool:
                results = list(pool.map(lambda _: one_life(client, args.network), range(args.runs)))
            nic = "with a NIC" if args.network else "no NIC"
            print(f"{args.runs} VM lives, {args.parallel} at a time (1 vCPU, 256 MiB, TCG, {nic})")
            print(f"{'step':<20}{'median s':>10}{'max s':>10}")
            for step in results[0]:
                values = [r[step] for r in results]
                print(f"{step:<20}{statistics.median(values):>10.3f}{max(values):>10.3f}")
            print(f"metald RSS after the runs: {rss_mib(daemon.pid):.1f} MiB")
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=30)
            log.close()
            for name in netns.listnetns():
                if name in (host_netns, f"mbs{tag}") or name.startswith(f"mbv{tag}-"):
                    netns.remove(name)


if __name__ == "__main__":
    main()
