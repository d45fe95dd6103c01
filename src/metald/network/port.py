"""The service's Network port on top of NetworkManager, and the stand-in when networking is
switched off."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from metald.core.errors import NotFound, Unimplemented
from metald.core.models import NetworkInfo, NetworkInterface, NicSpec
from metald.network.manager import NetworkManager
from metald.network.models import NetworkRequest, VmNetwork


class NetlinkNetwork:
    def __init__(self, manager: NetworkManager) -> None:
        self._manager = manager
        # Described networks, so GetVmInfo does not ask netlink and the address book each time.
        self._known: dict[str, VmNetwork] = {}

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

    async def teardown(self, vm_id: str) -> None:
        self._known.pop(vm_id, None)
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
        try:
            counters = await self._manager.stats(vm_id)
        except NotFound:
            counters = None
        return replace(net.network_info(), counters=counters)

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
