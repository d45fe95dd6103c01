"""Customer segments: one bridge per customer (bc-) in the segments namespace, joined to
the host bridge by an isolated uplink veth (ub- on the host bridge, uc- on the customer's).

A segment is made when its customer's first VM network is built and removed with the
last one. Everything here runs with the context's lock held by the caller where noted:
segments are what VMs of one customer share.
"""

from __future__ import annotations

from typing import Any

from metald.core.errors import AlreadyExists, Unavailable
from metald.core.undo import Undo
from metald.network import links
from metald.network.context import NetContext, NetworkError
from metald.network.links import rtnl
from metald.network.naming import (
    CUSTOMER_BRIDGE,
    HOST_VETH,
    UPLINK_CUSTOMER,
    UPLINK_HOST,
    CustomerNames,
)


class Segments:
    def __init__(self, ctx: NetContext) -> None:
        self._ctx = ctx

    def host_bridge_index(self, host: Any) -> int:
        bridge = links.get_link(host, self._ctx.settings.bridge)
        if bridge is None:
            raise Unavailable(f"network: host bridge {self._ctx.settings.bridge} is missing")
        return bridge.index

    def ensure(
        self,
        host: Any,
        seg: Any,
        bridge_index: int,
        customer: CustomerNames,
        host_veth: str,
        undo: Undo,
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
            undo.add(f"segment {customer.bridge}", self._undo, customer.bridge, host_veth)
        ub = links.get_link(host, customer.uplink_host)
        if ub is not None and links.get_link(seg, customer.uplink_customer) is None:
            # Its peer went with a lost segments namespace (or is going: the kernel removes
            # the pair once that namespace is cleaned up): make the pair anew.
            links.delete_link(host, customer.uplink_host)
            ub = None
        if ub is None:
            # The uplink joins the host bridge down and isolated before it carries anything.
            ub_index = links.add_veth(
                host, customer.uplink_host, customer.uplink_customer, self._ctx.segments_netns
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

    def _undo(self, bridge: str, host_veth: str) -> None:
        # The VM's host end is a port of the segment: it goes first, or the segment is
        # never empty. (The undo of the veth itself then finds nothing to do.)
        with self._ctx.lock:
            self.delete_link(host_veth)
            self.remove_if_empty(bridge)

    def delete_link(self, name: str) -> None:
        with rtnl(self._ctx.segments_netns) as seg:
            links.delete_link(seg, name)

    def remove_if_empty(self, bridge_name: str) -> bool:
        """Remove a customer bridge and its uplink if no VM is attached (lock held)."""
        suffix = bridge_name[len(CUSTOMER_BRIDGE) :]
        with rtnl(self._ctx.segments_netns) as seg:
            bc = links.get_link(seg, bridge_name)
            if bc is not None:
                ports = [p for p in links.ports_of(seg, bc.index) if p.name.startswith(HOST_VETH)]
                if ports:
                    return False
            links.delete_link(seg, UPLINK_CUSTOMER + suffix)  # its peer ub-... goes with it
            links.delete_link(seg, bridge_name)
        with rtnl(self._ctx.host_netns) as host:
            links.delete_link(host, UPLINK_HOST + suffix)
        return True
