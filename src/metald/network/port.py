"""The service's Network port on top of NetworkManager, and the stand-in when networking is
switched off.

GetVmInfo describes a VM's network on every call. What was set up is kept (`_known`), and
the traffic counters, a netlink request in a worker thread (which took most of the CPU of
a GetVmInfo), are read at most once per `counters_max_age` seconds per VM
(core.readings): a poller gets counters at most that old."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import replace

from metald.core.errors import NotFound, Unimplemented
from metald.core.models import NetworkInfo, NetworkInterface, NicSpec, TrafficCounters
from metald.core.readings import Reading
from metald.network.manager import NetworkManager
from metald.network.models import NetworkRequest, VmNetwork

COUNTERS_MAX_AGE_SECONDS = 1.0


class NetlinkNetwork:
    def __init__(
        self,
        manager: NetworkManager,
        *,
        counters_max_age: float = COUNTERS_MAX_AGE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._manager = manager
        # Described networks, so GetVmInfo does not ask netlink and the address book each time.
        self._known: dict[str, VmNetwork] = {}
        # Each VM's traffic counters, read at a bounded rate (dropped with its network).
        self._counters: dict[str, Reading[TrafficCounters | None]] = {}
        self._counters_max_age = counters_max_age
        self._clock = clock

    async def start(self) -> None:
        await self._manager.start()

    async def stop(self) -> None:
        await self._manager.stop()

    def check(self, interfaces: Sequence[NetworkInterface]) -> None:
        NetworkRequest.from_config(interfaces, self._manager.settings)

    async def setup(
        self, vm_id: str, customer_id: str, interfaces: Sequence[NetworkInterface]
    ) -> NicSpec | None:
        request = NetworkRequest.from_config(interfaces, self._manager.settings)
        if request is None:
            return None
        net = await self._manager.setup_vm(vm_id, customer_id, request)
        self._known[vm_id] = net
        self._counters.pop(vm_id, None)
        return NicSpec(
            netns=net.netns,
            tap=net.tap,
            mac=net.mac,
            guest_args=net.guest_args().render(),
            rx_rate_limit=net.rx,
            tx_rate_limit=net.tx,
        )

    async def attach(self, vm_id: str) -> None:
        await self._manager.attach_tap(vm_id)

    async def adopt(
        self,
        vm_id: str,
        customer_id: str,
        interfaces: Sequence[NetworkInterface],
        vmm_pid: int | None,
    ) -> None:
        request = NetworkRequest.from_config(interfaces, self._manager.settings)
        if request is None:
            return
        net = await self._manager.adopt_vm(vm_id, customer_id, request, vmm_pid)
        self._known[vm_id] = net
        self._counters.pop(vm_id, None)

    async def teardown(self, vm_id: str) -> None:
        self._known.pop(vm_id, None)
        self._counters.pop(vm_id, None)
        await self._manager.teardown_vm(vm_id)

    async def describe(
        self, vm_id: str, customer_id: str, interfaces: Sequence[NetworkInterface]
    ) -> NetworkInfo | None:
        net = self._known.get(vm_id)
        if net is None:
            request = NetworkRequest.from_config(interfaces, self._manager.settings)
            if request is None:
                return None
            net = await self._manager.describe_vm(vm_id, customer_id, request)
            if net is None:
                return None
            self._known[vm_id] = net
        reading = self._counters.get(vm_id)
        if reading is None:
            reading = Reading(
                lambda: self._read_counters(vm_id), self._counters_max_age, self._clock
            )
            self._counters[vm_id] = reading
        return replace(net.network_info(), counters=await reading.get())

    async def _read_counters(self, vm_id: str) -> TrafficCounters | None:
        try:
            return await self._manager.stats(vm_id)
        except NotFound:
            return None  # its host end is gone (a restart rebuilds it)

    async def remove_orphans(self, known_vm_ids: set[str]) -> list[str]:
        return await self._manager.remove_orphans(known_vm_ids)


class NoNetwork:
    """UNKEY_METALD_NETWORK_ENABLED=false: VMs without interfaces only."""

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    def check(self, interfaces: Sequence[NetworkInterface]) -> None:
        if interfaces:
            raise Unimplemented(
                "config.network: networking is switched off on this host "
                "(UNKEY_METALD_NETWORK_ENABLED=false); create the VM without interfaces"
            )

    async def setup(
        self, vm_id: str, customer_id: str, interfaces: Sequence[NetworkInterface]
    ) -> NicSpec | None:
        self.check(interfaces)
        return None

    async def attach(self, vm_id: str) -> None:
        return None

    async def adopt(
        self,
        vm_id: str,
        customer_id: str,
        interfaces: Sequence[NetworkInterface],
        vmm_pid: int | None,
    ) -> None:
        return None

    async def teardown(self, vm_id: str) -> None:
        return None

    async def describe(
        self, vm_id: str, customer_id: str, interfaces: Sequence[NetworkInterface]
    ) -> NetworkInfo | None:
        return None

    async def remove_orphans(self, known_vm_ids: set[str]) -> list[str]:
        return []
