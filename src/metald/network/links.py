"""Blocking netlink operations (pyroute2) used by the network manager from worker threads.

Each function takes an IPRoute bound to one namespace (see ``rtnl``) and does one small,
checkable thing. Nothing here decides policy; manager.py does.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.ndmsg import NTF_MASTER, NUD_NOARP, NUD_PERMANENT

from metald.host import named_netns as netns

IFA_F_NODAD = 0x02
IN6_ADDR_GEN_MODE_NONE = 1
TBF_LATENCY = "50ms"

# linux/if_tun.h
TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
TUNSETOWNER = 0x400454CC
TUNSETGROUP = 0x400454CE
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000


@contextlib.contextmanager
def rtnl(ns: str | None) -> Iterator[Any]:
    """An IPRoute whose socket lives in the named namespace (None: the process's own)."""
    with netns.entered(ns):
        ipr = IPRoute(groups=0)
    try:
        yield ipr
    finally:
        ipr.close()


def _ignore(exc: NetlinkError, *codes: int) -> None:
    if exc.code not in codes:
        raise exc


@dataclass(frozen=True)
class Link:
    index: int
    name: str
    alias: str
    master: int
    kind: str
    mac: str


def get_link(ipr: Any, name: str) -> Link | None:
    try:
        msg = ipr.link("get", ifname=name)[0]
    except NetlinkError as exc:
        _ignore(exc, errno.ENODEV, errno.ENOENT)
        return None
    return _link(msg)


def _link(msg: Any) -> Link:
    info = msg.get("IFLA_LINKINFO")
    kind = info.get("IFLA_INFO_KIND") if info is not None else None
    return Link(
        index=int(msg["index"]),
        name=str(msg.get("IFLA_IFNAME")),
        alias=str(msg.get("IFLA_IFALIAS") or ""),
        master=int(msg.get("IFLA_MASTER") or 0),
        kind=str(kind or ""),
        mac=str(msg.get("IFLA_ADDRESS") or ""),
    )


def list_links(ipr: Any) -> list[Link]:
    return [_link(m) for m in ipr.link("dump")]


def delete_link(ipr: Any, name: str) -> bool:
    try:
        ipr.link("del", ifname=name)
    except NetlinkError as exc:
        _ignore(exc, errno.ENODEV, errno.ENOENT)
        return False
    return True


def set_up(ipr: Any, index: int) -> None:
    ipr.link("set", index=index, state="up")


def set_alias(ipr: Any, index: int, alias: str) -> None:
    ipr.link("set", index=index, ifalias=alias)


def no_ipv6_addresses(ipr: Any, index: int) -> None:
    """No link-local address (and so no DAD or MLD chatter) on a pure L2 device."""
    ipr.link(
        "set",
        index=index,
        IFLA_AF_SPEC={
            "attrs": [
                ["AF_INET6", {"attrs": [["IFLA_INET6_ADDR_GEN_MODE", IN6_ADDR_GEN_MODE_NONE]]}]
            ]
        },
    )


def add_bridge(ipr: Any, name: str, alias: str = "") -> int:
    """Create a bridge (no STP, no multicast snooping), not yet up; its index."""
    ipr.link("add", ifname=name, kind="bridge", br_mcast_snooping=0, br_stp_state=0)
    index = int(ipr.link_lookup(ifname=name)[0])
    # Pin the bridge's MAC: left alone, a bridge takes the lowest MAC of its ports and
    # changes it as ports come and go, and every change flushes the neighbour table of the
    # device (permanent entries included) and invalidates the guests' ARP entries.
    mac = ipr.link("get", index=index)[0].get("IFLA_ADDRESS")
    ipr.link("set", index=index, address=mac)
    if alias:
        set_alias(ipr, index, alias)
    return index


def add_veth(ipr: Any, name: str, peer: str, peer_ns: str | None) -> int:
    """A veth pair with `name` here and `peer` in the namespace peer_ns; index of `name`."""
    fd = netns.open_fd(peer_ns)
    try:
        ipr.link("add", ifname=name, kind="veth", peer={"ifname": peer, "net_ns_fd": fd})
    finally:
        os.close(fd)
    return int(ipr.link_lookup(ifname=name)[0])


def set_master(ipr: Any, index: int, master: int) -> None:
    ipr.link("set", index=index, master=master)


def isolate_uplink(ipr: Any, index: int) -> None:
    """Make a port of the host bridge an isolated uplink: it forwards only to non-isolated
    ports (the bridge device itself), learns nothing and is never flooded to, so frames
    reach it only through static FDB entries for its customer's MACs."""
    ipr.brport(
        "set",
        index=index,
        isolated=1,
        learning=0,
        unicast_flood=0,
        mcast_flood=0,
        bcast_flood=0,
    )


def brport_flags(ipr: Any, name: str) -> dict[str, int]:
    msg = ipr.link("get", ifname=name)[0]
    data = msg.get("IFLA_LINKINFO").get("IFLA_INFO_SLAVE_DATA")
    return {
        key: int(data.get(f"IFLA_BRPORT_{key.upper()}"))
        for key in ("isolated", "learning", "unicast_flood", "mcast_flood", "bcast_flood")
    }


def ports_of(ipr: Any, bridge_index: int) -> list[Link]:
    return [link for link in list_links(ipr) if link.master == bridge_index]


# Addresses and routing rules (host namespace) -------------------------------------------


def ensure_address(
    ipr: Any, index: int, iface: ipaddress.IPv4Interface | ipaddress.IPv6Interface
) -> None:
    kwargs: dict[str, Any] = {
        "index": index,
        "address": str(iface.ip),
        "prefixlen": iface.network.prefixlen,
    }
    if iface.version == 6:
        kwargs["family"] = socket.AF_INET6
        kwargs["flags"] = IFA_F_NODAD
    try:
        ipr.addr("add", **kwargs)
    except NetlinkError as exc:
        _ignore(exc, errno.EEXIST)


@dataclass(frozen=True)
class Rule:
    family: int
    priority: int
    iif: str
    src: str
    src_len: int
    dst: str
    dst_len: int
    action: int
    table: int


FR_ACT_TO_TBL = 1
FR_ACT_PROHIBIT = 8
RT_TABLE_MAIN = 254


def list_rules(ipr: Any, family: int) -> list[Rule]:
    out = []
    for msg in ipr.rule("dump", family=family):
        out.append(
            Rule(
                family=family,
                priority=int(msg.get("FRA_PRIORITY") or 0),
                iif=str(msg.get("FRA_IIFNAME") or ""),
                src=str(msg.get("FRA_SRC") or ""),
                src_len=int(msg["src_len"]),
                dst=str(msg.get("FRA_DST") or ""),
                dst_len=int(msg["dst_len"]),
                action=int(msg["action"]),
                table=int(msg.get("FRA_TABLE") or msg["table"]),
            )
        )
    return out


def ensure_rule(ipr: Any, rule: Rule) -> bool:
    """Add the rule unless an identical one exists; whether it was added."""
    for have in list_rules(ipr, rule.family):
        if have == rule:
            return False
    kwargs: dict[str, Any] = {
        "family": rule.family,
        "priority": rule.priority,
        "action": rule.action,
    }
    if rule.action == FR_ACT_TO_TBL:
        kwargs["table"] = rule.table
    if rule.iif:
        kwargs["iifname"] = rule.iif
    if rule.src:
        kwargs["src"] = rule.src
        kwargs["src_len"] = rule.src_len
    if rule.dst:
        kwargs["dst"] = rule.dst
        kwargs["dst_len"] = rule.dst_len
    ipr.rule("add", **kwargs)
    return True


def delete_rule(ipr: Any, rule: Rule) -> bool:
    for have in list_rules(ipr, rule.family):
        if have == rule:
            kwargs: dict[str, Any] = {
                "family": rule.family,
                "priority": rule.priority,
                "action": rule.action,
            }
            if rule.iif:
                kwargs["iifname"] = rule.iif
            if rule.src:
                kwargs.update(src=rule.src, src_len=rule.src_len)
            if rule.dst:
                kwargs.update(dst=rule.dst, dst_len=rule.dst_len)
            if rule.action == FR_ACT_TO_TBL:
                kwargs["table"] = rule.table
            ipr.rule("del", **kwargs)
            return True
    return False


# Bridge FDB and neighbours (host namespace) ---------------------------------------------


@dataclass(frozen=True)
class FdbEntry:
    mac: str
    port: int


def static_fdb(ipr: Any, bridge_index: int) -> list[FdbEntry]:
    """Static (NUD_NOARP) entries of the bridge's forwarding database."""
    out = []
    for msg in ipr.fdb("dump"):
        if int(msg.get("NDA_MASTER") or 0) != bridge_index:
            continue
        if int(msg["state"]) & NUD_NOARP and not int(msg["state"]) & NUD_PERMANENT:
            out.append(FdbEntry(mac=str(msg.get("NDA_LLADDR")), port=int(msg["ifindex"])))
    return out


def add_static_fdb(ipr: Any, port: int, mac: str) -> None:
    ipr.fdb("add", ifindex=port, lladdr=mac, state=NUD_NOARP, flags=NTF_MASTER)


def delete_static_fdb(ipr: Any, port: int, mac: str) -> bool:
    try:
        ipr.fdb("del", ifindex=port, lladdr=mac, state=NUD_NOARP, flags=NTF_MASTER)
    except NetlinkError as exc:
        _ignore(exc, errno.ENOENT, errno.ENODEV)
        return False
    return True


@dataclass(frozen=True)
class Neighbour:
    address: str
    mac: str


def permanent_neighbours(ipr: Any, index: int) -> list[Neighbour]:
    out = []
    for family in (socket.AF_INET, socket.AF_INET6):
        for msg in ipr.neigh("dump", family=family, ifindex=index):
            if int(msg["ifindex"]) == index and int(msg["state"]) & NUD_PERMANENT:
                addr = ipaddress.ip_address(str(msg.get("NDA_DST")))
                out.append(Neighbour(address=str(addr), mac=str(msg.get("NDA_LLADDR") or "")))
    return out


def set_permanent_neighbour(ipr: Any, index: int, address: str, mac: str) -> None:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    ipr.neigh("replace", family=family, dst=address, lladdr=mac, ifindex=index, state=NUD_PERMANENT)


def delete_neighbour(ipr: Any, index: int, address: str) -> bool:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        ipr.neigh("del", family=family, dst=address, ifindex=index)
    except NetlinkError as exc:
        _ignore(exc, errno.ENOENT, errno.ENODEV)
        return False
    return True


# Traffic control ------------------------------------------------------------------------


def set_tbf(ipr: Any, index: int, rate: int, burst: int) -> None:
    """Shape what the device sends to `rate` bytes/s with a `burst`-byte bucket."""
    clear_root_qdisc(ipr, index)
    ipr.tc("add", "tbf", index, handle="1:", rate=rate, burst=burst, latency=TBF_LATENCY)


def clear_root_qdisc(ipr: Any, index: int) -> None:
    try:
        ipr.tc("del", index=index, handle="1:", parent=0xFFFFFFFF)
    except NetlinkError as exc:
        # ENOENT/EINVAL: only the default qdisc is there.
        _ignore(exc, errno.ENOENT, errno.EINVAL)


def root_qdisc(ipr: Any, index: int) -> tuple[str, int, int] | None:
    """(kind, rate bytes/s, burst bytes) of a tbf root qdisc; (kind, 0, 0) for another one."""
    for msg in ipr.tc("dump", index=index):
        if int(msg["index"]) != index or int(msg["parent"]) != 0xFFFFFFFF:
            continue
        kind = str(msg.get_attr("TCA_KIND"))
        if kind == "tbf":
            parms = msg.get_attr("TCA_OPTIONS").get_attr("TCA_TBF_PARMS")
            return kind, int(parms["rate"]), 0
        return kind, 0, 0
    return None


def link_stats(ipr: Any, name: str) -> dict[str, int]:
    msg = ipr.link("get", ifname=name)[0]
    stats = msg.get("IFLA_STATS64") or msg.get("IFLA_STATS")
    return {
        "rx_bytes": int(stats["rx_bytes"]),
        "tx_bytes": int(stats["tx_bytes"]),
        "rx_packets": int(stats["rx_packets"]),
        "tx_packets": int(stats["tx_packets"]),
    }


# TAP ------------------------------------------------------------------------------------


def create_tap_here(name: str, uid: int, gid: int) -> None:
    """A persistent TAP in the calling thread's namespace, owned by uid/gid (so an
    unprivileged VMM may open it by name). EEXIST if a device of that name exists."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        ifr = struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI)
        fcntl.ioctl(fd, TUNSETIFF, ifr)
        fcntl.ioctl(fd, TUNSETOWNER, uid)
        fcntl.ioctl(fd, TUNSETGROUP, gid)
        fcntl.ioctl(fd, TUNSETPERSIST, 1)
    finally:
        os.close(fd)


def attach_tap_here(tap: str, bridge: str | None = None) -> None:
    """Join an existing TAP to the VM namespace's bridge and bring it up, in the calling
    thread's namespace. For the jailer: after creating the TAP inside the VM's namespace
    (``create_tap_here``), call this so the guest is connected. Without a bridge name, the
    one bridge of the VM namespace (``vb-...``) is used."""
    ipr = IPRoute(groups=0)
    try:
        tap_index = int(ipr.link_lookup(ifname=tap)[0])
        if bridge is None:
            found = [
                link
                for link in list_links(ipr)
                if link.kind == "bridge" and link.name.startswith("vb-")
            ]
            if len(found) != 1:
                raise LookupError(f"expected one vb- bridge here, found {len(found)}")
            bridge_index = found[0].index
        else:
            bridge_index = int(ipr.link_lookup(ifname=bridge)[0])
        no_ipv6_addresses(ipr, tap_index)
        set_master(ipr, tap_index, bridge_index)
        set_up(ipr, tap_index)
    finally:
        ipr.close()
