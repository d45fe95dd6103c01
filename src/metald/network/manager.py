"""The network manager: the one object the rest of metald holds for networking (see the
package docstring for the design). It checks the settings and wires the parts, each in a
module of its own:

- hostside.py   the host bridge, its gateway addresses and the routing rules
- segments.py   one segment per customer, joined to the host bridge by an isolated uplink
- vms.py        each VM's namespace, links, port filters, entries, limits and addresses
- filters.py    the guest port filters and the host-services filter (nftables, nft.py)
- reconcile.py  removing what no known VM owns, and leak-check snapshots

The public API is async; every netlink request runs in a worker thread (blocking.py) and
a cancelled caller still waits for that thread, so an undo never races the work it undoes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from metald.core.models import RateLimit, TrafficCounters
from metald.core.ports import AddressBook
from metald.core.validation import VM_ID
from metald.host import named_netns as netns
from metald.network.blocking import blocking
from metald.network.context import NetContext, NetworkError, StepHook
from metald.network.hostside import HostSide
from metald.network.models import NetworkRequest, NetworkSettings, VmNetwork
from metald.network.naming import VmNames, check_netns_prefix, vm_id_from_netns
from metald.network.reconcile import Reconciler
from metald.network.segments import Segments
from metald.network.vms import SETUP_STEPS, VmNetworks

__all__ = ["SETUP_STEPS", "NetworkError", "NetworkManager", "StepHook"]


class NetworkManager:
    """Per-VM namespaces, veth pairs, TAPs, addresses and limits (Network port adapter).

    ``host_netns`` names the namespace holding the host bridge (None: metald's own, the
    production case; tests always pass a namespace they made).
    """

    def __init__(
        self,
        host_netns: str | None,
        book: AddressBook,
        settings: NetworkSettings | None = None,
        *,
        segments_netns: str = "metald-segments",
        step_hook: StepHook | None = None,
    ) -> None:
        self.settings = settings or NetworkSettings()
        try:
            self.settings.check()
            check_netns_prefix(self.settings.netns_prefix)
        except ValueError as exc:
            raise ValueError(f"network settings: {exc}") from None
        for what, name in (("segments", segments_netns), ("host", host_netns)):
            if name is None:
                continue
            netns.path_of(name)
            clash = vm_id_from_netns(name, self.settings.netns_prefix)
            if clash is not None and VM_ID.fullmatch(clash):
                raise ValueError(
                    f"{what} namespace {name!r} could be taken for a VM's "
                    f"(prefix {self.settings.netns_prefix!r})"
                )
        if segments_netns == host_netns:
            raise ValueError("the segments namespace must not be the host namespace")
        self.host_netns = host_netns
        self.segments_netns = segments_netns
        ctx = NetContext(self.settings, host_netns, segments_netns, step_hook)
        self.host_side = HostSide(ctx)
        segments = Segments(ctx)
        self._vms = VmNetworks(ctx, book, segments)
        self._reconciler = Reconciler(ctx, book, segments, self._vms)

    # Host side -----------------------------------------------------------------------

    async def start(self) -> None:
        """Create (idempotently) the host bridge with the gateway addresses, the routing
        rules and the segments namespace."""
        await blocking(self.host_side.start_sync)

    async def stop(self) -> None:
        """Nothing to release: sockets live per operation, and VMs keep their network
        across a metald restart."""

    async def remove_host_network(self) -> None:
        """Remove the host bridge, the rules and the segments namespace (tests, uninstall).
        VMs must have been torn down first."""
        await blocking(self.host_side.remove_sync)

    # Per VM --------------------------------------------------------------------------

    def names(self, vm_id: str) -> VmNames:
        return self._vms.names(vm_id)

    async def setup_vm(
        self,
        vm_id: str,
        customer_id: str,
        request: NetworkRequest | None = None,
        on_reserved: Callable[[VmNetwork], None] | None = None,
    ) -> VmNetwork:
        """Build the VM's network; leaves nothing behind if it fails. Calling it again for
        a VM whose network exists completes and returns it (the same addresses).
        `on_reserved(network)` is called from the build's worker thread once the addresses
        and the namespace exist (what a VMM needs to start), before the rest is built."""
        return await self._vms.setup(vm_id, customer_id, request or NetworkRequest(), on_reserved)

    async def adopt_vm(
        self, vm_id: str, customer_id: str, request: NetworkRequest, vmm_pid: int | None
    ) -> VmNetwork:
        """After a restart, the network of a VM set up earlier, whole again: its namespace
        taken back from its VMM (vmm_pid) if the name was lost, or made anew without one;
        whatever is missing rebuilt, with the same addresses and MAC."""
        return await self._vms.adopt(vm_id, customer_id, request, vmm_pid)

    async def teardown_vm(self, vm_id: str) -> None:
        """Remove the VM's namespace, links, neighbour and FDB entries and addresses.
        Idempotent. Call it after the VMM has exited: a process still inside keeps the
        (now unnamed and disconnected) namespace alive until it exits."""
        await self._vms.teardown(vm_id)

    async def describe_vm(
        self, vm_id: str, customer_id: str, request: NetworkRequest | None = None
    ) -> VmNetwork | None:
        """The network of a VM set up earlier (for a restarted metald), or None if it is
        not there. Addresses come from the book, the MAC from the host end's alias, the
        limits from the request (they are not read back from tc)."""
        return await self._vms.describe(vm_id, customer_id, request or NetworkRequest())

    async def stats(self, vm_id: str) -> TrafficCounters:
        """Traffic counters from the guest's point of view, read from the host end of its
        veth (NotFound without a network)."""
        return await self._vms.stats(vm_id)

    async def apply_rate_limit(
        self, vm_id: str, rx: RateLimit | None, tx: RateLimit | None
    ) -> None:
        """Set (or, with None, remove) the limits toward (rx) and from (tx) the guest."""
        await self._vms.apply_rate_limit(vm_id, rx, tx)

    async def create_tap(self, vm_id: str, owner_uid: int, owner_gid: int) -> str:
        """Create the VM's TAP in its namespace, owned by uid/gid, joined to the VM's bridge;
        its name. (With the jailer, the jailer makes the TAP itself: see links.attach_tap_here.)"""
        return await self._vms.create_tap(vm_id, owner_uid, owner_gid)

    async def attach_tap(self, vm_id: str) -> None:
        """Join the TAP that the VMM's jailer made in the VM's namespace to the VM's bridge."""
        await self._vms.attach_tap(vm_id)

    # Reconciliation and inspection ---------------------------------------------------

    async def remove_orphans(self, known_vm_ids: Iterable[str]) -> list[str]:
        """Remove namespaces, links, neighbour/FDB entries, customer segments and address
        allocations that no known VM owns; what went, as readable strings. Call it at
        start-up, before VMs are created."""
        return await self._reconciler.remove_orphans(known_vm_ids)

    async def snapshot(self) -> dict[str, list[str]]:
        """Names of our namespaces and of every link in the host and segments namespaces,
        and the host bridge's neighbour and static FDB entries: for leak checks."""
        return await blocking(self._reconciler.snapshot_sync)
