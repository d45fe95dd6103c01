"""What one VMM process uses: CPU time and memory from /proc, disk counters from the driver.

CPU share needs two samples: the last one is kept on the process record, so each sample
reports the share since the previous one (the first, since the process started).

Samples are taken at a bounded rate (`latest_usage`): a VMM round trip (QEMU's
query-blockstats, Firecracker's metrics) and two /proc reads on every GetVmInfo were part
of what held it to 0.15 of a trivial answer's throughput (docs/performance.md). Each
process record keeps a core.readings Reading: a caller gets a sample at most `max_age`
old, and a burst of callers costs one sample. `fresh_usage` takes one now: the metering
collector (service/metering.py) hooks in there, and GetVmInfo then shows its samples.

What a guest's CPUs cost is the CPU time of the VMM's vCPU threads alone (not its I/O or
main-loop threads, which work for the host as much as for the guest): each driver names
them (`vcpu_thread`: QEMU's "CPU n/KVM", "CPU n/TCG" with debug-threads=on, Firecracker's
"fc_vcpu n"). Their ids are found once per process and kept: a sample then reads one
schedstat per vCPU (nanoseconds, exact), not every thread's name.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable

from metald.backends.vmm.driver import IoStats
from metald.backends.vmm.process import VmmProcess
from metald.core.errors import BackendError
from metald.core.models import VmUsage
from metald.core.readings import Reading
from metald.host.process import PAGE_SIZE, ProcFiles, process_age_seconds, thread_names

log = logging.getLogger(__name__)

# How old the usage GetVmInfo shows may be: its figures are per second (CPU share since the
# last sample, uptime) and a poller every few milliseconds then costs one sample a second.
USAGE_MAX_AGE_SECONDS = 1.0
# How old a sample's disk counters may be: the collector samples every 100 ms, and a
# QMP query-blockstats per VM per tick would cost three times its whole CPU budget.
IO_MAX_AGE_SECONDS = 1.0
IO_TIMEOUT_SECONDS = 10.0  # a refresh that takes longer is given up (the last ones stand)


async def latest_usage(
    vm: VmmProcess | None,
    max_age: float = USAGE_MAX_AGE_SECONDS,
    clock: Callable[[], float] = time.monotonic,
    vcpu_thread: re.Pattern[str] | None = None,
    io_max_age: float = 0.0,
) -> VmUsage:
    """The process's usage, sampled at most `max_age` seconds ago (zeros without one)."""
    if vm is None or not vm.alive:
        return VmUsage()
    return await _reading(vm, max_age, clock, vcpu_thread, io_max_age).get()


async def fresh_usage(
    vm: VmmProcess | None,
    max_age: float = USAGE_MAX_AGE_SECONDS,
    clock: Callable[[], float] = time.monotonic,
    vcpu_thread: re.Pattern[str] | None = None,
    io_max_age: float = 0.0,
) -> VmUsage:
    """A sample taken now, kept as the latest (taken here, not in a task of the reading:
    the collector asks ten times a second per VM)."""
    if vm is None or not vm.alive:
        return VmUsage()
    usage = await sample_usage(vm, vcpu_thread, io_max_age, wait_for_io=False)
    _reading(vm, max_age, clock, vcpu_thread, io_max_age).offer(usage)
    return usage


def _reading(
    vm: VmmProcess,
    max_age: float,
    clock: Callable[[], float],
    vcpu_thread: re.Pattern[str] | None,
    io_max_age: float,
) -> Reading[VmUsage]:
    if vm.usage is None:
        vm.usage = Reading(lambda: sample_usage(vm, vcpu_thread, io_max_age), max_age, clock)
    return vm.usage


def proc_files(vm: VmmProcess) -> ProcFiles:
    """The process's /proc files, open while it is watched (closed on disconnect)."""
    if vm.proc_files is None:
        vm.proc_files = ProcFiles(vm.identity.pid)
    return vm.proc_files


def vcpu_time_ns(vm: VmmProcess, vcpu_thread: re.Pattern[str] | None) -> int:
    """The CPU time of the process's vCPU threads (0 when the driver names none). The
    thread ids are looked up again when one of them is gone."""
    if vcpu_thread is None:
        return 0
    pid = vm.identity.pid
    for _ in range(2):
        if vm.vcpu_tids is None:
            names = thread_names(pid)
            vm.vcpu_tids = tuple(sorted(t for t, n in names.items() if vcpu_thread.match(n)))
        total = 0
        files = proc_files(vm)
        for tid in vm.vcpu_tids:
            ns = files.thread_cpu_ns(tid)
            if ns is None:
                break
            total += ns
        else:
            return total
        vm.vcpu_tids = None
    return 0


async def io_stats(vm: VmmProcess, max_age: float, wait_first: bool = True) -> IoStats | None:
    """The driver's disk counters, at most `max_age` seconds old (0: asked now). A VMM
    round trip costs more than the rest of a sample together (bench/metering.py), so it is
    made at most every `max_age`, and in the background: a sample never waits on the VMM
    once it has counters. The first one waits (GetVmInfo shows real counters at once)
    unless not `wait_first` (the collector's ticks wait on nothing: their first sample has
    none, read as zeros, which the next sample's real counters follow as growth;
    core/counters.py). A failed ask keeps the last counters (zeros would look like
    counters that restarted)."""
    last = vm.last_io
    if max_age > 0 and (last is not None or not wait_first):
        if last is not None and time.monotonic() - last[1] < max_age:
            return last[0]
        if vm.io_refresh is None or vm.io_refresh.done():
            vm.io_refresh = asyncio.ensure_future(_refresh_io(vm))
        return last[0] if last is not None else None
    await _refresh_io(vm)
    return vm.last_io[0] if vm.last_io is not None else None


async def _refresh_io(vm: VmmProcess) -> None:
    if vm.control is None:
        return
    asked = time.monotonic()
    try:
        async with asyncio.timeout(IO_TIMEOUT_SECONDS):
            stats = await vm.control.io_stats()
    except (BackendError, TimeoutError) as e:
        log.debug("VM %s: no I/O counters: %s", vm.vm_id, e)
        return
    vm.last_io = (stats, asked)


async def sample_usage(
    vm: VmmProcess | None,
    vcpu_thread: re.Pattern[str] | None = None,
    io_max_age: float = 0.0,
    *,
    wait_for_io: bool = True,
) -> VmUsage:
    """CPU time and share (100 = one host CPU; since the last sample, or since the
    process started), RSS, disk counters from the driver (at most `io_max_age` old; see
    io_stats for `wait_for_io`), seconds since boot. Zeros when no VMM process runs."""
    if vm is None or not vm.alive:
        return VmUsage()
    files = proc_files(vm)
    stat = files.stat()
    if stat is None or stat.start_time != vm.identity.start_time:
        return VmUsage()
    cpu_ns = stat.cpu_time_ns
    now = time.monotonic()
    if vm.last_cpu_sample is not None:
        prev_cpu, prev_at = vm.last_cpu_sample
        elapsed = now - prev_at
        percent = 100.0 * (cpu_ns - prev_cpu) / (elapsed * 1e9) if elapsed > 0 else 0.0
    else:
        age = process_age_seconds(vm.identity)
        percent = 100.0 * cpu_ns / (age * 1e9) if age > 0 else 0.0
    vm.last_cpu_sample = (cpu_ns, now)
    io = await io_stats(vm, io_max_age, wait_for_io)
    uptime = int(time.time() - vm.booted_at) if vm.booted_at is not None else 0
    return VmUsage(
        cpu_time_ns=cpu_ns,
        cpu_usage_percent=max(0.0, percent),
        memory_bytes=stat.rss_pages * PAGE_SIZE,  # (stat has it: no statm read)
        disk_read_bytes=io.disk_read_bytes if io else 0,
        disk_write_bytes=io.disk_write_bytes if io else 0,
        disk_read_ops=io.disk_read_ops if io else 0,
        disk_write_ops=io.disk_write_ops if io else 0,
        uptime_seconds=max(0, uptime),
        vcpu_time_ns=vcpu_time_ns(vm, vcpu_thread),
        process=vm.identity,
    )
