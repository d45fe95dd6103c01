"""Each VM's own network: its namespace, the veth pair to its customer's segment, the VM
bridge its TAP joins, the filters on the guest's port (filters.py), the host bridge's FDB
and neighbour entries for its MAC and addresses, the rate limits, and the addresses in the
address book.

Set-up is a sequence of small steps, each registering its undo (core.undo.Undo): a failure
(or a cancellation) at any step undoes what the call made and releases the addresses it
took; calling it again for a VM whose network exists completes it and returns the same
network. Teardown is idempotent.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Callable
from typing import Any

from metald.core.errors import (
    AlreadyExists,
    InvalidArgument,
    MetaldError,
    NotFound,
    ResourceExhausted,
)
from metald.core.models import RateLimit, TrafficCounters
from metald.core.ports import AddressBook
from metald.core.undo import Undo
from metald.core.validation import check_customer_id, check_vm_id
from metald.host import named_netns as netns
from metald.host.netns import ensure_home
from metald.network import filters, links
from metald.network.addressing import allocate
from metald.network.blocking import blocking, uncancellable
from metald.network.context import NetContext, NetworkError, log
from metald.network.links import rtnl
from metald.network.models import NetworkMode, NetworkRequest, VmNetwork, tbf_burst
from metald.network.naming import (
    CUSTOMER_BRIDGE,
    CustomerNames,
    VmNames,
    generated_mac,
    parse_vm_alias,
    vm_alias,
)
from metald.network.segments import Segments

SETUP_STEPS = (
    "validate",
    "allocate",
    "netns",
    "veth",
    "vm-links",
    "filters",
    "segment",
    "fdb",
    "neighbours",
    "rate-limit",
)


class VmNetworks:
    def __init__(self, ctx: NetContext, book: AddressBook, segments: Segments) -> None:
        self._ctx = ctx
        self._book = book
        self._segments = segments

    def names(self, vm_id: str) -> VmNames:
        return VmNames.for_vm(vm_id, self._ctx.settings.netns_prefix)

    # Set-up ------------------------------------------------------------------------------

    async def setup(
        self,
        vm_id: str,
        customer_id: str,
        request: NetworkRequest,
        on_reserved: Callable[[VmNetwork], None] | None = None,
    ) -> VmNetwork:
        """Build the VM's network. `on_reserved`, if given, is called (in the build's worker
        thread) once its addresses are allocated and its namespace exists, which is all a
        VMM needs to start: the caller may start one while the rest is built."""
        ctx = self._ctx
        ctx.step("validate")
        check_vm_id(vm_id)
        check_customer_id(customer_id)
        s = ctx.settings
        mode = request.mode or s.effective_default_mode()
        if mode not in s.allowed_modes():
            raise InvalidArgument(
                "config.network[0].mode", f"{mode.value} is not enabled on this host"
            )
        names = self.names(vm_id)
        customer = CustomerNames.for_customer(customer_id)
        mac = request.mac or generated_mac(vm_id)

        held_before = {a.address for a in await self._book.for_vm(vm_id)}
        built: list[Undo] = []
        try:
            ctx.step("allocate")
            ip4 = ip6 = None
            if mode.ipv4:
                ip4 = await allocate(
                    self._book,
                    vm_id,
                    s.subnet4,
                    s.gateway4.ip,
                    request.ipv4,
                    "config.network[0].ipv4_config.address",
                )
            if mode.ipv6:
                ip6 = await allocate(
                    self._book,
                    vm_id,
                    s.subnet6,
                    s.gateway6.ip,
                    request.ipv6,
                    "config.network[0].ipv6_config.address",
                )
            network = self.network_of(
                names,
                customer_id,
                request,
                mac,
                mode,
                ipaddress.IPv4Interface(f"{ip4}/{s.subnet4.prefixlen}") if ip4 else None,
                ipaddress.IPv6Interface(f"{ip6}/{s.subnet6.prefixlen}") if ip6 else None,
            )
            await blocking(self._build_sync, network, names, customer, built, on_reserved)
        except BaseException:
            # The build undoes itself when it fails; if it succeeded but the caller was
            # cancelled meanwhile, what it made is undone here.
            if built:
                await uncancellable(asyncio.to_thread(built[0].run))
            await uncancellable(self._release_new(vm_id, held_before))
            raise
        return network

    async def _release_new(self, vm_id: str, held_before: set[str]) -> None:
        for allocation in await self._book.for_vm(vm_id):
            if allocation.address not in held_before:
                await self._book.release_address(vm_id, allocation.address)

    def _build_sync(
        self,
        net: VmNetwork,
        names: VmNames,
        customer: CustomerNames,
        built: list[Undo],
        on_reserved: Callable[[VmNetwork], None] | None,
    ) -> None:
        ensure_home()
        undo = Undo(log, f"network of {net.vm_id}: a failed set-up")
        built.append(undo)
        try:
            self._build_steps(net, names, customer, undo, on_reserved)
        except MetaldError:
            undo.run()
            raise
        except BaseException as exc:
            undo.run()
            raise NetworkError(f"network set-up of {net.vm_id} failed: {exc}") from exc

    def _build_steps(
        self,
        net: VmNetwork,
        names: VmNames,
        customer: CustomerNames,
        undo: Undo,
        on_reserved: Callable[[VmNetwork], None] | None,
    ) -> None:
        ctx = self._ctx
        ctx.step("netns")
        if netns.create(names.netns):
            undo.add(f"netns {names.netns}", netns.remove, names.netns)
        if on_reserved is not None:
            on_reserved(net)
        with (
            rtnl(ctx.host_netns) as host,
            rtnl(ctx.segments_netns) as seg,
            rtnl(names.netns) as vmr,
        ):
            ctx.step("veth")
            vh = links.get_link(seg, names.host_veth)
            fresh = vh is None  # a new pair: no qdisc of ours on it yet
            if vh is None:
                if links.get_link(vmr, names.vm_veth) is not None:
                    # Its host end went with a lost segments namespace (the kernel removes
                    # the pair only once that namespace is cleaned up): make it anew.
                    links.delete_link(vmr, names.vm_veth)
                vh_index = links.add_veth(seg, names.host_veth, names.vm_veth, names.netns)
                undo.add(f"veth {names.host_veth}", self._segments.delete_link, names.host_veth)
                links.set_alias(seg, vh_index, vm_alias(net.vm_id, net.mac))
                links.no_ipv6_addresses(seg, vh_index)
            else:
                owner = parse_vm_alias(vh.alias)
                if owner is None or owner[0] != net.vm_id:
                    raise AlreadyExists(
                        f"network: interface {names.host_veth} belongs to another VM"
                    )
                if owner[1] != net.mac:
                    raise AlreadyExists(
                        f"network: VM {net.vm_id} already has a network with MAC {owner[1]}"
                    )
                vh_index = vh.index

            ctx.step("vm-links")
            links.set_up(vmr, int(vmr.link_lookup(ifname="lo")[0]))
            vb = links.get_link(vmr, names.vm_bridge)
            if vb is None:
                vb_index = links.add_bridge(vmr, names.vm_bridge)
                links.no_ipv6_addresses(vmr, vb_index)
            else:
                vb_index = vb.index
            vg = links.get_link(vmr, names.vm_veth)
            if vg is None:
                raise NetworkError(f"network: {names.vm_veth} is missing in {names.netns}")
            if vg.master != vb_index:
                links.no_ipv6_addresses(vmr, vg.index)
                links.set_master(vmr, vg.index, vb_index)
            links.set_up(vmr, vg.index)
            links.set_up(vmr, vb_index)

            # Before the VM end joins its customer's segment (and long before the TAP is
            # attached): what the guest may send.
            ctx.step("filters")
            if filters.ensure_guest(names.netns, self.guest_rules(net)):
                undo.add(f"filters of {names.netns}", self._undo_filters, names)

            ctx.step("segment")
            with ctx.lock:
                bridge_index = self._segments.host_bridge_index(host)
                bc_index, ub_index = self._segments.ensure(
                    host, seg, bridge_index, customer, names.host_veth, undo
                )
                links.set_master(seg, vh_index, bc_index)
                links.set_up(seg, vh_index)

                ctx.step("fdb")
                addresses = [str(i.ip) for i in (net.ipv4, net.ipv6) if i is not None]
                self._check_mac_free(host, bridge_index, ub_index, net.mac, addresses)
                present = {(e.mac, e.port) for e in links.static_fdb(host, bridge_index)}
                if (net.mac, ub_index) not in present:
                    links.add_static_fdb(host, ub_index, net.mac)
                    undo.add(f"fdb {net.mac}", self._undo_fdb, ub_index, net.mac)

                ctx.step("neighbours")
                for address in addresses:
                    links.set_permanent_neighbour(host, bridge_index, address, net.mac)
                    undo.add(f"neighbour {address}", self._undo_neighbour, bridge_index, address)

            ctx.step("rate-limit")
            self._apply_limits(
                seg, vmr, names, net.rx, net.tx, fresh=fresh, vh=vh_index, vg=vg.index
            )

    # Undo steps open their own sockets: they run after the set-up's sockets are closed.

    def _undo_filters(self, names: VmNames) -> None:
        # Fail closed: while a TAP is there a guest may be sending, and filters it keeps.
        # (A namespace this set-up made goes whole with its own undo.)
        if not netns.exists(names.netns):
            return
        with rtnl(names.netns) as vmr:
            if links.get_link(vmr, names.tap) is not None:
                return
        filters.remove_guest(names.netns)

    def _undo_fdb(self, port: int, mac: str) -> None:
        with rtnl(self._ctx.host_netns) as host, self._ctx.lock:
            links.delete_static_fdb(host, port, mac)

    def _undo_neighbour(self, bridge_index: int, address: str) -> None:
        with rtnl(self._ctx.host_netns) as host, self._ctx.lock:
            links.delete_neighbour(host, bridge_index, address)

    def _check_mac_free(
        self, host: Any, bridge_index: int, uplink: int, mac: str, ours: list[str]
    ) -> None:
        taken = any(
            n.mac == mac and n.address not in ours
            for n in links.permanent_neighbours(host, bridge_index)
        ) or any(e.mac == mac and e.port != uplink for e in links.static_fdb(host, bridge_index))
        if taken:
            raise ResourceExhausted(f"config.network[0].mac_address: {mac} is in use by another VM")

    # Limits and the TAP ------------------------------------------------------------------

    def _apply_limits(
        self,
        seg: Any,
        vmr: Any,
        names: VmNames,
        rx: RateLimit | None,
        tx: RateLimit | None,
        *,
        fresh: bool = False,
        vh: int | None = None,
        vg: int | None = None,
    ) -> None:
        # Toward the guest: what the host end sends into the VM's veth. From the guest: what
        # the VM's veth end sends out of the VM namespace. Both are shaped (tbf) rather than
        # policed, so TCP backs off instead of losing packets. `fresh`: the pair was made
        # just now, so there is no limit to clear (a refused delete costs a netlink round
        # trip and an exception: ~20 ms of a create, measured with py-spy).
        if vh is None:
            vh = int(seg.link_lookup(ifname=names.host_veth)[0])
        if vg is None:
            vg = int(vmr.link_lookup(ifname=names.vm_veth)[0])
        for ipr, index, limit in ((seg, vh, rx), (vmr, vg, tx)):
            if limit is None:
                if not fresh:
                    links.clear_root_qdisc(ipr, index)
            else:
                links.set_tbf(ipr, index, limit.bandwidth, tbf_burst(limit))

    async def apply_rate_limit(
        self, vm_id: str, rx: RateLimit | None, tx: RateLimit | None
    ) -> None:
        await blocking(self._apply_limits_sync, self.names(vm_id), rx, tx)

    def _apply_limits_sync(
        self, names: VmNames, rx: RateLimit | None, tx: RateLimit | None
    ) -> None:
        ensure_home()
        if not netns.exists(names.netns):
            raise NotFound(f"network of VM {names.vm_id} not found")
        with rtnl(self._ctx.segments_netns) as seg, rtnl(names.netns) as vmr:
            self._apply_limits(seg, vmr, names, rx, tx)

    async def create_tap(self, vm_id: str, owner_uid: int, owner_gid: int) -> str:
        names = self.names(vm_id)
        await blocking(self._create_tap_sync, names, owner_uid, owner_gid)
        return names.tap

    def _create_tap_sync(self, names: VmNames, uid: int, gid: int) -> None:
        ensure_home()
        if not netns.exists(names.netns):
            raise NotFound(f"network of VM {names.vm_id} not found")
        with netns.entered(names.netns):
            links.create_tap_here(names.tap, uid, gid)
            links.attach_tap_here(names.tap, names.vm_bridge)

    async def attach_tap(self, vm_id: str) -> None:
        await blocking(self._attach_tap_sync, self.names(vm_id))

    def _attach_tap_sync(self, names: VmNames) -> None:
        if not netns.exists(names.netns):
            raise NotFound(f"network of VM {names.vm_id} not found")
        with netns.entered(names.netns):
            links.attach_tap_here(names.tap, names.vm_bridge)

    # After a restart -----------------------------------------------------------------------

    async def adopt(
        self, vm_id: str, customer_id: str, request: NetworkRequest, vmm_pid: int | None
    ) -> VmNetwork:
        names = self.names(vm_id)
        if vmm_pid is not None and await blocking(netns.attach, names.netns, vmm_pid):
            log.warning(
                "network: VM %s: its namespace's name was lost; taken back from its VMM (pid %d)",
                vm_id,
                vmm_pid,
            )
        network = await self.describe(vm_id, customer_id, request)
        if network is not None:
            if await blocking(self._repair_filters_sync, network):
                log.warning("network: VM %s: its port filters were missing; restored", vm_id)
            return network  # whole now
        log.warning("network: VM %s: its network is incomplete; rebuilding it", vm_id)
        # The addresses are still in the book, and set-up completes what exists.
        return await self.setup(vm_id, customer_id, request)

    def guest_rules(self, net: VmNetwork) -> str:
        return filters.guest_rules(
            net.vm_id,
            net.vm_veth,
            net.mac,
            net.ipv4.ip if net.ipv4 else None,
            net.ipv6.ip if net.ipv6 else None,
        )

    def _repair_filters_sync(self, net: VmNetwork) -> bool:
        ensure_home()
        return filters.ensure_guest(net.netns, self.guest_rules(net))

    def filters_current_sync(self, net: VmNetwork) -> bool:
        """Whether the VM's port filters are there and as this metald would make them."""
        ensure_home()
        return filters.guest_current(net.netns, self.guest_rules(net))

    # Teardown ----------------------------------------------------------------------------

    async def teardown(self, vm_id: str) -> None:
        names = self.names(vm_id)
        addresses = [a.address for a in await self._book.for_vm(vm_id)]
        await uncancellable(self._teardown(names, addresses))

    async def _teardown(self, names: VmNames, addresses: list[str]) -> None:
        await blocking(self._teardown_sync, names, addresses)
        await self._book.release(names.vm_id)

    def _teardown_sync(self, names: VmNames, addresses: list[str]) -> None:
        ctx = self._ctx
        ensure_home()
        macs: set[str] = set()
        with rtnl(ctx.host_netns) as host, rtnl(ctx.segments_netns) as seg, ctx.lock:
            segment = ""
            vh = links.get_link(seg, names.host_veth)
            owner = parse_vm_alias(vh.alias) if vh is not None else None
            ours = vh is not None and (
                vh.alias == "" or (owner is not None and owner[0] == names.vm_id)
            )
            if vh is not None and ours:
                if owner is not None and owner[1]:
                    macs.add(owner[1])
                if vh.master:
                    master = seg.link("get", index=vh.master)[0].get("IFLA_IFNAME")
                    segment = str(master) if str(master).startswith(CUSTOMER_BRIDGE) else ""
                links.delete_link(seg, names.host_veth)
            bridge = links.get_link(host, ctx.settings.bridge)
            if bridge is not None:
                for n in links.permanent_neighbours(host, bridge.index):
                    if n.address in addresses:
                        macs.add(n.mac)
                        links.delete_neighbour(host, bridge.index, n.address)
                for entry in links.static_fdb(host, bridge.index):
                    if entry.mac in macs:
                        links.delete_static_fdb(host, entry.port, entry.mac)
            if segment:
                self._segments.remove_if_empty(segment)
        netns.remove(names.netns)

    # Reading back ------------------------------------------------------------------------

    async def describe(
        self, vm_id: str, customer_id: str, request: NetworkRequest
    ) -> VmNetwork | None:
        names = self.names(vm_id)
        owner = await blocking(self.owner_sync, names)
        if owner is None:
            return None
        s = self._ctx.settings
        held = {a.family: a.address for a in await self._book.for_vm(vm_id)}
        ip4 = ipaddress.IPv4Interface(f"{held[4]}/{s.subnet4.prefixlen}") if 4 in held else None
        ip6 = ipaddress.IPv6Interface(f"{held[6]}/{s.subnet6.prefixlen}") if 6 in held else None
        if ip4 and ip6:
            mode = NetworkMode.DUAL_STACK
        else:
            mode = NetworkMode.IPV4_ONLY if ip4 else NetworkMode.IPV6_ONLY
        mac = owner[1] or request.mac or generated_mac(vm_id)
        return self.network_of(names, customer_id, request, mac, mode, ip4, ip6)

    def network_of(
        self,
        names: VmNames,
        customer_id: str,
        request: NetworkRequest,
        mac: str,
        mode: NetworkMode,
        ip4: ipaddress.IPv4Interface | None,
        ip6: ipaddress.IPv6Interface | None,
    ) -> VmNetwork:
        """A VM's network from its names, addresses and request (defaults from settings)."""
        s = self._ctx.settings
        return VmNetwork(
            vm_id=names.vm_id,
            customer_id=customer_id,
            netns=names.netns,
            tap=names.tap,
            mac=mac,
            mode=mode,
            ipv4=ip4,
            ipv6=ip6,
            gateway4=s.gateway4.ip if ip4 else None,
            gateway6=s.gateway6.ip if ip6 else None,
            dns4=(request.dns4 if request.dns4 is not None else s.dns_ipv4) if ip4 else (),
            dns6=(request.dns6 if request.dns6 is not None else s.dns_ipv6) if ip6 else (),
            host_veth=names.host_veth,
            vm_veth=names.vm_veth,
            vm_bridge=names.vm_bridge,
            customer_bridge=CustomerNames.for_customer(customer_id).bridge,
            rx=request.rx or s.default_rate_limit(),
            tx=request.tx or s.default_rate_limit(),
        )

    def owner_sync(self, names: VmNames) -> tuple[str, str] | None:
        """(vm_id, mac) from the host end's alias if the VM's network is there."""
        ensure_home()
        if not netns.exists(names.netns):
            return None
        with rtnl(self._ctx.segments_netns) as seg:
            vh = links.get_link(seg, names.host_veth)
        if vh is None:
            return None
        owner = parse_vm_alias(vh.alias)
        return owner if owner is not None and owner[0] == names.vm_id else None

    async def stats(self, vm_id: str) -> TrafficCounters:
        return await blocking(self._stats_sync, self.names(vm_id))

    def _stats_sync(self, names: VmNames) -> TrafficCounters:
        ensure_home()
        with rtnl(self._ctx.segments_netns) as seg:
            if links.get_link(seg, names.host_veth) is None:
                raise NotFound(f"network of VM {names.vm_id} not found")
            raw = links.link_stats(seg, names.host_veth)
        # The host end's receive is the guest's transmit, and the other way round.
        return TrafficCounters(
            bytes_received=raw["tx_bytes"],
            bytes_transmitted=raw["rx_bytes"],
            packets_received=raw["tx_packets"],
            packets_transmitted=raw["rx_packets"],
        )
