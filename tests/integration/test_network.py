"""The network manager against the kernel: namespaces, links, rules, addresses, real guests.

Root only. Every test makes its own "host" namespace, its own segments namespace and VM
namespace prefix (all named with a per-test token) and removes every namespace carrying that
token in a finally block. Nothing here touches the machine's own network namespace, and test
traffic goes only to addresses inside namespaces the test made.

Guests (marked ``guest``): the default guest image under QEMU microvm (TCG), started by the
test inside the VM's namespace. To run commands in a guest without changing its image, the
test appends a second cpio archive to the initrd (the kernel unpacks concatenated archives)
holding ``/test-init``; booted with ``rdinit=/test-init`` it starts a shell on a second serial
port (ttyS1, an ISA UART the test adds, wired to a unix socket only the test can reach) and
then execs the image's own ``/init``, which runs as PID 1 exactly as always.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gzip
import io
import itertools
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from metald.assets.store import LocalAssetStore
from metald.core.errors import InvalidArgument, MetaldError, ResourceExhausted
from metald.host import named_netns as netns
from metald.host.cpu import host_tsc_khz
from metald.network import (
    NetworkManager,
    NetworkMode,
    NetworkRequest,
    NetworkSettings,
    RateLimit,
    VmNetwork,
    links,
)
from metald.network.manager import SETUP_STEPS
from metald.network.models import IPv4, IPv6
from metald.store.addresses import SqlAddressBook
from metald.store.database import Database

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, netlink)")

STORE_DIR = Path(os.environ.get("METALD_TEST_ASSETS", Path(__file__).parents[2] / "var" / "assets"))
BOOT_TIMEOUT = 120.0
MIB = 1024 * 1024
_counter = itertools.count()


# Environment ------------------------------------------------------------------------------


@dataclass
class Env:
    token: str
    host: str
    segments: str
    prefix: str
    url: str
    tmp: Path
    database: Database
    book: SqlAddressBook
    nm: NetworkManager
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def manager(self, **kw: Any) -> NetworkManager:
        settings = kw.pop("settings", NetworkSettings(netns_prefix=self.prefix))
        return NetworkManager(self.host, self.book, settings, segments_netns=self.segments, **kw)

    async def state(self, nm: NetworkManager | None = None) -> dict[str, Any]:
        """Everything that must be as before after a clean teardown."""
        snap: dict[str, Any] = dict(await (nm or self.nm).snapshot())
        snap["allocations"] = sorted((a.vm_id, a.address) for a in await self.book.all())
        snap["all_netns"] = sorted(n for n in netns.list_names() if n.startswith(self.token))
        return snap


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    token = f"mtn{os.getpid()}t{next(_counter)}."
    host = token + "host"
    url = f"sqlite+aiosqlite:///{tmp_path / 'metald.db'}"
    database = Database(url)
    await database.migrate()
    netns.create(host)
    e = Env(
        token=token,
        host=host,
        segments=token + "seg",
        prefix=token + "vm-",
        url=url,
        tmp=tmp_path,
        database=database,
        book=SqlAddressBook(database),
        nm=None,  # type: ignore[arg-type]
    )
    try:
        e.nm = e.manager()
        await e.nm.start()
        yield e
    finally:
        for proc in e.processes:  # only processes this test started, by pid
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(Exception):
                proc.wait(timeout=10)
        for name in netns.list_names():
            if name.startswith(token):
                netns.remove(name)
        await e.database.close()


def in_ns(ns: str, fn: Callable[[], Any]) -> Any:
    """Run fn on a fresh thread that has entered the namespace (a child process it starts
    is born there)."""
    out: list[Any] = []

    def run() -> None:
        try:
            with netns.entered(ns):
                out.append(fn())
        except BaseException as exc:
            out.append(exc)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if isinstance(out[0], BaseException):
        raise out[0]
    return out[0]


def popen_in(env: Env, ns: str, argv: list[str], **kw: Any) -> subprocess.Popen[bytes]:
    proc: subprocess.Popen[bytes] = in_ns(ns, lambda: subprocess.Popen(argv, **kw))
    env.processes.append(proc)
    return proc


async def run_in(env: Env, ns: str, argv: list[str], timeout: float = 30) -> tuple[int, str]:
    proc = popen_in(env, ns, argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = await asyncio.to_thread(proc.communicate, timeout=timeout)
    return proc.returncode, out.decode(errors="replace")


async def host_ping(env: Env, address: str) -> bool:
    rc, _ = await run_in(env, env.host, ["ping", "-c", "1", "-W", "3", address])
    return rc == 0


async def inspect(fn: Callable[[], Any]) -> Any:
    """Run blocking pyroute2 code in a worker thread (a sync IPRoute cannot be opened on a
    thread whose event loop is running)."""
    return await asyncio.to_thread(fn)


def machine_forwarding() -> tuple[str, str]:
    return (
        Path("/proc/sys/net/ipv4/ip_forward").read_text(),
        Path("/proc/sys/net/ipv6/conf/all/forwarding").read_text(),
    )


async def set_host_sysctls(env: Env, values: dict[str, str]) -> None:
    """Write sysctls of the test's host namespace, from a process living wholly inside it."""
    script = "; ".join(f"echo {v} > /proc/sys/net/{k}" for k, v in values.items())
    before = machine_forwarding()
    rc, out = await run_in(env, env.host, ["sh", "-c", "set -e; " + script])
    assert rc == 0, out
    assert machine_forwarding() == before, "the machine's own namespace must not change"


# Host side --------------------------------------------------------------------------------


async def test_start_builds_the_host_bridge_and_is_idempotent(env: Env) -> None:
    await env.nm.start()

    def look() -> tuple[set[str], list[links.Rule]]:
        with links.rtnl(env.host) as ipr:
            bridge = links.get_link(ipr, "br-vms")
            assert bridge is not None and bridge.kind == "bridge"
            addrs = {
                f"{a.get('IFA_ADDRESS')}/{a['prefixlen']}"
                for a in ipr.addr("dump", index=bridge.index)
                if a["scope"] == 0
            }
            return addrs, links.list_rules(ipr, socket.AF_INET) + links.list_rules(
                ipr, socket.AF_INET6
            )

    addrs, rules = await inspect(look)
    assert addrs == {"10.100.0.1/16", "fd00::1/64"}
    ours = [r for r in rules if r.priority in (1000, 1001)]
    assert len(ours) == 4, ours  # one pair per family, not doubled by the second start()
    assert await env.nm.snapshot() == {
        "netns": [],
        "host_links": ["br-vms", "lo"],
        "neighbours": [],
        "fdb": [],
        "segment_links": ["lo"],
    }


async def test_vm_network_layout(env: Env) -> None:
    net = await env.nm.setup_vm("vm-a", "acme")
    assert net.netns == env.prefix + "vm-a"
    assert net.ipv4 is not None and str(net.ipv4) == "10.100.0.2/16"
    assert net.ipv6 is not None and str(net.ipv6) == "fd00::2/64"
    assert net.mode == NetworkMode.DUAL_STACK
    tap = await env.nm.create_tap("vm-a", 4242, 4343)
    assert tap == net.tap and len(tap) <= 15

    def look() -> None:
        with links.rtnl(env.host) as host:
            bridge = links.get_link(host, "br-vms")
            assert bridge is not None
            uplink = [p for p in links.ports_of(host, bridge.index) if p.name.startswith("ub-")]
            assert len(uplink) == 1
            assert links.brport_flags(host, uplink[0].name) == {
                "isolated": 1,
                "learning": 0,
                "unicast_flood": 0,
                "mcast_flood": 0,
                "bcast_flood": 0,
            }
            assert links.static_fdb(host, bridge.index) == [
                links.FdbEntry(mac=net.mac, port=uplink[0].index)
            ]
            assert sorted(links.permanent_neighbours(host, bridge.index), key=str) == sorted(
                [links.Neighbour("10.100.0.2", net.mac), links.Neighbour("fd00::2", net.mac)],
                key=str,
            )
        with links.rtnl(env.segments) as seg:
            bc = links.get_link(seg, net.customer_bridge)
            assert bc is not None and bc.alias == "metald-customer:acme"
            ports = sorted(p.name for p in links.ports_of(seg, bc.index))
            assert ports == sorted([net.host_veth, "uc-" + net.customer_bridge[3:]])
            vh = links.get_link(seg, net.host_veth)
            assert vh is not None and vh.alias == f"metald-vm:vm-a mac={net.mac}"
            # Nothing in the segments namespace has an address.
            assert [a for a in seg.addr("dump")] == []
        with links.rtnl(net.netns) as vm:
            vb = links.get_link(vm, net.vm_bridge)
            assert vb is not None
            assert sorted(p.name for p in links.ports_of(vm, vb.index)) == sorted(
                [net.vm_veth, tap]
            )
            t = links.get_link(vm, tap)
            assert t is not None and t.kind == "tun"

    await inspect(look)


async def test_a_tap_made_the_jailer_way_joins_the_vm_bridge(env: Env) -> None:
    net = await env.nm.setup_vm("jailed", "acme")

    def as_the_jailer() -> None:
        # What the jailer does after entering the VM's namespace (step 2).
        links.create_tap_here(net.tap, 4242, 4343)
        links.attach_tap_here(net.tap)

    await asyncio.to_thread(in_ns, net.netns, as_the_jailer)

    def look() -> tuple[int, int, str]:
        with links.rtnl(net.netns) as vm:
            tap = links.get_link(vm, net.tap)
            vb = links.get_link(vm, net.vm_bridge)
            assert tap is not None and vb is not None
            return tap.master, vb.index, tap.kind

    master, bridge, kind = await inspect(look)
    assert (master, kind) == (bridge, "tun")
    await env.nm.teardown_vm("jailed")


async def test_concurrent_setups_and_teardowns(env: Env) -> None:
    before = await env.state()
    ids = [(f"par-{i}", f"cust-{i % 2}") for i in range(12)]
    nets = await asyncio.gather(*(env.nm.setup_vm(v, c) for v, c in ids))
    assert len({n.ipv4 for n in nets}) == len({n.ipv6 for n in nets}) == len(ids)
    snap = await env.nm.snapshot()
    assert len(snap["fdb"]) == len(ids) and len(snap["neighbours"]) == 2 * len(ids)
    await asyncio.gather(*(env.nm.teardown_vm(v) for v, _ in ids))
    assert await env.state() == before


async def test_modes_and_static_addresses(env: Env) -> None:
    v4 = await env.nm.setup_vm("v4", "c", NetworkRequest(mode=NetworkMode.IPV4_ONLY))
    assert v4.ipv6 is None and v4.gateway6 is None and v4.dns6 == ()
    assert v4.guest_args().ip6 == ""
    v6 = await env.nm.setup_vm("v6", "c", NetworkRequest(mode=NetworkMode.IPV6_ONLY))
    assert v6.ipv4 is None and v6.network_info().ipv6 == IPv6("fd00::2")
    fixed = await env.nm.setup_vm(
        "fixed", "c", NetworkRequest(ipv4=IPv4("10.100.9.9"), mac="02:12:34:56:78:9a")
    )
    assert fixed.ipv4 is not None and str(fixed.ipv4.ip) == "10.100.9.9"
    assert fixed.mac == "02:12:34:56:78:9a"
    assert fixed.ipv6 is not None and str(fixed.ipv6.ip) == "fd00::3"
    # A second set-up of an existing VM completes and returns the same network.
    assert (
        await env.nm.setup_vm(
            "fixed", "c", NetworkRequest(ipv4=IPv4("10.100.9.9"), mac="02:12:34:56:78:9a")
        )
        == fixed
    )
    assert await env.nm.describe_vm("fixed", "c") == fixed
    assert await env.nm.describe_vm("nope", "c") is None


async def test_conflicts_are_typed_and_leave_nothing(env: Env) -> None:
    await env.nm.setup_vm(
        "first", "c1", NetworkRequest(ipv4=IPv4("10.100.9.9"), mac="02:00:00:00:00:99")
    )
    before = await env.state()
    with pytest.raises(ResourceExhausted, match="in use"):
        await env.nm.setup_vm("second", "c2", NetworkRequest(ipv4=IPv4("10.100.9.9")))
    assert await env.state() == before
    for customer in ("c1", "c2"):  # same segment or another one
        with pytest.raises(ResourceExhausted, match="mac_address"):
            await env.nm.setup_vm("third", customer, NetworkRequest(mac="02:00:00:00:00:99"))
        assert await env.state() == before
    with pytest.raises(InvalidArgument):
        await env.nm.setup_vm("fourth", "c1", NetworkRequest(ipv4=IPv4("10.200.0.5")))
    with pytest.raises(InvalidArgument):
        await env.nm.setup_vm("Bad_Id", "c1")
    assert await env.state() == before


async def test_a_tiny_subnet_runs_out(env: Env) -> None:
    settings = NetworkSettings(
        netns_prefix=env.prefix,
        bridge_ipv4="192.168.77.1/29",
        vm_subnet_ipv4="192.168.77.0/29",
        ipv6_enabled=False,
    )
    await env.nm.remove_host_network()
    nm = env.manager(settings=settings)
    await nm.start()
    baseline = await env.state(nm)
    nets = [await nm.setup_vm(f"t{i}", "c") for i in range(5)]
    assert [str(n.ipv4.ip) for n in nets if n.ipv4] == [f"192.168.77.{i}" for i in range(2, 7)]
    before = await env.state(nm)
    with pytest.raises(ResourceExhausted, match="no free IPv4"):
        await nm.setup_vm("t5", "c")
    assert await env.state(nm) == before
    for i in range(5):
        await nm.teardown_vm(f"t{i}")
    assert await env.state(nm) == baseline


@pytest.mark.parametrize("step", SETUP_STEPS)
@pytest.mark.parametrize("segment_exists", [False, True])
async def test_a_failure_at_any_step_leaves_nothing(
    env: Env, step: str, segment_exists: bool
) -> None:
    if segment_exists:
        await env.nm.setup_vm("neighbour", "acme")
    before = await env.state()

    def hook(name: str) -> None:
        if name == step:
            raise MetaldError(f"injected failure at {name}")

    nm = env.manager(step_hook=hook)
    with pytest.raises(MetaldError, match="injected"):
        await nm.setup_vm("victim", "acme", NetworkRequest(rx=RateLimit(MIB), tx=RateLimit(MIB)))
    assert await env.state() == before
    # The same VM can be set up afterwards, and torn down to the same state.
    await env.nm.setup_vm("victim", "acme")
    await env.nm.teardown_vm("victim")
    assert await env.state() == before


async def test_a_cancelled_setup_leaves_nothing(env: Env) -> None:
    before = await env.state()
    entered, release = threading.Event(), threading.Event()

    def hook(name: str) -> None:
        if name == "fdb":  # inside the worker thread, with links half made
            entered.set()
            release.wait(10)

    nm = env.manager(step_hook=hook)
    task = asyncio.create_task(nm.setup_vm("victim", "acme"))
    assert await asyncio.to_thread(entered.wait, 10)
    task.cancel()
    await asyncio.sleep(0.2)
    assert not task.done(), "the set-up waits for its worker thread before undoing"
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await env.state() == before


async def test_thirty_vms_come_and_go_without_a_trace(env: Env) -> None:
    before = await env.state()
    modes = [NetworkMode.DUAL_STACK, NetworkMode.IPV4_ONLY, NetworkMode.IPV6_ONLY]
    setup_times: list[float] = []
    teardown_times: list[float] = []

    async def one_round(interleaved: bool) -> None:
        ids = [f"loop-{i}" for i in range(30)]
        nets: list[VmNetwork] = []
        for i, vm_id in enumerate(ids):
            t = time.perf_counter()
            nets.append(
                await env.nm.setup_vm(vm_id, f"cust-{i % 3}", NetworkRequest(mode=modes[i % 3]))
            )
            setup_times.append(time.perf_counter() - t)
            if i % 5 == 0:
                await env.nm.create_tap(vm_id, 0, 0)
            if interleaved:
                t = time.perf_counter()
                await env.nm.teardown_vm(vm_id)
                teardown_times.append(time.perf_counter() - t)
        if not interleaved:
            addresses = [str(n.ipv4.ip) for n in nets if n.ipv4] + [
                str(n.ipv6.ip) for n in nets if n.ipv6
            ]
            assert len(addresses) == len(set(addresses)) == 40
            snap = await env.nm.snapshot()
            assert len(snap["netns"]) == 30
            assert len(snap["neighbours"]) == 40
            assert len(snap["fdb"]) == 30
            assert len([n for n in snap["segment_links"] if n.startswith("bc-")]) == 3
            for vm_id in ids:
                t = time.perf_counter()
                await env.nm.teardown_vm(vm_id)
                teardown_times.append(time.perf_counter() - t)
        assert await env.state() == before

    await one_round(interleaved=False)
    await one_round(interleaved=True)
    await env.nm.teardown_vm("loop-0")  # idempotent
    assert await env.state() == before

    def summary(xs: list[float]) -> str:
        xs = sorted(xs)
        return f"median {xs[len(xs) // 2] * 1000:.1f} ms, max {xs[-1] * 1000:.1f} ms"

    print(f"\nper-VM network set-up: {summary(setup_times)}; teardown: {summary(teardown_times)}")


async def test_rate_limits_are_tbf_on_the_veth_pair(env: Env) -> None:
    net = await env.nm.setup_vm("limited", "c", NetworkRequest(rx=RateLimit(MIB)))

    def qdiscs() -> tuple[Any, Any]:
        with links.rtnl(env.segments) as seg, links.rtnl(net.netns) as vm:
            vh = links.get_link(seg, net.host_veth)
            vg = links.get_link(vm, net.vm_veth)
            assert vh is not None and vg is not None
            return links.root_qdisc(seg, vh.index), links.root_qdisc(vm, vg.index)

    default = (None, ("noqueue", 0, 0))
    rx, tx = await inspect(qdiscs)
    assert rx == ("tbf", MIB, 0) and tx in default
    await env.nm.apply_rate_limit("limited", RateLimit(2 * MIB), RateLimit(3 * MIB))
    assert await inspect(qdiscs) == (("tbf", 2 * MIB, 0), ("tbf", 3 * MIB, 0))
    await env.nm.apply_rate_limit("limited", None, None)
    rx, tx = await inspect(qdiscs)
    assert rx in default and tx in default


async def test_restart_keeps_networks_and_addresses(env: Env) -> None:
    kept = await env.nm.setup_vm("kept", "c")
    # A new metald: new manager, new connection to the same database.
    await env.database.close()
    env.database = Database(env.url)
    env.book = SqlAddressBook(env.database)
    nm = env.manager()
    await nm.start()
    assert await nm.remove_orphans({"kept"}) == []
    assert await nm.describe_vm("kept", "c") == kept
    other = await nm.setup_vm("other", "c")
    assert other.ipv4 != kept.ipv4 and other.ipv6 != kept.ipv6
    snap = await nm.snapshot()
    assert len(snap["neighbours"]) == 4, "start() on a running host must not flush neighbours"


def lose_name(name: str) -> None:
    """What a daemon killed in a mount namespace of its own leaves: the name's mount is
    gone (only a process inside still holds the namespace), the file stays."""
    path = netns.path_of(name)
    assert netns.exists(name)
    while libc.umount2(str(path).encode(), 2) == 0:  # MNT_DETACH
        pass
    assert path.exists() and netns.is_stale(name) and not netns.exists(name)


libc = ctypes.CDLL(None, use_errno=True)


async def test_a_stale_name_is_never_taken_for_a_namespace(env: Env) -> None:
    name = env.token + "stale"
    netns.path_of(name).touch()  # an empty file where a name was
    assert netns.is_stale(name) and not netns.exists(name)
    with pytest.raises(netns.NamespaceError, match="was lost"), netns.entered(name):
        pass
    assert netns.create(name), "a stale name is replaced by a new namespace"
    assert netns.exists(name) and not netns.is_stale(name)
    assert netns.remove(name) and not netns.path_of(name).exists()


async def test_a_lost_name_is_taken_back_from_a_process_inside(env: Env) -> None:
    name = env.token + "held"
    netns.create(name)
    holder = popen_in(env, name, ["sleep", "300"])
    inside = os.stat(f"/proc/{holder.pid}/ns/net").st_ino
    lose_name(name)
    assert netns.attach(name, holder.pid)
    assert netns.exists(name) and netns.ns_identity(name)[1] == inside
    assert not netns.attach(name, holder.pid), "already named: nothing to do"


async def test_a_restart_after_names_were_lost_rebuilds_the_networks(env: Env) -> None:
    """The segments namespace and a VM's name lost (its VMM alive inside), another VM's
    namespace lost altogether: start() does not fail, and adopting the VMs makes their
    networks whole, with the same addresses and MACs."""
    held = await env.nm.setup_vm("held", "c")
    gone = await env.nm.setup_vm("gone", "c")
    vmm = popen_in(env, held.netns, ["sleep", "300"])  # stands for the VMM
    inside = os.stat(f"/proc/{vmm.pid}/ns/net").st_ino
    # The kernel cleans up a namespace that lost its last reference some time later, and
    # only then do its veth ends (and so their peers in the VM and host namespaces) go:
    # keep the old segments namespace alive, so the rebuild meets the peers still there.
    popen_in(env, env.segments, ["sleep", "300"])
    for name in (env.segments, held.netns, gone.netns):
        lose_name(name)

    nm = env.manager()
    await nm.start()  # it used to fail: setns <segments namespace>: Invalid argument
    assert netns.exists(env.segments)
    assert await nm.adopt_vm("held", "c", NetworkRequest(), vmm.pid) == held
    assert netns.ns_identity(held.netns)[1] == inside, "not the VMM's namespace"
    assert await nm.adopt_vm("gone", "c", NetworkRequest(), None) == gone
    assert await nm.remove_orphans({"held", "gone"}) == []
    snap = await nm.snapshot()
    for net in (held, gone):
        assert net.host_veth in snap["segment_links"]
        assert await nm.describe_vm(net.vm_id, "c") == net
    # Adopting a whole network changes nothing.
    assert await nm.adopt_vm("held", "c", NetworkRequest(), vmm.pid) == held
    assert await nm.snapshot() == snap
    for net in (held, gone):
        await nm.teardown_vm(net.vm_id)
    assert not any(n.startswith(env.prefix) for n in netns.list_names())


async def test_remove_orphans(env: Env) -> None:
    baseline = await env.state()
    await env.nm.setup_vm("known", "c1")
    with_known = await env.state()
    await env.nm.setup_vm("orphan-a", "c1")
    await env.nm.setup_vm("orphan-b", "c2")
    await env.nm.create_tap("orphan-b", 0, 0)
    # Leftovers of a set-up that died half-way: a namespace with nothing in it, a host end
    # without its alias, an allocation without any network.
    netns.create(env.prefix + "half")

    def half_made_veth() -> None:
        with links.rtnl(env.segments) as seg:
            links.add_veth(seg, "vh-0123456789ab", "vg-0123456789ab", env.segments)

    await inspect(half_made_veth)
    assert await env.book.claim("ghost", 4, "10.100.50.50")

    gone = await env.nm.remove_orphans({"known"})
    assert {"vm orphan-a", "vm orphan-b", "vm half", "vm ghost", "link vh-0123456789ab"} <= set(
        gone
    ), gone
    assert await env.state() == with_known
    assert await env.nm.remove_orphans({"known"}) == []
    await env.nm.remove_orphans(set())
    assert await env.state() == baseline


# Guests -----------------------------------------------------------------------------------

TEST_INIT = b"""#!/bin/sh
# Test-only wrapper around the image's init (see tests/integration/test_network.py).
[ -d /proc/self ] || mount -t proc proc /proc
[ -c /dev/null ] || mount -t devtmpfs devtmpfs /dev
(
    while :; do
        # A non-interactive shell reading the UART line by line (an interactive busybox
        # shell leaves when a background job ends); its output goes back over the UART.
        setsid sh -c 'stty -echo -onlcr clocal; sh 2>&1 </dev/ttyS1 | cat' \\
            </dev/ttyS1 >/dev/ttyS1 2>&1
        sleep 0.5
    done
) &
exec /init
"""
SINK = b"#!/bin/sh\nexec cat >/dev/null\n"
# Writes straight into the socket nc hands it (nc's own copy loop is slow under TCG).
SOURCE = b"#!/bin/sh\nexec dd if=/dev/zero bs=65536 count=$(cat /tmp/source-blocks) 2>/dev/null\n"


def newc(entries: list[tuple[str, int, bytes]]) -> bytes:
    """A gzip'd cpio archive (newc format) of regular files."""
    out = io.BytesIO()
    for ino, (name, mode, data) in enumerate([*entries, ("TRAILER!!!", 0, b"")], start=1000):
        encoded = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0)
        out.write(b"070701" + "".join(f"{v:08x}" for v in fields).encode() + encoded)
        out.write(b"\0" * (-(110 + len(encoded)) % 4))
        out.write(data + b"\0" * (-len(data) % 4))
    return gzip.compress(out.getvalue())


@pytest.fixture(scope="module")
def guest_boot(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed (Debian package qemu-system-x86)")
    store = LocalAssetStore(STORE_DIR)
    if store.default() is None:
        pytest.skip(f"no default guest image in {STORE_DIR} (metald assets build)")
    kernel, initrd = store.default_boot()
    assert initrd is not None
    combined = tmp_path_factory.mktemp("guest") / "initrd-with-test-shell"
    combined.write_bytes(
        initrd.read_bytes()
        + newc(
            [
                ("test-init", stat.S_IFREG | 0o755, TEST_INIT),
                ("bin/test-sink", stat.S_IFREG | 0o755, SINK),
                ("bin/test-source", stat.S_IFREG | 0o755, SOURCE),
            ]
        )
    )
    return kernel, combined


class Guest:
    def __init__(self, env: Env, net: VmNetwork, boot: tuple[Path, Path]) -> None:
        self.env, self.net, self.boot = env, net, boot
        self.dir = env.tmp / net.vm_id
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.n = 0

    def start(self) -> None:
        self.dir.mkdir()
        kernel, initrd = self.boot
        append = (
            f"console=ttyS0 panic=-1 quiet reboot=t tsc_early_khz={host_tsc_khz()} "
            f"tsc=reliable rdinit=/test-init metald.vm_id={self.net.vm_id} "
            + self.net.guest_args().render()
        )
        argv = [
            "qemu-system-x86_64",
            "-M", "microvm,x-option-roms=off,rtc=off",
            "-device", "i8042",
            "-accel", "tcg", "-cpu", "max", "-m", "256", "-smp", "1",
            "-nodefaults", "-no-user-config", "-nographic", "-display", "none",
            "-chardev", f"file,id=con0,path={self.dir}/console.log",
            "-serial", "chardev:con0",
            "-chardev", f"socket,id=sh0,path={self.dir}/shell.sock,server=on,wait=off",
            "-device", "isa-serial,chardev=sh0,iobase=0x2f8,irq=3",
            "-netdev", f"tap,id=n0,ifname={self.net.tap},script=no,downscript=no",
            "-device", f"virtio-net-device,netdev=n0,mac={self.net.mac}",
            "-kernel", str(kernel), "-initrd", str(initrd), "-append", append,
        ]  # fmt: skip
        self.proc = popen_in(
            self.env,
            self.net.netns,
            argv,
            stdin=subprocess.DEVNULL,
            stdout=(self.dir / "qemu.out").open("wb"),
            stderr=subprocess.STDOUT,
        )

    async def ready(self) -> None:
        log = self.dir / "console.log"
        deadline = time.monotonic() + BOOT_TIMEOUT
        while time.monotonic() < deadline:
            text = log.read_text(errors="replace") if log.exists() else ""
            if "METALD-GUEST READY" in text:
                assert "METALD-GUEST NET" in text, text[-2000:]
                self.reader, self.writer = await asyncio.open_unix_connection(
                    str(self.dir / "shell.sock")
                )
                return
            if self.proc.poll() is not None:
                raise AssertionError((self.dir / "qemu.out").read_text() + text[-2000:])
            await asyncio.sleep(0.2)
        raise AssertionError(f"{self.net.vm_id} did not boot: {text[-2000:]}")

    async def sh(self, command: str, timeout: float = 60) -> tuple[int, str]:
        """Run one shell command line in the guest; (exit status, output)."""
        assert self.reader is not None and self.writer is not None
        self.n += 1
        tag = f"END{self.n}X"
        self.writer.write(f"{command}\necho {tag}=$?\n".encode())
        await self.writer.drain()
        buf = b""
        pattern = re.compile(rf"{tag}=(\d+)\n".encode())
        async with asyncio.timeout(timeout):
            while (m := pattern.search(buf)) is None:
                chunk = await self.reader.read(65536)
                if not chunk:
                    raise EOFError(buf)
                buf += chunk
        return int(m.group(1)), buf[: m.start()].decode(errors="replace")

    async def ping(self, address: str) -> bool:
        rc, _ = await self.sh(f"ping -c 1 -W 2 {address} >/dev/null 2>&1")
        return rc == 0

    def stop(self) -> None:
        if self.writer is not None:
            self.writer.close()
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)


async def start_guests(
    env: Env, boot: tuple[Path, Path], vms: list[tuple[str, str]]
) -> list[Guest]:
    guests = []
    for vm_id, customer in vms:
        net = await env.nm.setup_vm(vm_id, customer)
        await env.nm.create_tap(vm_id, 0, 0)
        guest = Guest(env, net, boot)
        guest.start()
        guests.append(guest)
    for guest in guests:
        await guest.ready()
    return guests


def addresses(g: Guest) -> list[str]:
    assert g.net.ipv4 is not None and g.net.ipv6 is not None
    return [str(g.net.ipv4.ip), str(g.net.ipv6.ip)]


@pytest.mark.guest
async def test_guests_reach_the_host_and_only_their_own_customer(
    env: Env, guest_boot: tuple[Path, Path]
) -> None:
    guests = await start_guests(
        env, guest_boot, [("a1", "cust-a"), ("a2", "cust-a"), ("b1", "cust-b")]
    )
    a1, a2, b1 = guests
    try:
        # The host (gateway) reaches every guest over IPv4 and IPv6.
        for g in guests:
            for address in addresses(g):
                assert await host_ping(env, address), f"host -> {g.net.vm_id} {address}"
        # One customer's guests reach each other; another customer's reach neither.
        for src, dst, expected in [
            (a1, a2, True),
            (a2, a1, True),
            (b1, a1, False),
            (b1, a2, False),
            (a1, b1, False),
            (a2, b1, False),
        ]:
            for address in addresses(dst):
                got = await src.ping(address)
                assert got == expected, f"{src.net.vm_id} -> {dst.net.vm_id} {address}: {got}"

        # Through the gateway instead of on-link: even with forwarding turned on in the host
        # namespace, the policy rule refuses to route between guest addresses.
        a1v4, a1v6 = addresses(a1)
        b1v4, b1v6 = addresses(b1)
        for g, peer4, peer6 in ((b1, a1v4, a1v6), (a1, b1v4, b1v6)):
            rc, out = await g.sh(
                f"ip route add {peer4}/32 via 10.100.0.1 && ip -6 route add {peer6}/128 via fd00::1"
            )
            assert rc == 0, out
        await set_host_sysctls(
            env,
            {
                "ipv4/ip_forward": "1",
                "ipv6/conf/all/forwarding": "1",
                "ipv4/conf/all/send_redirects": "0",
                "ipv4/conf/br-vms/send_redirects": "0",
            },
        )
        assert not await b1.ping(a1v4)
        assert not await b1.ping(a1v6)
        # Without the rules the same path would work: the rule is what stops it.

        def drop_rules() -> None:
            with links.rtnl(env.host) as ipr:
                for rule in env.nm.host_side.rules:
                    links.delete_rule(ipr, rule)

        await inspect(drop_rules)
        assert await b1.ping(a1v4), "the forwarding path exists (so the rule is what blocks)"
        await env.nm.start()  # puts the rules back
        assert not await b1.ping(a1v4)
        await set_host_sysctls(env, {"ipv4/ip_forward": "0", "ipv6/conf/all/forwarding": "0"})

        stats = await env.nm.stats("a1")
        assert stats.bytes_received > 0 and stats.bytes_transmitted > 0
    finally:
        for g in guests:
            g.stop()
        for g in guests:
            await env.nm.teardown_vm(g.net.vm_id)


async def send_into(env: Env, address: str, port: int, nbytes: int) -> float:
    """Bytes per second of a TCP transfer from the host namespace into the guest (until the
    guest has read everything and closed)."""

    def transfer() -> float:
        sock: socket.socket = in_ns(env.host, lambda: socket.socket())
        with sock:
            for _ in range(100):
                try:
                    sock.connect((address, port))
                    break
                except OSError:
                    time.sleep(0.1)
            chunk = b"\0" * 65536
            start = time.perf_counter()
            for _ in range(nbytes // len(chunk)):
                sock.sendall(chunk)
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(65536):
                pass
            return nbytes / (time.perf_counter() - start)

    return await asyncio.to_thread(transfer)


async def receive_from(env: Env, guest: Guest, nbytes: int) -> float:
    """Bytes per second of a TCP transfer from the guest into the host namespace."""
    blocks = nbytes // 65536
    rc, out = await guest.sh(
        f"echo {blocks} > /tmp/source-blocks && "
        "nc -l -p 5002 -e /bin/test-source </dev/null >/dev/null 2>&1 &"
    )
    assert rc == 0, out
    address = addresses(guest)[0]

    def transfer() -> float:
        sock: socket.socket = in_ns(env.host, lambda: socket.socket())
        with sock:
            for _ in range(100):
                try:
                    sock.connect((address, 5002))
                    break
                except OSError:
                    time.sleep(0.1)
            start = time.perf_counter()
            got = 0
            while chunk := sock.recv(65536):
                got += len(chunk)
            assert got == blocks * 65536
            return got / (time.perf_counter() - start)

    return await asyncio.to_thread(transfer)


@pytest.mark.guest
async def test_rate_limits_hold_within_20_percent(env: Env, guest_boot: tuple[Path, Path]) -> None:
    (guest,) = await start_guests(env, guest_boot, [("rl", "cust-r")])
    address = addresses(guest)[0]
    try:

        async def into(nbytes: int) -> float:
            rc, out = await guest.sh("nc -l -p 5001 -e /bin/test-sink </dev/null >/dev/null 2>&1 &")
            assert rc == 0, out
            return await send_into(env, address, 5001, nbytes)

        unlimited_in = await into(32 * MIB)
        unlimited_out = await receive_from(env, guest, 16 * MIB)
        await env.nm.apply_rate_limit("rl", RateLimit(MIB), RateLimit(MIB))
        limited_in = await into(8 * MIB)
        limited_out = await receive_from(env, guest, 6 * MIB)
        await env.nm.apply_rate_limit("rl", None, None)
        again_in = await into(32 * MIB)
        print(
            f"\ninto the guest: unlimited {unlimited_in / MIB:.1f} MiB/s, "
            f"limited to 1 MiB/s: {limited_in / MIB:.3f} MiB/s, lifted {again_in / MIB:.1f} MiB/s"
            f"\nfrom the guest: unlimited {unlimited_out / MIB:.1f} MiB/s, "
            f"limited to 1 MiB/s: {limited_out / MIB:.3f} MiB/s"
        )
        for limited in (limited_in, limited_out):
            assert 0.8 * MIB <= limited <= 1.2 * MIB
        for unlimited in (unlimited_in, unlimited_out, again_in):
            assert unlimited > 4 * MIB
    finally:
        guest.stop()
        await env.nm.teardown_vm("rl")
