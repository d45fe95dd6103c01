"""Reconciliation after a crash or restart: what no known VM owns is removed — namespaces,
host ends of veth pairs, neighbour and FDB entries, empty customer segments, uplinks and
address allocations — and a snapshot of everything ours for leak checks.

A VM is found by three independent marks (its namespace name, its address allocations,
the alias on its host-side veth end), so a set-up that died at any step is still found.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Iterable

from metald.core.ports import AddressBook
from metald.core.validation import VM_ID
from metald.host import named_netns as netns
from metald.host.netns import ensure_home
from metald.network import links
from metald.network.blocking import blocking
from metald.network.context import NetContext
from metald.network.links import rtnl
from metald.network.naming import (
    CUSTOMER_BRIDGE,
    HOST_VETH,
    UPLINK_HOST,
    parse_vm_alias,
    vm_id_from_netns,
)
from metald.network.segments import Segments
from metald.network.vms import VmNetworks


class Reconciler:
    def __init__(
        self, ctx: NetContext, book: AddressBook, segments: Segments, vms: VmNetworks
    ) -> None:
        self._ctx = ctx
        self._book = book
        self._segments = segments
        self._vms = vms

    async def remove_orphans(self, known_vm_ids: Iterable[str]) -> list[str]:
        ctx = self._ctx
        known = set(known_vm_ids)
        gone: list[str] = []
        names = await asyncio.to_thread(netns.list_names)
        vm_ids: set[str] = set()
        for name in names:
            vm_id = vm_id_from_netns(name, ctx.settings.netns_prefix)
            if (
                vm_id
                and VM_ID.fullmatch(vm_id)
                and name not in (ctx.segments_netns, ctx.host_netns)
            ):
                vm_ids.add(vm_id)
        for allocation in await self._book.all():
            vm_ids.add(allocation.vm_id)
        vm_ids |= await blocking(self._vm_ids_on_links)
        for vm_id in sorted(vm_ids - known):
            await self._vms.teardown(vm_id)
            gone.append(f"vm {vm_id}")
        allocated = {a.address for a in await self._book.all()}
        gone += await blocking(self._sweep_sync, allocated)
        return gone

    def _vm_ids_on_links(self) -> set[str]:
        ensure_home()
        found = set()
        with rtnl(self._ctx.segments_netns) as seg:
            for link in links.list_links(seg):
                if link.name.startswith(HOST_VETH):
                    owner = parse_vm_alias(link.alias)
                    if owner is not None:
                        found.add(owner[0])
        return found

    def _sweep_sync(self, allocated: set[str]) -> list[str]:
        ctx = self._ctx
        ensure_home()
        gone: list[str] = []
        s = ctx.settings
        with rtnl(ctx.host_netns) as host, rtnl(ctx.segments_netns) as seg, ctx.lock:
            # Host ends of VMs without an owner (no alias: a set-up that died half-way).
            for link in links.list_links(seg):
                if link.name.startswith(HOST_VETH) and parse_vm_alias(link.alias) is None:
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
                if link.name.startswith(CUSTOMER_BRIDGE) and self._segments.remove_if_empty(
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

    def snapshot_sync(self) -> dict[str, list[str]]:
        ctx = self._ctx
        ensure_home()
        prefix = ctx.settings.netns_prefix
        out: dict[str, list[str]] = {
            "netns": [n for n in netns.list_names() if n.startswith(prefix)]
        }
        with rtnl(ctx.host_netns) as host:
            out["host_links"] = sorted(link.name for link in links.list_links(host))
            bridge = links.get_link(host, ctx.settings.bridge)
            if bridge is not None:
                out["neighbours"] = sorted(
                    f"{n.address} {n.mac}" for n in links.permanent_neighbours(host, bridge.index)
                )
                out["fdb"] = sorted(
                    f"{e.mac} {e.port}" for e in links.static_fdb(host, bridge.index)
                )
        if netns.exists(ctx.segments_netns):
            with rtnl(ctx.segments_netns) as seg:
                out["segment_links"] = sorted(link.name for link in links.list_links(seg))
        return out
