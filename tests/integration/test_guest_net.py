"""Issue 7, the host network: what a guest may send (anti-spoofing, RA and DHCP-server guard
on its port) and what it may reach of the host (nothing but the operator's allow list).

The environment is test_network's: a host namespace, a segments namespace and a VM namespace
prefix this test made, all removed afterwards; real guests (the default image under QEMU
TCG) started by the test in their VMs' namespaces, driven over a shell on a second serial
port. A guest sends hand-made frames with a tiny raw-socket sender (tests/integration/
_frames.py) put into its initrd: it is root in its guest, as a hostile tenant is.

"Not received" is never a timeout: each batch of frames a test expects dropped is followed
by frames it expects delivered along the same path (same sender, same queues, same bridges);
once a listener has seen those, anything sent before them that was going to arrive has.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import os
import secrets
import shutil
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import _frames
import pytest
from test_network import SINK, TEST_INIT, Env, Guest, env, in_ns, inspect, newc, start_guests

from metald.assets.store import LocalAssetStore
from metald.host import named_netns as netns
from metald.network import NetworkRequest, NetworkSettings, filters, links, nft

__all__ = ["env"]  # the fixture, from test_network

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, netlink)")

STORE_DIR = Path(os.environ.get("METALD_TEST_ASSETS", Path(__file__).parents[2] / "var" / "assets"))
SEEN_TIMEOUT = 60.0


def _has_table(ns: str | None, family: str, table: str) -> bool:
    return nft.table_comment(ns, family, table) is not None


# Without guests ---------------------------------------------------------------------------


async def test_filters_come_with_the_network_and_go_with_it(env: Env) -> None:
    net = await env.nm.setup_vm("f-vm", "acme")
    body = filters.guest_rules(
        "f-vm", net.vm_veth, net.mac,
        net.ipv4.ip if net.ipv4 else None, net.ipv6.ip if net.ipv6 else None,
    )  # fmt: skip
    assert await inspect(lambda: filters.guest_current(net.netns, body))
    listing = await inspect(lambda: nft.run(net.netns, "list table bridge metald"))
    assert f'iifname != "{net.vm_veth}" jump from_guest' in listing
    assert f"ether saddr != {net.mac} drop" in listing
    # The host namespace: the host-services table, and no router advertisements taken.
    table = filters.host_table("br-vms")
    assert await inspect(lambda: _has_table(env.host, "inet", table))
    ra_path = Path("/proc/sys/net/ipv6/conf/br-vms/accept_ra")
    accept_ra = await inspect(lambda: in_ns(env.host, ra_path.read_text))
    assert accept_ra.strip() == "0"
    await env.nm.teardown_vm("f-vm")
    assert not netns.exists(net.netns)
    # Rules live only in namespaces the test made: the machine's own has none of ours.
    own = await inspect(lambda: nft.run(None, "list tables"))
    assert "metald" not in own, own
    await env.nm.remove_host_network()
    assert not await inspect(lambda: _has_table(env.host, "inet", table))


async def test_adoption_restores_missing_or_stale_filters(env: Env) -> None:
    net = await env.nm.setup_vm("f-adopt", "acme")
    body = env.nm._vms.guest_rules(net)

    def tamper(how: str) -> None:
        if how == "missing":
            assert filters.remove_guest(net.netns)
        else:  # an older metald's, or one changed by hand
            nft.replace_table(net.netns, "bridge", "metald", 'comment "old"\nchain c { }')

    for how in ("missing", "stale"):
        await inspect(lambda: tamper(how))  # noqa: B023 (awaited at once)
        assert not await inspect(lambda: filters.guest_current(net.netns, body))
        # A restarted metald: a new manager adopts the VM.
        nm = env.manager()
        await nm.start()
        adopted = await nm.adopt_vm("f-adopt", "acme", NetworkRequest(), None)
        assert adopted == net
        assert await inspect(lambda: filters.guest_current(net.netns, body)), how
    await env.nm.teardown_vm("f-adopt")


async def test_a_changed_allow_list_replaces_the_host_table(env: Env) -> None:
    table = filters.host_table("br-vms")

    def listing() -> str:
        return nft.run(env.host, f"list table inet {table}")

    assert "echo-request accept" in await inspect(listing)  # the default: icmp
    nm = env.manager(settings=NetworkSettings(netns_prefix=env.prefix, host_allow="tcp:7001"))
    await nm.start()
    text = await inspect(listing)
    assert "tcp dport 7001 accept" in text and "echo-request" not in text
    assert text.count("chain from_guests") == 1


def test_a_bad_allow_list_is_refused_naming_the_setting() -> None:
    for bad in ("tcp", "tcp:0", "tcp:70000", "sctp:5", "udp:9-3", "icmp:8"):
        with pytest.raises(ValueError, match="UNKEY_METALD_NETWORK_HOST_ALLOW"):
            NetworkSettings(host_allow=bad).check()


# With guests ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def raw_boot(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The default guest's kernel, and its initrd with the test shell and the frame sender."""
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed (Debian package qemu-system-x86)")
    store = LocalAssetStore(STORE_DIR)
    if store.default() is None:
        pytest.skip(f"no default guest image in {STORE_DIR} (metald assets build)")
    kernel, initrd = store.default_boot()
    assert initrd is not None
    combined = tmp_path_factory.mktemp("guest") / "initrd-with-sender"
    combined.write_bytes(
        initrd.read_bytes()
        + newc(
            [
                ("test-init", stat.S_IFREG | 0o755, TEST_INIT),
                ("bin/test-sink", stat.S_IFREG | 0o755, SINK),
                ("bin/test-rawsend", stat.S_IFREG | 0o755, _frames.sender_elf()),
            ]
        )
    )
    return kernel, combined


class Listener:
    """Every frame that reaches an interface of a namespace, collected by a thread."""

    def __init__(self, ns: str, ifname: str) -> None:
        self.where = f"{ifname} in {ns}"
        self.frames: list[bytes] = []
        self._cond = threading.Condition()
        self.sock: socket.socket = in_ns(
            ns, lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
        )
        self.sock.bind((ifname, 0))
        self.sock.settimeout(0.5)
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                frame = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._cond:
                self.frames.append(frame)
                self._cond.notify_all()

    def seen(self, marker: bytes) -> bool:
        with self._cond:
            return any(marker in f for f in self.frames)

    def wait_for(self, markers: list[bytes]) -> None:
        deadline = time.monotonic() + SEEN_TIMEOUT
        with self._cond:
            while not all(any(m in f for f in self.frames) for m in markers):
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = [m for m in markers if not any(m in f for f in self.frames)]
                    raise AssertionError(f"{self.where}: never saw {missing}")
                self._cond.wait(left)

    def close(self) -> None:
        self._stop = True
        self._thread.join()
        self.sock.close()


@contextlib.contextmanager
def listening(*where: tuple[str, str]) -> Iterator[list[Listener]]:
    made: list[Listener] = []
    try:
        for ns, ifname in where:
            made.append(Listener(ns, ifname))
        yield made
    finally:
        for listener in made:
            listener.close()


async def send(guest: Guest, ifindex: int, frame: bytes) -> None:
    """The guest sends the frame out of its eth0 (ifindex; a raw socket, as its root)."""
    data = base64.b64encode(_frames.sender_input(ifindex, frame)).decode()
    rc, out = await guest.sh(f"echo {data} | base64 -d > /tmp/f && /bin/test-rawsend < /tmp/f")
    assert rc == 0, f"the guest could not send: {out}"


def _mark() -> bytes:
    return b"MRK" + secrets.token_hex(6).encode()


def spoofed_frames(me: Guest, peer: Guest) -> dict[str, tuple[bytes, bytes]]:
    """What a hostile guest tries: name -> (marker, frame)."""
    mac, ll = me.net.mac, str(filters.link_local(me.net.mac))
    assert me.net.ipv4 and me.net.ipv6 and peer.net.ipv4 and peer.net.ipv6
    ip4 = str(me.net.ipv4.ip)
    peer4, peer6 = str(peer.net.ipv4.ip), str(peer.net.ipv6.ip)
    out: dict[str, tuple[bytes, bytes]] = {}

    def add(name: str, build: object) -> None:
        m = _mark()
        assert callable(build)
        out[name] = (m, build(m))

    add("spoofed MAC", lambda m: _frames.udp4("02:de:ad:be:ef:01", ip4, "10.100.255.255", 9, 9, m))
    add("spoofed IPv4 (the peer's)", lambda m: _frames.udp4(mac, peer4, "10.100.255.255", 9, 9, m))
    add("spoofed IPv4 (unallocated)", lambda m: _frames.udp4(mac, "10.100.77.7", peer4, 9, 9, m))
    add("spoofed IPv6 (the peer's)", lambda m: _frames.udp6(mac, peer6, "ff02::1", 9, 9, m))
    add("spoofed IPv6 (link-local)", lambda m: _frames.udp6(mac, "fe80::bad", "ff02::1", 9, 9, m))
    add("router advertisement", lambda m: _frames.router_advertisement(mac, ll, RA_PREFIX, m))
    add("ARP claiming the peer's IPv4", lambda m: _frames.arp(mac, peer4, peer4) + m)
    add(
        "NA claiming the peer's IPv6",
        lambda m: _frames.neighbour_advertisement(mac, ll, peer6, m),
    )
    add("DHCP server reply", lambda m: _frames.udp4(mac, ip4, "255.255.255.255", 67, 68, m))
    add("DHCPv6 server reply", lambda m: _frames.udp6(mac, ll, "ff02::1", 547, 546, m))
    for name, tag in (
        ("VLAN-tagged IPv4", b"\x81\x00\x00\x07"),
        ("QinQ-tagged IPv4", b"\x88\xa8\x00\x05\x81\x00\x00\x07"),
    ):
        m = _mark()
        plain = _frames.udp4(mac, ip4, "10.100.255.255", 9, 9, m)
        out[name] = (m, plain[:12] + tag + plain[12:])
    return out


def honest_frames(me: Guest) -> dict[str, tuple[bytes, bytes]]:
    mac, ll = me.net.mac, str(filters.link_local(me.net.mac))
    assert me.net.ipv4 and me.net.ipv6
    ip4, ip6 = str(me.net.ipv4.ip), str(me.net.ipv6.ip)
    out = {}
    for name, build in (
        ("IPv4", lambda m: _frames.udp4(mac, ip4, "10.100.255.255", 9, 9, m)),
        ("IPv6", lambda m: _frames.udp6(mac, ip6, "ff02::1", 9, 9, m)),
        ("IPv6 link-local", lambda m: _frames.udp6(mac, ll, "ff02::1", 9, 9, m)),
        ("gratuitous ARP", lambda m: _frames.arp(mac, ip4, ip4) + m),
    ):
        m = _mark()
        out[name] = (m, build(m))
    return out


RA_PREFIX = "2001:db8:77::/64"


async def _ifindex(guest: Guest) -> int:
    rc, out = await guest.sh("cat /sys/class/net/eth0/ifindex")
    assert rc == 0, out
    return int(out.strip())


async def _peer_took_the_ra(peer: Guest) -> bool:
    rc, out = await peer.sh("ip -6 addr show dev eth0; ip -6 route")
    assert rc == 0, out
    return "2001:db8:77:" in out


@pytest.mark.guest
async def test_a_guest_cannot_spoof_or_advertise_routes(
    env: Env, raw_boot: tuple[Path, Path]
) -> None:
    guests = await start_guests(env, raw_boot, [("spoofer", "cust-s"), ("peer", "cust-s")])
    me, peer = guests
    try:
        ifindex = await _ifindex(me)
        rc, out = await peer.sh("cat /proc/sys/net/ipv6/conf/eth0/accept_ra")
        assert rc == 0 and out.strip() != "0", "the peer guest would take RAs"

        async def attempt() -> tuple[dict[str, bool], dict[str, bool]]:
            """Send every spoofed frame, then every honest one; (seen by the host, seen in
            the peer VM's namespace) for each spoofed one."""
            bad, good = spoofed_frames(me, peer), honest_frames(me)
            with listening((env.host, "br-vms"), (peer.net.netns, peer.net.vm_veth)) as (
                host,
                peer_ns,
            ):
                for _, frame in bad.values():
                    await send(me, ifindex, frame)
                for _, frame in good.values():
                    await send(me, ifindex, frame)
                markers = [m for m, _ in good.values()]
                await asyncio.gather(
                    asyncio.to_thread(host.wait_for, markers),
                    asyncio.to_thread(peer_ns.wait_for, markers),
                )
                return (
                    {name: host.seen(m) for name, (m, _) in bad.items()},
                    {name: peer_ns.seen(m) for name, (m, _) in bad.items()},
                )

        at_host, at_peer = await attempt()
        print(f"\nwith the filters: host saw {at_host}\n  the peer's namespace saw {at_peer}")
        assert not any(at_host.values()), at_host
        assert not any(at_peer.values()), at_peer
        assert not await _peer_took_the_ra(peer)

        # The same frames without the guest's port filters reach the peer (and the
        # broadcast/multicast ones the host): so the frames are good and the filter is
        # what drops them. Then a restarted metald's adoption puts the filters back.
        assert await inspect(lambda: filters.remove_guest(me.net.netns))
        at_host, at_peer = await attempt()
        print(f"without them: host saw {at_host}\n  the peer's namespace saw {at_peer}")
        assert all(at_peer.values()), at_peer
        assert all(at_host.values()), at_host
        deadline = time.monotonic() + SEEN_TIMEOUT
        while not await _peer_took_the_ra(peer):
            assert time.monotonic() < deadline, "the peer guest never took the unfiltered RA"
            await asyncio.sleep(0.5)

        nm = env.manager()
        await nm.start()
        await nm.adopt_vm(me.net.vm_id, "cust-s", NetworkRequest(), None)
        at_host, at_peer = await attempt()
        assert not any(at_host.values()) and not any(at_peer.values()), (at_host, at_peer)
    finally:
        for g in guests:
            g.stop()
        for g in guests:
            await env.nm.teardown_vm(g.net.vm_id)


class HostServer:
    """A TCP server in the host namespace on every address (both families) of a port: it
    answers each connection with its token and closes."""

    def __init__(self, ns: str, port: int) -> None:
        self.token = "HELLO" + secrets.token_hex(4)

        def make() -> socket.socket:
            s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("::", port))
            s.listen(16)
            return s

        self.sock: socket.socket = in_ns(ns, make)
        self.sock.settimeout(0.5)
        self.accepted = 0
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                self.accepted += 1
                conn.sendall(self.token.encode() + b"\n")

    def close(self) -> None:
        self._stop = True
        self._thread.join()
        self.sock.close()


OTHER_HOST_ADDRESS = "198.51.100.1"  # on the host namespace's lo: "anything local"


async def _connect(guest: Guest, address: str, port: int) -> str:
    rc, out = await guest.sh(f"nc -w 10 {address} {port} </dev/null 2>&1; echo rc=$?", timeout=60)
    assert rc == 0, out
    return out


@pytest.mark.guest
async def test_a_guest_reaches_the_host_only_where_allowed(
    env: Env, raw_boot: tuple[Path, Path]
) -> None:
    def add_address() -> None:
        with links.rtnl(env.host) as ipr:
            lo = int(ipr.link_lookup(ifname="lo")[0])
            links.set_up(ipr, lo)
            links.ensure_address(ipr, lo, ipaddress.IPv4Interface(OTHER_HOST_ADDRESS + "/32"))

    await inspect(add_address)
    (guest,) = await start_guests(env, raw_boot, [("svc", "cust-h")])
    server = HostServer(env.host, 7001)
    targets = ["10.100.0.1", "fd00::1", OTHER_HOST_ADDRESS]
    try:
        # The default allow list: icmp only. Pings to the gateway answer; TCP is refused.
        assert await guest.ping("10.100.0.1") and await guest.ping("fd00::1")
        for address in targets:
            out = await _connect(guest, address, 7001)
            print(f"\ndefault allow list: nc {address} 7001: {out.strip()!r}")
            assert server.token not in out and "rc=0" not in out, out
        assert server.accepted == 0
        # The host's own connections to the guest still work (their replies come back).
        rc, out = await guest.sh("nc -l -p 5001 -e /bin/test-sink </dev/null >/dev/null 2>&1 &")
        assert rc == 0, out
        assert guest.net.ipv4 is not None
        peer = (str(guest.net.ipv4.ip), 5001)

        def host_connects() -> None:
            s: socket.socket = in_ns(env.host, lambda: socket.socket())
            with s:
                s.settimeout(30)
                for _ in range(100):
                    try:
                        s.connect(peer)
                        break
                    except OSError:
                        time.sleep(0.1)
                s.sendall(b"x" * 100_000)

        await asyncio.to_thread(host_connects)

        # An operator allows tcp:7001 (and so no longer icmp).
        nm = env.manager(settings=NetworkSettings(netns_prefix=env.prefix, host_allow="tcp:7001"))
        await nm.start()
        for address in targets:
            out = await _connect(guest, address, 7001)
            print(f"allow tcp:7001: nc {address} 7001: {out.strip()!r}")
            assert server.token in out, out
        assert server.accepted == len(targets)
        assert not await guest.ping("10.100.0.1")
        other = HostServer(env.host, 7002)
        try:
            out = await _connect(guest, "10.100.0.1", 7002)
            assert other.token not in out and other.accepted == 0, out
        finally:
            other.close()
    finally:
        server.close()
        guest.stop()
        await env.nm.teardown_vm(guest.net.vm_id)
