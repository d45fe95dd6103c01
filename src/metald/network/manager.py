"""The network manager: builds, describes and removes each VM's network (see the package
docstring for the design). The public API is async; every netlink request runs in a worker
thread (asyncio.to_thread) and a cancelled caller still waits for that thread, so an undo
never races the work it undoes.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import threading
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from metald.core.errors import (
    AlreadyExists,
    InvalidArgument,
    MetaldError,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from metald.core.validation import VM_ID, check_customer_id, check_vm_id
from metald.network import links, netns
from metald.network.addressing import allocate
from metald.network.links import FR_ACT_PROHIBIT, FR_ACT_TO_TBL, RT_TABLE_MAIN, Rule, rtnl
from metald.network.models import (
    NetworkMode,
    NetworkRequest,
    NetworkSettings,
    RateLimit,
    VmNetwork,
)
from metald.network.naming import (
    CUSTOMER_BRIDGE,
    HOST_VETH,
    UPLINK_CUSTOMER,
    UPLINK_HOST,
    VM_ALIAS,
    CustomerNames,
    VmNames,
    check_netns_prefix,
    generated_mac,
    vm_id_from_netns,
)
from metald.store.addresses import AddressBook

log = logging.getLogger(__name__)

T = TypeVar("T")

# Test hook: called with each step's name; raising there simulates a failure at that step.
StepHook = Callable[[str], None]

SETUP_STEPS = (
    "validate",
    "allocate",
    "netns",
    "veth",
    "vm-links",
    "segment",
    "fdb",
    "neighbours",
    "rate-limit",
)


class NetworkError(MetaldError):
    """A netlink or namespace operation failed (reported as internal)."""

    code = "internal"


async def _blocking(fn: Callable[..., T], *args: Any) -> T:
    """Run fn in a worker thread. If the caller is cancelled meanwhile, wait for the thread
    to finish anyway (it cannot be stopped) before letting the cancellation through."""
    fut = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        while not fut.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait({fut})
        raise


async def _uncancellable(aw: Awaitable[T]) -> T:
    fut = asyncio.ensure_future(aw)
    while True:
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            if fut.done():
                return fut.result()


def _vm_alias(vm_id: str, mac: str) -> str:
    return f"{VM_ALIAS}{vm_id} mac={mac}"


def _parse_vm_alias(alias: str) -> tuple[str, str] | None:
    if not alias.startswith(VM_ALIAS):
        return None
    rest = alias[len(VM_ALIAS) :]
    vm_id, _, mac = rest.partition(" mac=")
    return vm_id, mac


@dataclass
class _Undo:
    """What one set-up call created, to remove (newest first) if a later step fails."""

    actions: list[tuple[str, Callable[[], object]]] = field(default_factory=list)

    def add(self, what: str, action: Callable[[], object]) -> None:
        self.actions.append((what, action))

    def run(self) -> None:
        while self.actions:
            what, action = self.actions.pop()
            try:
                action()
            except Exception:  # keep undoing the rest; say what stayed behind
                log.exception("network: undo of %s failed", what)


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
        self._book = book
        self._hook = step_hook
        # Guards what VMs share: the host bridge's FDB and neighbours, customer segments.
        self._lock = threading.RLock()
        s = self.settings
        self._rules: list[Rule] = []
        for enabled, family, subnet in (
            (s.ipv4_enabled, 2, s.subnet4),
            (s.ipv6_enabled, 10, s.subnet6),
        ):
            if not enabled:
                continue
            net, plen = str(subnet.network_address), subnet.prefixlen
            # The host's own traffic to guests goes by the main table...
            self._rules.append(
                Rule(family, s.rule_priority, "lo", "", 0, net, plen, FR_ACT_TO_TBL, RT_TABLE_MAIN)
            )
            # ...and nothing from a guest address to a guest address is ever routed, whatever
            # the host's forwarding settings and wherever the packet came in.
            self._rules.append(
                Rule(family, s.rule_priority + 1, "", net, plen, net, plen, FR_ACT_PROHIBIT, 0)
            )

    # Host side -----------------------------------------------------------------------

    async def start(self) -> None:
        """Create (idempotently) the host bridge with the gateway addresses, the routing
        rules and the segments namespace."""
        await _blocking(self._start_sync)

    def _start_sync(self) -> None:
        netns.ensure_home()
        if self.host_netns is not None and not netns.exists(self.host_netns):
            raise Unavailable(f"network: host namespace {self.host_netns} does not exist")
        s = self.settings
        netns.create(self.segments_netns)
        with rtnl(self.host_netns) as ipr:
            bridge = links.get_link(ipr, s.bridge)
            if bridge is None:
                index = links.add_bridge(ipr, s.bridge, alias="metald host bridge")
            elif bridge.kind != "bridge":
                raise Unavailable(f"network: {s.bridge} exists and is not a bridge")
            else:
                index = bridge.index
                strangers = [
                    p.name for p in links.ports_of(ipr, index) if not p.name.startswith(UPLINK_HOST)
                ]
                if strangers:
                    # Isolated uplinks may forward to any non-isolated port: another port
                    # on the host bridge would join every customer's segment to it.
                    log.warning(
                        "network: %s has ports metald did not make (%s); guests of every "
                        "customer can reach them at L2",
                        s.bridge,
                        ", ".join(strangers),
                    )
            if s.ipv4_enabled:
                links.ensure_address(ipr, index, s.gateway4)
            if s.ipv6_enabled:
                links.ensure_address(ipr, index, s.gateway6)
            links.set_up(ipr, index)
            for rule in self._rules:
                links.ensure_rule(ipr, rule)

    async def stop(self) -> None:
        """Nothing to release: sockets live per operation, and VMs keep their network
        across a metald restart."""

    async def remove_host_network(self) -> None:
        """Remove the host bridge, the rules and the segments namespace (tests, uninstall).
        VMs must have been torn down first."""
        await _blocking(self._remove_host_sync)

    def _remove_host_sync(self) -> None:
        netns.ensure_home()
        with rtnl(self.host_netns) as ipr:
            for rule in self._rules:
                links.delete_rule(ipr, rule)
            for link in links.list_links(ipr):
                if link.name.startswith(UPLINK_HOST):
                    links.delete_link(ipr, link.name)
            links.delete_link(ipr, self.settings.bridge)
        netns.remove(self.segments_netns)

    # Per VM --------------------------------------------------------------------------

    def names(self, vm_id: str) -> VmNames:
        return VmNames.for_vm(vm_id, self.settings.netns_prefix)

    async def setup_vm(
        self, vm_id: str, customer_id: str, request: NetworkRequest | None = None
    ) -> VmNetwork:
        """Build the VM's network; leaves nothing behind if it fails. Calling it again for
        a VM whose network exists completes and returns it (the same addresses)."""
        self._step("validate")
        check_vm_id(vm_id)
        check_customer_id(customer_id)
        request = request or NetworkRequest()
        s = self.settings
        mode = request.mode or s.effective_default_mode()
        if mode not in s.allowed_modes():
            raise InvalidArgument(
                "config.network[0].mode", f"{mode.value} is not enabled on this host"
            )
        names = self.names(vm_id)
        customer = CustomerNames.for_customer(customer_id)
        mac = request.mac or generated_mac(vm_id)

        held_before = {a.address for a in await self._book.for_vm(vm_id)}
        built: list[_Undo] = []
        try:
            self._step("allocate")
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
            network = self._describe(
                names,
                customer_id,
                request,
                mac,
                mode,
                ipaddress.IPv4Interface(f"{ip4}/{s.subnet4.prefixlen}") if ip4 else None,
                ipaddress.IPv6Interface(f"{ip6}/{s.subnet6.prefixlen}") if ip6 else None,
            )
            await _blocking(self._build_sync, network, names, customer, built)
        except BaseException:
            # The build undoes itself when it fails; if it succeeded but the caller was
            # cancelled meanwhile, what it made is undone here.
            if built and built[0].actions:
                await _uncancellable(asyncio.to_thread(built[0].run))
            await _uncancellable(self._release_new(vm_id, held_before))
            raise
        return network

    async def _release_new(self, vm_id: str, held_before: set[str]) -> None:
        for allocation in await self._book.for_vm(vm_id):
            if allocation.address not in held_before:
                await self._book.release_address(vm_id, allocation.address)

    def _step(self, name: str) -> None:
        if self._hook is not None:
            self._hook(name)

    def _build_sync(
        self, net: VmNetwork, names: VmNames, customer: CustomerNames, built: list[_Undo]
    ) -> None:
        netns.ensure_home()
        undo = _Undo()
        built.append(undo)
        try:
            self._build_steps(net, names, customer, undo)
        except MetaldError:
            undo.run()
            raise
        except BaseException as exc:
            undo.run()
            raise NetworkError(f"network set-up of {net.vm_id} failed: {exc}") from exc

    def _build_steps(
        self, net: VmNetwork, names: VmNames, customer: CustomerNames, undo: _Undo
    ) -> None:
        self._step("netns")
        if netns.create(names.netns):
            undo.add(f"netns {names.netns}", lambda: netns.remove(names.netns))
        with (
            rtnl(self.host_netns) as host,
            rtnl(self.segments_netns) as seg,
            rtnl(names.netns) as vmr,
        ):
            self._step("veth")
            vh = links.get_link(seg, names.host_veth)
            if vh is None:
                vh_index = links.add_veth(seg, names.host_veth, names.vm_veth, names.netns)
                undo.add(
                    f"veth {names.host_veth}", lambda: self._delete_in_segments(names.host_veth)
                )
                links.set_alias(seg, vh_index, _vm_alias(net.vm_id, net.mac))
                links.no_ipv6_addresses(seg, vh_index)
            else:
                owner = _parse_vm_alias(vh.alias)
                if owner is None or owner[0] != net.vm_id:
                    raise AlreadyExists(
                        f"network: interface {names.host_veth} belongs to another VM"
                    )
                if owner[1] != net.mac:
                    raise AlreadyExists(
                        f"network: VM {net.vm_id} already has a network with MAC {owner[1]}"
                    )
                vh_index = vh.index

            self._step("vm-links")
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

            self._step("segment")
            with self._lock:
                bridge_index = self._host_bridge_index(host)
                bc_index, ub_index = self._ensure_segment(
                    host, seg, bridge_index, customer, names.host_veth, undo
                )
                links.set_master(seg, vh_index, bc_index)
                links.set_up(seg, vh_index)

                self._step("fdb")
                addresses = [str(i.ip) for i in (net.ipv4, net.ipv6) if i is not None]
                self._check_mac_free(host, bridge_index, ub_index, net.mac, addresses)
                present = {(e.mac, e.port) for e in links.static_fdb(host, bridge_index)}
                if (net.mac, ub_index) not in present:
                    links.add_static_fdb(host, ub_index, net.mac)
                    undo.add(f"fdb {net.mac}", lambda: self._undo_fdb(ub_index, net.mac))

                self._step("neighbours")
                for address in addresses:
                    links.set_permanent_neighbour(host, bridge_index, address, net.mac)
                    undo.add(
                        f"neighbour {address}",
                        lambda a=address: self._undo_neighbour(bridge_index, a),  # type: ignore[misc]
                    )

            self._step("rate-limit")
            self._apply_limits(seg, vmr, names, net.rx, net.tx)

    # Undo steps open their own sockets: they run after the set-up's sockets are closed.

    def _undo_fdb(self, port: int, mac: str) -> None:
        with rtnl(self.host_netns) as host, self._lock:
            links.delete_static_fdb(host, port, mac)

    def _undo_neighbour(self, bridge_index: int, address: str) -> None:
        with rtnl(self.host_netns) as host, self._lock:
            links.delete_neighbour(host, bridge_index, address)

    def _undo_segment(self, bridge: str, host_veth: str) -> None:
        # The VM's host end is a port of the segment: it goes first, or the segment is
        # never empty. (The undo of the veth itself then finds nothing to do.)
        with self._lock:
            self._delete_in_segments(host_veth)
            self._remove_segment_if_empty(bridge)

    def _delete_in_segments(self, name: str) -> None:
        with rtnl(self.segments_netns) as seg:
            links.delete_link(seg, name)

    def _host_bridge_index(self, host: Any) -> int:
        bridge = links.get_link(host, self.settings.bridge)
        if bridge is None:
            raise Unavailable(f"network: host bridge {self.settings.bridge} is missing")
        return bridge.index

    def _ensure_segment(
        self,
        host: Any,
        seg: Any,
        bridge_index: int,
        customer: CustomerNames,
        host_veth: str,
        undo: _Undo,
    ) -> tuple[int, int]:
        """The customer's bridge and its isolated uplink to the host bridge (caller holds the
        lock); (customer bridge index, uplink port index on the host bridge)."""
        created = False
        bc = links.get_link(seg, customer.bridge)
        if bc is None:
            bc_index = links.add_bridge(seg, customer.bridge, alias=customer.alias)
            links.no_ipv6_addresses(seg, bc_index)
            links.set_up(seg, bc_index)
            created = True
        elif bc.alias != customer.alias:
            raise AlreadyExists(f"network: bridge {customer.bridge} belongs to another customer")
        else:
            bc_index = bc.index
        if created:
            undo.add(
                f"segment {customer.bridge}",
                lambda: self._undo_segment(customer.bridge, host_veth),
            )
        ub = links.get_link(host, customer.uplink_host)
        if ub is None:
            # The uplink joins the host bridge down and isolated before it carries anything.
            ub_index = links.add_veth(
                host, customer.uplink_host, customer.uplink_customer, self.segments_netns
            )
            links.set_alias(host, ub_index, customer.alias)
            links.no_ipv6_addresses(host, ub_index)
            links.set_master(host, ub_index, bridge_index)
            links.isolate_uplink(host, ub_index)
        else:
            ub_index = ub.index
            if ub.master != bridge_index:
                links.set_master(host, ub_index, bridge_index)
                links.isolate_uplink(host, ub_index)
        links.set_up(host, ub_index)
        uc = links.get_link(seg, customer.uplink_customer)
        if uc is None:
            raise NetworkError(f"network: {customer.uplink_customer} is missing")
        if uc.master != bc_index:
            links.no_ipv6_addresses(seg, uc.index)
            links.set_master(seg, uc.index, bc_index)
        links.set_up(seg, uc.index)
        return bc_index, ub_index

    def _remove_segment_if_empty(self, bridge_name: str) -> bool:
        """Remove a customer bridge and its uplink if no VM is attached (lock held)."""
        suffix = bridge_name[len(CUSTOMER_BRIDGE) :]
        with rtnl(self.segments_netns) as seg:
            bc = links.get_link(seg, bridge_name)
            if bc is not None:
                ports = [p for p in links.ports_of(seg, bc.index) if p.name.startswith(HOST_VETH)]
                if ports:
                    return False
            links.delete_link(seg, UPLINK_CUSTOMER + suffix)  # its peer ub-... goes with it
            links.delete_link(seg, bridge_name)
        with rtnl(self.host_netns) as host:
            links.delete_link(host, UPLINK_HOST + suffix)
        return True

    def _check_mac_free(
        self, host: Any, bridge_index: int, uplink: int, mac: str, ours: list[str]
    ) -> None:
        taken = any(
            n.mac == mac and n.address not in ours
            for n in links.permanent_neighbours(host, bridge_index)
        ) or any(e.mac == mac and e.port != uplink for e in links.static_fdb(host, bridge_index))
        if taken:
            raise ResourceExhausted(f"config.network[0].mac_address: {mac} is in use by another VM")

    def _apply_limits(
        self, seg: Any, vmr: Any, names: VmNames, rx: RateLimit | None, tx: RateLimit | None
    ) -> None:
        # Toward the guest: what the host end sends into the VM's veth. From the guest: what
        # the VM's veth end sends out of the VM namespace. Both are shaped (tbf) rather than
        # policed, so TCP backs off instead of losing packets.
        vh = int(seg.link_lookup(ifname=names.host_veth)[0])
        vg = int(vmr.link_lookup(ifname=names.vm_veth)[0])
        for ipr, index, limit in ((seg, vh, rx), (vmr, vg, tx)):
            if limit is None:
                links.clear_root_qdisc(ipr, index)
            else:
                links.set_tbf(ipr, index, limit.bandwidth, limit.effective_burst())

    async def apply_rate_limit(
        self, vm_id: str, rx: RateLimit | None, tx: RateLimit | None
    ) -> None:
        """Set (or, with None, remove) the limits toward (rx) and from (tx) the guest."""
        names = self.names(vm_id)
        await _blocking(self._apply_limits_sync, names, rx, tx)

    def _apply_limits_sync(
        self, names: VmNames, rx: RateLimit | None, tx: RateLimit | None
    ) -> None:
        netns.ensure_home()
        if not netns.exists(names.netns):
            raise NotFound(f"network of VM {names.vm_id} not found")
        with rtnl(self.segments_netns) as seg, rtnl(names.netns) as vmr:
            self._apply_limits(seg, vmr, names, rx, tx)

    async def create_tap(self, vm_id: str, owner_uid: int, owner_gid: int) -> str:
        """Create the VM's TAP in its namespace, owned by uid/gid, joined to the VM's bridge;
        its name. (With the jailer, the jailer makes the TAP itself: see links.attach_tap_here.)"""
        names = self.names(vm_id)
        await _blocking(self._create_tap_sync, names, owner_uid, owner_gid)
        return names.tap

    def _create_tap_sync(self, names: VmNames, uid: int, gid: int) -> None:
        netns.ensure_home()
        if not netns.exists(names.netns):
            raise NotFound(f"network of VM {names.vm_id} not found")
        with netns.entered(names.netns):
            links.create_tap_here(names.tap, uid, gid)
            links.attach_tap_here(names.tap, names.vm_bridge)

    async def attach_tap(self, vm_id: str) -> None:
        """Join the TAP that the VMM's jailer made in the VM's namespace to the VM's bridge."""
        names = self.names(vm_id)
        await _blocking(self._attach_tap_sync, names)

    def _attach_tap_sync(self, names: VmNames) -> None:
        if not netns.exists(names.netns):
            raise NotFound(f"network of VM {names.vm_id} not found")
        with netns.entered(names.netns):
            links.attach_tap_here(names.tap, names.vm_bridge)

    async def teardown_vm(self, vm_id: str) -> None:
        """Remove the VM's namespace, links, neighbour and FDB entries and addresses.
        Idempotent. Call it after the VMM has exited: a process still inside keeps the
        (now unnamed and disconnected) namespace alive until it exits."""
        names = self.names(vm_id)
        addresses = [a.address for a in await self._book.for_vm(vm_id)]
        await _uncancellable(self._teardown(names, addresses))

    async def _teardown(self, names: VmNames, addresses: list[str]) -> None:
        await _blocking(self._teardown_sync, names, addresses)
        await self._book.release(names.vm_id)

    def _teardown_sync(self, names: VmNames, addresses: list[str]) -> None:
        netns.ensure_home()
        macs: set[str] = set()
        with rtnl(self.host_netns) as host, rtnl(self.segments_netns) as seg, self._lock:
            segment = ""
            vh = links.get_link(seg, names.host_veth)
            owner = _parse_vm_alias(vh.alias) if vh is not None else None
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
            bridge = links.get_link(host, self.settings.bridge)
            if bridge is not None:
                for n in links.permanent_neighbours(host, bridge.index):
                    if n.address in addresses:
                        macs.add(n.mac)
                        links.delete_neighbour(host, bridge.index, n.address)
                for entry in links.static_fdb(host, bridge.index):
                    if entry.mac in macs:
                        links.delete_static_fdb(host, entry.port, entry.mac)
            if segment:
                self._remove_segment_if_empty(segment)
        netns.remove(names.netns)

    async def describe_vm(
        self, vm_id: str, customer_id: str, request: NetworkRequest | None = None
    ) -> VmNetwork | None:
        """The network of a VM set up earlier (for a restarted metald), or None if it is
        not there. Addresses come from the book, the MAC from the host end's alias, the
        limits from the request (they are not read back from tc)."""
        names = self.names(vm_id)
        owner = await _blocking(self._owner_sync, names)
        if owner is None:
            return None
        request = request or NetworkRequest()
        s = self.settings
        held = {a.family: a.address for a in await self._book.for_vm(vm_id)}
        ip4 = ipaddress.IPv4Interface(f"{held[4]}/{s.subnet4.prefixlen}") if 4 in held else None
        ip6 = ipaddress.IPv6Interface(f"{held[6]}/{s.subnet6.prefixlen}") if 6 in held else None
        if ip4 and ip6:
            mode = NetworkMode.DUAL_STACK
        else:
            mode = NetworkMode.IPV4_ONLY if ip4 else NetworkMode.IPV6_ONLY
        mac = owner[1] or request.mac or generated_mac(vm_id)
        return self._describe(names, customer_id, request, mac, mode, ip4, ip6)

    def _describe(
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
        s = self.settings
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

    def _owner_sync(self, names: VmNames) -> tuple[str, str] | None:
        netns.ensure_home()
        if not netns.exists(names.netns):
            return None
        with rtnl(self.segments_netns) as seg:
            vh = links.get_link(seg, names.host_veth)
        if vh is None:
            return None
        owner = _parse_vm_alias(vh.alias)
        return owner if owner is not None and owner[0] == names.vm_id else None

    async def stats(self, vm_id: str) -> dict[str, int]:
        """Traffic counters from the guest's point of view (bytes/packets received and
        transmitted), read from the host end of its veth."""
        names = self.names(vm_id)
        return await _blocking(self._stats_sync, names)

    def _stats_sync(self, names: VmNames) -> dict[str, int]:
        netns.ensure_home()
        with rtnl(self.segments_netns) as seg:
            if links.get_link(seg, names.host_veth) is None:
                raise NotFound(f"network of VM {names.vm_id} not found")
            raw = links.link_stats(seg, names.host_veth)
        return {
            "bytes_received": raw["tx_bytes"],
            "bytes_transmitted": raw["rx_bytes"],
            "packets_received": raw["tx_packets"],
            "packets_transmitted": raw["rx_packets"],
        }

    # Reconciliation ------------------------------------------------------------------

    async def remove_orphans(self, known_vm_ids: Iterable[str]) -> list[str]:
        """Remove namespaces, links, neighbour/FDB entries, customer segments and address
        allocations that no known VM owns; what went, as readable strings. Call it at
        start-up, before VMs are created."""
        known = set(known_vm_ids)
        gone: list[str] = []
        names = await asyncio.to_thread(netns.list_names)
        vm_ids: set[str] = set()
        for name in names:
            vm_id = vm_id_from_netns(name, self.settings.netns_prefix)
            if (
                vm_id
                and VM_ID.fullmatch(vm_id)
                and name not in (self.segments_netns, self.host_netns)
            ):
                vm_ids.add(vm_id)
        for allocation in await self._book.all():
            vm_ids.add(allocation.vm_id)
        vm_ids |= await _blocking(self._vm_ids_on_links)
        for vm_id in sorted(vm_ids - known):
            await self.teardown_vm(vm_id)
            gone.append(f"vm {vm_id}")
        allocated = {a.address for a in await self._book.all()}
        gone += await _blocking(self._sweep_sync, allocated)
        return gone

    def _vm_ids_on_links(self) -> set[str]:
        netns.ensure_home()
        found = set()
        with rtnl(self.segments_netns) as seg:
            for link in links.list_links(seg):
                if link.name.startswith(HOST_VETH):
                    owner = _parse_vm_alias(link.alias)
                    if owner is not None:
                        found.add(owner[0])
        return found

    def _sweep_sync(self, allocated: set[str]) -> list[str]:
        netns.ensure_home()
        gone: list[str] = []
        s = self.settings
        with rtnl(self.host_netns) as host, rtnl(self.segments_netns) as seg, self._lock:
            # Host ends of VMs without an owner (no alias: a set-up that died half-way).
            for link in links.list_links(seg):
                if link.name.startswith(HOST_VETH) and _parse_vm_alias(link.alias) is None:
                    links.delete_link(seg, link.name)
                    gone.append(f"link {link.name}")
            bridge = links.get_link(host, s.bridge)
            if bridge is not None:
                kept_macs = set()
                for n in links.permanent_neighbours(host, bridge.index):
                    ip = ipaddress.ip_address(n.address)
                    in_ours = (ip.version == 4 and ip in s.subnet4) or (
                        ip.version == 6 and ip in s.subnet6
                    )
                    if in_ours and n.address not in allocated:
                        links.delete_neighbour(host, bridge.index, n.address)
                        gone.append(f"neighbour {n.address}")
                    else:
                        kept_macs.add(n.mac)
                uplinks = {
                    link.index
                    for link in links.list_links(host)
                    if link.name.startswith(UPLINK_HOST) and link.master == bridge.index
                }
                for entry in links.static_fdb(host, bridge.index):
                    if entry.port in uplinks and entry.mac not in kept_macs:
                        links.delete_static_fdb(host, entry.port, entry.mac)
                        gone.append(f"fdb {entry.mac}")
            for link in links.list_links(seg):
                if link.name.startswith(CUSTOMER_BRIDGE) and self._remove_segment_if_empty(
                    link.name
                ):
                    gone.append(f"segment {link.name}")
            # Uplinks whose customer bridge is gone.
            bridges = {
                link.name[len(CUSTOMER_BRIDGE) :]
                for link in links.list_links(seg)
                if link.name.startswith(CUSTOMER_BRIDGE)
            }
            for link in links.list_links(host):
                if link.name.startswith(UPLINK_HOST) and link.name[3:] not in bridges:
                    links.delete_link(host, link.name)
                    gone.append(f"link {link.name}")
        return gone

    # Inspection (tests, health) --------------------------------------------------------

    async def snapshot(self) -> dict[str, list[str]]:
        """Names of our namespaces and of every link in the host and segments namespaces,
        and the host bridge's neighbour and static FDB entries: for leak checks."""
        return await _blocking(self._snapshot_sync)

    def _snapshot_sync(self) -> dict[str, list[str]]:
        netns.ensure_home()
        prefix = self.settings.netns_prefix
        out: dict[str, list[str]] = {
            "netns": [n for n in netns.list_names() if n.startswith(prefix)]
        }
        with rtnl(self.host_netns) as host:
            out["host_links"] = sorted(link.name for link in links.list_links(host))
            bridge = links.get_link(host, self.settings.bridge)
            if bridge is not None:
                out["neighbours"] = sorted(
                    f"{n.address} {n.mac}" for n in links.permanent_neighbours(host, bridge.index)
                )
                out["fdb"] = sorted(
                    f"{e.mac} {e.port}" for e in links.static_fdb(host, bridge.index)
                )
        if netns.exists(self.segments_netns):
            with rtnl(self.segments_netns) as seg:
                out["segment_links"] = sorted(link.name for link in links.list_links(seg))
        return out
