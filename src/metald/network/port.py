"""The service's Network port on top of NetworkManager, and the stand-in when networking is
switched off."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from metald.core.errors import NotFound, Unimplemented
from metald.core.models import NicSpec
from metald.core.models import RateLimit as CoreRateLimit
from metald.network.manager import NetworkManager
from metald.network.models import NetworkRequest, RateLimit, VmNetwork


class NetlinkNetwork:
    def __init__(self, manager: NetworkManager) -> None:
        self._manager = manager
        # Described networks, so GetVmInfo does not ask netlink and the address book each time.
        self._known: dict[str, VmNetwork] = {}

    async def start(self) -> None:
        await self._manager.start()

    async def stop(self) -> None:
        await self._manager.stop()

    def check(self, interfaces: Sequence[Mapping[str, Any]]) -> None:
        NetworkRequest.from_config(interfaces, self._manager.settings)

    async def setup(
        self, vm_id: str, customer_id: str, interfaces: Sequence[Mapping[str, Any]]
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
            rx_rate_limit=_core_limit(net.rx),
            tx_rate_limit=_core_limit(net.tx),
        )

    async def attach(self, vm_id: str) -> None:
        await self._manager.attach_tap(vm_id)

    async def teardown(self, vm_id: str) -> None:
        self._known.pop(vm_id, None)
        await self._manager.teardown_vm(vm_id)

    async def describe(
        self, vm_id: str, customer_id: str, interfaces: Sequence[Mapping[str, Any]]
    ) -> dict[str, Any]:
        net = self._known.get(vm_id)
        if net is None:
            request = NetworkRequest.from_config(interfaces, self._manager.settings)
            if request is None:
                return {}
            net = await self._manager.describe_vm(vm_id, customer_id, request)
            if net is None:
                return {}
            self._known[vm_id] = net
        info = net.network_info()
        try:
            info["stats"] = await self._manager.stats(vm_id)
        except NotFound:
            info["stats"] = {}
        return info

    async def remove_orphans(self, known_vm_ids: set[str]) -> list[str]:
        return await self._manager.remove_orphans(known_vm_ids)


class NoNetwork:
    """UNKEY_METALD_NETWORK_ENABLED=false: VMs without interfaces only."""

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    def check(self, interfaces: Sequence[Mapping[str, Any]]) -> None:
        if interfaces:
            raise Unimplemented(
                "config.network: networking is switched off on this host "
                "(UNKEY_METALD_NETWORK_ENABLED=false); create the VM without interfaces"
            )

    async def setup(
        self, vm_id: str, customer_id: str, interfaces: Sequence[Mapping[str, Any]]
    ) -> NicSpec | None:
        self.check(interfaces)
        return None

    async def attach(self, vm_id: str) -> None:
        return None

    async def teardown(self, vm_id: str) -> None:
        return None

    async def describe(
        self, vm_id: str, customer_id: str, interfaces: Sequence[Mapping[str, Any]]
    ) -> dict[str, Any]:
        return {}

    async def remove_orphans(self, known_vm_ids: set[str]) -> list[str]:
        return []


def _core_limit(limit: RateLimit | None) -> CoreRateLimit | None:
    """The VM's limit for a VMM that applies its own (Firecracker's token buckets)."""
    return None if limit is None else CoreRateLimit(bandwidth=limit.bandwidth, burst=limit.burst)
