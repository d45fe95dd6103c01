"""The host side of every VM's network: the host bridge (br-vms) with the gateway
addresses, the customers' uplink ports on it, the policy-routing rules that keep the
host from routing between guests (see the package docstring for why each holds), and the
filter that keeps guests from the host's own services (filters.py).

Made idempotently at start-up, shared by all VMs, kept across restarts; removed only on
request (tests, uninstall).
"""

from __future__ import annotations

from metald.core.errors import Unavailable
from metald.host import named_netns as netns
from metald.host.netns import ensure_home
from metald.network import filters, links
from metald.network.context import NetContext, log
from metald.network.links import FR_ACT_PROHIBIT, FR_ACT_TO_TBL, RT_TABLE_MAIN, Rule, rtnl
from metald.network.models import NetworkSettings
from metald.network.naming import UPLINK_HOST


def routing_rules(s: NetworkSettings) -> list[Rule]:
    rules: list[Rule] = []
    for enabled, family, subnet in (
        (s.ipv4_enabled, 2, s.subnet4),
        (s.ipv6_enabled, 10, s.subnet6),
    ):
        if not enabled:
            continue
        net, plen = str(subnet.network_address), subnet.prefixlen
        # The host's own traffic to guests goes by the main table...
        rules.append(
            Rule(family, s.rule_priority, "lo", "", 0, net, plen, FR_ACT_TO_TBL, RT_TABLE_MAIN)
        )
        # ...and nothing from a guest address to a guest address is ever routed, whatever
        # the host's forwarding settings and wherever the packet came in.
        rules.append(
            Rule(family, s.rule_priority + 1, "", net, plen, net, plen, FR_ACT_PROHIBIT, 0)
        )
    return rules


class HostSide:
    def __init__(self, ctx: NetContext) -> None:
        self._ctx = ctx
        self.rules = routing_rules(ctx.settings)

    def start_sync(self) -> None:
        """Create (idempotently) the host bridge with the gateway addresses, the routing
        rules and the segments namespace."""
        ctx = self._ctx
        ensure_home()
        if ctx.host_netns is not None and not netns.exists(ctx.host_netns):
            raise Unavailable(f"network: host namespace {ctx.host_netns} does not exist")
        s = ctx.settings
        netns.create(ctx.segments_netns)
        with rtnl(ctx.host_netns) as ipr:
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
            for rule in self.rules:
                links.ensure_rule(ipr, rule)
        # What guests may reach of the host itself, and no router advertisements taken.
        filters.ensure_host(ctx.host_netns, s.bridge, s.host_allow_rules)
        if s.ipv6_enabled:
            filters.ignore_router_advertisements(ctx.host_netns, s.bridge)

    def remove_sync(self) -> None:
        """Remove the host bridge, the rules and the segments namespace. VMs must have been
        torn down first."""
        ctx = self._ctx
        ensure_home()
        filters.remove_host(ctx.host_netns, ctx.settings.bridge)
        with rtnl(ctx.host_netns) as ipr:
            for rule in self.rules:
                links.delete_rule(ipr, rule)
            for link in links.list_links(ipr):
                if link.name.startswith(UPLINK_HOST):
                    links.delete_link(ipr, link.name)
            links.delete_link(ipr, ctx.settings.bridge)
        netns.remove(ctx.segments_netns)
