"""Fake Network: per-VM networks in a dict, every call recorded, any call can fail.

A VM asking for interfaces gets a NicSpec and an address from 10.100.0.2 up; `attached`
holds the VMs whose TAP the backend's tap callback joined. Like the real one, setup leaves
nothing when it fails and teardown is idempotent.
"""

from __future__ import annotations

import ipaddress
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from metald.core.errors import AlreadyExists, InvalidArgument, NotFound
from metald.core.models import NetworkInfo, NetworkInterface, NicSpec, TrafficCounters

from .faults import Faults

_SUBNET = ipaddress.IPv4Network("10.100.0.0/16")


@dataclass(frozen=True)
class FakeVmNetwork:
    customer_id: str
    nic: NicSpec
    address: str


class FakeNetwork:
    def __init__(self) -> None:
        self.networks: dict[str, FakeVmNetwork] = {}
        self.attached: set[str] = set()
        self.orphans: set[str] = set()
        self.calls: list[tuple[str, str]] = []
        self.faults = Faults()
        # check() refuses any interfaces with this error when set (a host without networking).
        self.refusal: Exception | None = None
        self.started = False
        self._hosts = itertools.count(2)

    async def start(self) -> None:
        self.calls.append(("start", ""))
        await self.faults.enter("start")
        self.started = True

    async def stop(self) -> None:
        self.calls.append(("stop", ""))
        self.started = False

    def check(self, interfaces: Sequence[NetworkInterface]) -> None:
        self.calls.append(("check", ""))
        self.faults.check("check")
        if interfaces and self.refusal is not None:
            raise self.refusal
        if len(interfaces) > 1:
            raise InvalidArgument("config.network", "at most one interface")

    async def setup(
        self, vm_id: str, customer_id: str, interfaces: Sequence[NetworkInterface]
    ) -> NicSpec | None:
        self.calls.append(("setup", vm_id))
        await self.faults.enter("setup")
        if not interfaces:
            return None
        if vm_id in self.networks:
            raise AlreadyExists(f"VM {vm_id} already has a network")
        address = str(_SUBNET[next(self._hosts)])
        nic = NicSpec(
            netns=f"fake-{vm_id}",
            tap=f"tap-{vm_id[-8:]}",
            mac="02:00:00:00:00:01",
            guest_args=f"metald.ip4={address}/16",
            rx_rate_limit=interfaces[0].rx_rate_limit,
            tx_rate_limit=interfaces[0].tx_rate_limit,
        )
        self.networks[vm_id] = FakeVmNetwork(customer_id, nic, address)
        return nic

    async def ready(self, vm_id: str) -> None:
        self.calls.append(("ready", vm_id))
        await self.faults.enter("ready")

    async def attach(self, vm_id: str) -> None:
        self.calls.append(("attach", vm_id))
        await self.faults.enter("attach")
        if vm_id not in self.networks:
            raise NotFound(f"VM {vm_id} has no network")
        self.attached.add(vm_id)

    async def adopt(
        self,
        vm_id: str,
        customer_id: str,
        interfaces: Sequence[NetworkInterface],
        vmm_pid: int | None,
    ) -> None:
        self.calls.append(("adopt", vm_id))
        await self.faults.enter("adopt")

    async def teardown(self, vm_id: str) -> None:
        self.calls.append(("teardown", vm_id))
        await self.faults.enter("teardown")
        self.networks.pop(vm_id, None)
        self.attached.discard(vm_id)

    async def describe(
        self, vm_id: str, customer_id: str, interfaces: Sequence[NetworkInterface]
    ) -> NetworkInfo | None:
        self.calls.append(("describe", vm_id))
        await self.faults.enter("describe")
        net = self.networks.get(vm_id)
        if net is None:
            return None
        return NetworkInfo(
            mac=net.nic.mac,
            tap=net.nic.tap,
            netns=net.nic.netns,
            ipv4=ipaddress.IPv4Address(net.address),
            gateway4=ipaddress.IPv4Address("10.100.0.1"),
            dns_servers=("10.100.0.1",),
            counters=TrafficCounters(bytes_received=10, bytes_transmitted=20),
        )

    async def remove_orphans(self, known_vm_ids: set[str]) -> list[str]:
        self.calls.append(("remove_orphans", ""))
        await self.faults.enter("remove_orphans")
        leftovers = (set(self.networks) | self.orphans) - known_vm_ids
        for vm_id in leftovers:
            self.networks.pop(vm_id, None)
            self.attached.discard(vm_id)
            self.orphans.discard(vm_id)
        return sorted(f"network of {vm_id}" for vm_id in leftovers)
