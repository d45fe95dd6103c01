"""network/port.py: GetVmInfo's traffic counters are read from netlink at most once per
counters_max_age per VM, and a VM's network made anew (setup, adopt) or torn down starts
from a new reading. The manager is a stand-in counting its netlink reads; time is a fake
clock."""

from __future__ import annotations

import ipaddress
from typing import Any

from metald.core.errors import NotFound
from metald.core.models import NetworkInterface, NetworkMode, TrafficCounters
from metald.network.models import NetworkSettings, VmNetwork
from metald.network.port import NetlinkNetwork

NIC = (NetworkInterface(id="eth0", mode=NetworkMode.IPV4_ONLY),)


class Manager:
    def __init__(self) -> None:
        self.settings = NetworkSettings()
        self.reads = 0
        self.present = True

    def net(self, vm_id: str) -> VmNetwork:
        return VmNetwork(
            vm_id=vm_id, customer_id="acme", netns=f"ns-{vm_id}", tap="tap0",
            mac="02:00:00:00:00:01", mode=NetworkMode.IPV4_ONLY,
            ipv4=ipaddress.IPv4Interface("10.100.0.5/16"), ipv6=None,
            gateway4=ipaddress.IPv4Address("10.100.0.1"), gateway6=None,
        )  # fmt: skip

    async def setup_vm(
        self, vm_id: str, customer_id: str, request: Any, on_reserved: Any = None
    ) -> VmNetwork:
        net = self.net(vm_id)
        if on_reserved is not None:
            on_reserved(net)
        return net

    async def teardown_vm(self, vm_id: str) -> None:
        return None

    async def stats(self, vm_id: str) -> TrafficCounters:
        self.reads += 1
        if not self.present:
            raise NotFound("gone")
        return TrafficCounters(packets_received=self.reads)


class Clock:
    now = 50.0

    def __call__(self) -> float:
        return self.now


async def test_counters_are_read_at_most_once_per_max_age() -> None:
    manager, clock = Manager(), Clock()
    port = NetlinkNetwork(manager, counters_max_age=1.0, clock=clock)  # type: ignore[arg-type]
    await port.setup("vm-1", "acme", NIC)
    for _ in range(50):
        info = await port.describe("vm-1", "acme", NIC)
        assert info is not None and info.counters == TrafficCounters(packets_received=1)
    assert manager.reads == 1
    clock.now += 1.5
    info = await port.describe("vm-1", "acme", NIC)
    assert info is not None and info.counters == TrafficCounters(packets_received=2)


async def test_a_network_made_again_or_torn_down_starts_a_new_reading() -> None:
    manager, clock = Manager(), Clock()
    port = NetlinkNetwork(manager, counters_max_age=1.0, clock=clock)  # type: ignore[arg-type]
    await port.setup("vm-1", "acme", NIC)
    await port.describe("vm-1", "acme", NIC)
    await port.teardown("vm-1")
    await port.setup("vm-1", "acme", NIC)  # new links: new counters, not the old reading
    info = await port.describe("vm-1", "acme", NIC)
    assert info is not None and info.counters == TrafficCounters(packets_received=2)
    manager.present = False
    clock.now += 2
    info = await port.describe("vm-1", "acme", NIC)
    assert info is not None and info.counters is None  # could not be read: none shown
