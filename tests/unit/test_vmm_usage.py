"""backends/vmm/usage.py: GetVmInfo's usage comes from a sample at most max_age old, so a
poller costs one VMM round trip per max_age, not one per call. The process is this test's
own (its /proc entries are real); the control is a stand-in counting its round trips."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from metald.backends.vmm.driver import IoStats
from metald.backends.vmm.layout import VmLayout
from metald.backends.vmm.process import VmmProcess
from metald.backends.vmm.usage import fresh_usage, latest_usage
from metald.host.process import identity_of


class CountingControl:
    def __init__(self) -> None:
        self.round_trips = 0

    async def io_stats(self) -> IoStats:
        self.round_trips += 1
        return IoStats(disk_read_bytes=self.round_trips)


class Running:
    exited = False


class Clock:
    now = 10.0

    def __call__(self) -> float:
        return self.now


def this_process(tmp_path: Path, control: CountingControl) -> VmmProcess:
    identity = identity_of(os.getpid())
    assert identity is not None
    watch: Any = Running()
    vmm: Any = control
    return VmmProcess(
        vm_id="vm-1",
        layout=VmLayout(tmp_path),
        identity=identity,
        accelerator="tcg",
        control_socket=tmp_path / "qmp.sock",
        owner_uid=os.getuid(),
        host_run_dir=tmp_path,
        watch=watch,
        control=vmm,
    )


async def test_usage_is_sampled_at_most_once_per_max_age(tmp_path: Path) -> None:
    control, clock = CountingControl(), Clock()
    vm = this_process(tmp_path, control)
    first = await latest_usage(vm, 1.0, clock)
    assert first.memory_bytes > 0 and first.disk_read_bytes == 1
    for _ in range(100):
        assert await latest_usage(vm, 1.0, clock) == first
    assert control.round_trips == 1
    clock.now += 1.5
    assert (await latest_usage(vm, 1.0, clock)).disk_read_bytes == 2
    assert control.round_trips == 2


async def test_a_fresh_sample_is_what_readers_get_next(tmp_path: Path) -> None:
    control, clock = CountingControl(), Clock()
    vm = this_process(tmp_path, control)
    await latest_usage(vm, 1.0, clock)
    fresh = await fresh_usage(vm, 1.0, clock)  # a collector's sample, inside max_age
    assert fresh.disk_read_bytes == 2
    assert await latest_usage(vm, 1.0, clock) == fresh


async def test_no_process_no_sample(tmp_path: Path) -> None:
    assert (await latest_usage(None)).memory_bytes == 0
    vm = this_process(tmp_path, CountingControl())
    vm.watch = None  # not running
    assert (await latest_usage(vm)).cpu_time_ns == 0
