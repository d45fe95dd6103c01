"""The service's Network port on top of NetworkManager, and the stand-in when networking is
switched off.

A VM's network is built while its VMM starts: `setup` returns as soon as the addresses and
the namespace exist (what the jailer needs), and the rest of the build (veth, bridge,
filters, the customer's segment, limits: most of a create's network time) goes on in a
task that `ready`, `attach` and `teardown` wait for. The guest's vCPUs are stopped until
BootVm and its TAP joins the bridge only after the build (attach waits), so nothing the
guest could send passes before its filters are in place.

GetVmInfo describes a VM's network on every call. What was set up is kept (`_known`), and
the traffic counters, a netlink request in a worker thread (which took most of the CPU of
a GetVmInfo), are read at most once per `counters_max_age` seconds per VM
(core.readings): a poller gets counters at most that old."""

from __future__ import annotations

import asyncio
import contextlib
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
        # Builds under way (setup returned, the rest still being made), by VM.
        self._building: dict[str, asyncio.Task[VmNetwork]] = {}

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
        await self._settled(vm_id)
        loop = asyncio.get_running_loop()
        reserved: asyncio.Future[VmNetwork] = loop.create_future()

        def on_reserved(net: VmNetwork) -> None:  # in the build's worker thread
            loop.call_soon_threadsafe(_set_once, reserved, net)

        build = asyncio.ensure_future(
            self._manager.setup_vm(vm_id, customer_id, request, on_reserved)
        )
        self._building[vm_id] = build
        build.add_done_callback(lambda _: self._built(vm_id, build))
        try:
            await asyncio.wait({reserved, build}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            # Cancelled: the build goes on (a thread cannot be stopped) and the caller's
            # teardown waits for it.
            reserved.cancel()
            raise
        if not reserved.done():
            reserved.cancel()
            await self._settled(vm_id)
            net = build.result()  # failed before its namespace existed: raises
        else:
            net = reserved.result()
        self._counters.pop(vm_id, None)
        return NicSpec(
            netns=net.netns,
            tap=net.tap,
            mac=net.mac,
            guest_args=net.guest_args().render(),
            rx_rate_limit=net.rx,
            tx_rate_limit=net.tx,
        )

    def _built(self, vm_id: str, build: asyncio.Task[VmNetwork]) -> None:
        if build.cancelled() or build.exception() is not None:
            return  # (its error is retrieved here; ready() raises it again)
        self._known[vm_id] = build.result()

    async def ready(self, vm_id: str) -> None:
        build = self._building.get(vm_id)
        if build is None:
            return
        try:
            net = await asyncio.shield(build)
        finally:
            if build.done() and self._building.get(vm_id) is build:
                del self._building[vm_id]
        self._known[vm_id] = net

    async def _settled(self, vm_id: str) -> None:
        """Wait for a build under way to end, whatever its outcome."""
        build = self._building.pop(vm_id, None)
        if build is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(build)

    async def attach(self, vm_id: str) -> None:
        await self.ready(vm_id)
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
        await self._settled(vm_id)
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

    async def ready(self, vm_id: str) -> None:
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


def _set_once(future: asyncio.Future[VmNetwork], net: VmNetwork) -> None:
    if not future.done():
        future.set_result(net)
