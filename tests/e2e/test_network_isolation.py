"""Issue 3 through the daemon, seen from inside the guests and across the daemon's life:
tenant isolation between guests (commands run in the guests over the guest agent port), the
rx and tx rate limits measured by transfers into and out of a guest, 30 networked VMs created
and deleted leaving nothing, restart reconciliation of a VM whose VMM died with the daemon and
of a stray namespace, the daemon run inside a namespace the test made (so its bridge is there,
never in the machine's own namespace), and two daemons side by side.

Every packet goes between namespaces a daemon of this test made (or the test itself made);
the machine's own network namespace is only ever read.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import IPRoute, NetNS, netns

from metald.assets.guest_agent import GuestAgent

from ._support import (
    ASSETS,
    METALD,
    MIB,
    SERVICE,
    Caller,
    Console,
    CurlConnect,
    Daemon,
    client_env,
    free_port,
    pid_alive,
    qemu_processes,
    reap,
    state_name,
    wait_pid_gone,
    wait_until,
)

pytestmark = pytest.mark.guest

NIC: dict[str, Any] = {"id": "eth0", "mode": "NETWORK_MODE_DUAL_STACK"}
BOOT_TIMEOUT = 120.0


def _config(network: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    config: dict[str, Any] = {"memory": {"size_bytes": 128 * MIB}}
    if network is not None:
        config["network"] = network
    return config


def _in_ns(ns: str, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", ns, *argv],
        capture_output=True, text=True, timeout=timeout, check=False, env=client_env(),
    )  # fmt: skip


def _net_line(console: Console) -> tuple[str, str] | None:
    """(ip4, ip6) from the guest's `METALD-GUEST NET eth0 ip4=... ip6=...` console line."""
    for line in console.text().splitlines():
        if line.startswith("METALD-GUEST NET") and "ip4=" in line and "ip6=" in line:
            ip4 = line.split("ip4=")[1].split()[0].split("/")[0]
            ip6 = line.split("ip6=")[1].split()[0].split("/")[0]
            return ip4, ip6
    return None


def _wait_net_line(console: Console) -> tuple[str, str]:
    found = wait_until(lambda: _net_line(console), 10, "the guest's NET line")
    assert found is not None
    return found


class Guest:
    """One VM of the test: its id, its addresses, its console and (when booted with the agent)
    the socket of its shell."""

    def __init__(self, call: Caller, vm_id: str) -> None:
        self.call = call
        self.vm_id = vm_id
        info = call.info(vm_id).body
        self.ip4: str = info["network_info"]["ip_address"]
        self.console = Console(Path(info["backend_info"]["console_log"]))
        self.agent_socket = info["backend_info"].get("agent_socket")
        self.ip6 = ""

    @property
    def addresses(self) -> list[str]:
        return [self.ip4, self.ip6]

    def boot(self) -> None:
        self.call.must("BootVm", {"vm_id": self.vm_id})
        wait_until(
            lambda: self.console.ready_count() >= 1, BOOT_TIMEOUT, f"{self.vm_id} READY"
        )  # fmt: skip
        ip4, self.ip6 = _wait_net_line(self.console)
        assert ip4 == self.ip4, (ip4, self.ip4)


def _create(call: Caller, vm_id: str, nic: dict[str, Any] | None = None) -> Guest:
    call.must("CreateVm", {"vm_id": vm_id, "config": _config([nic or NIC])})
    return Guest(call, vm_id)


def _boot_all(guests: list[Guest]) -> float:
    """Boot in parallel (TCG boots are slow); the wall time."""
    start = time.monotonic()
    with ThreadPoolExecutor(len(guests)) as pool:
        for f in [pool.submit(g.boot) for g in guests]:
            f.result()
    return time.monotonic() - start


def _delete_all(guests: list[Guest]) -> None:
    for g in guests:
        g.call("DeleteVm", {"vm_id": g.vm_id, "force": True})


async def _agents(guests: list[Guest]) -> list[GuestAgent]:
    assert all(g.agent_socket for g in guests), "no agent_socket in backend_info"
    return list(await asyncio.gather(*(GuestAgent.connect(Path(g.agent_socket)) for g in guests)))


def _allocations(daemon: Daemon) -> list[tuple[Any, ...]]:
    con = sqlite3.connect(f"file:{daemon.db_path}?mode=ro", uri=True, timeout=10)
    try:
        return sorted(con.execute("SELECT * FROM ip_allocations").fetchall(), key=repr)
    finally:
        con.close()


def _link_names(ns: str | None) -> set[str]:
    if ns is None:
        with IPRoute() as ipr:
            return {link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
    with NetNS(ns) as ipr:
        return {link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}


def _jails(daemon: Daemon) -> set[str]:
    d = daemon.jail_dir / "qemu"
    return set(os.listdir(d)) if d.is_dir() else set()


def _host_view(daemon: Daemon) -> dict[str, Any]:
    """Everything the network and the jailer leave on the host for this daemon."""
    return {
        # Other sessions' daemons may come and go meanwhile: this daemon's namespaces only.
        "netns": sorted(n for n in netns.listnetns() if daemon.host_netns[3:] in n),
        "host links": sorted(_link_names(daemon.host_netns)),
        "segment links": sorted(_link_names(daemon.segments_netns)),
        "jails": sorted(_jails(daemon)),
        "allocations": _allocations(daemon),
    }


# -- 1. isolation, from inside the guests ----------------------------------------------------


def test_guests_reach_their_own_customer_only(
    metald_factory: Callable[..., Daemon],
) -> None:
    daemon = metald_factory(UNKEY_METALD_GUEST_AGENT="true")
    call_a = CurlConnect(daemon.url, "dev_customer_a")
    call_b = CurlConnect(daemon.url, "dev_customer_b")
    guests: list[Guest] = []
    try:
        guests = [_create(call_a, "iso-a1"), _create(call_a, "iso-a2"), _create(call_b, "iso-b1")]
        a1, a2, b1 = guests
        took = _boot_all(guests)
        print(f"\nthree guests booted in parallel in {took:.1f}s")

        # The host namespace reaches all three on both families.
        for g in guests:
            for address in g.addresses:
                ping = _in_ns(daemon.host_netns, "ping", "-c", "2", "-W", "3", address)
                assert ping.returncode == 0, f"host -> {g.vm_id} {address}: {ping.stdout}"

        async def scenario() -> dict[tuple[str, str, str], bool]:
            start = time.monotonic()
            agents = dict(zip([g.vm_id for g in guests], await _agents(guests), strict=True))
            print(f"agents answered in {time.monotonic() - start:.1f}s")

            async def ping(src: Guest, address: str, tries: int) -> bool:
                start = time.monotonic()
                ok = False
                for _ in range(tries):
                    rc, _ = await agents[src.vm_id].run(
                        f"ping -c 1 -W 2 {address} >/dev/null 2>&1", timeout=30
                    )
                    ok = rc == 0
                    if ok:
                        break
                took = time.monotonic() - start
                print(f"  {src.vm_id} -> {address}: {'reply' if ok else 'none'} in {took:.1f}s")
                return ok

            async def from_guest(src: Guest, pairs: list[tuple[Guest, bool]]) -> dict[Any, bool]:
                seen = {}
                # The reachable ones first (warm neighbour caches, settled IPv6 DAD); a pair
                # that must work gets three tries, one that must not gets one.
                for dst, expected in sorted(pairs, key=lambda p: not p[1]):
                    for address in dst.addresses:
                        seen[(src.vm_id, dst.vm_id, address)] = await ping(
                            src, address, 3 if expected else 1
                        )
                return seen

            try:
                results: dict[tuple[str, str, str], bool] = {}
                for part in await asyncio.gather(
                    from_guest(a1, [(a2, True), (b1, False)]),
                    from_guest(a2, [(a1, True), (b1, False)]),
                    from_guest(b1, [(a1, False), (a2, False)]),
                ):
                    results.update(part)
                # The guests do reach their gateway (so a failure above is the policy).
                for g in guests:
                    rc, _ = await agents[g.vm_id].run("ping -c 1 -W 2 10.100.0.1", timeout=30)
                    results[(g.vm_id, "gateway", "10.100.0.1")] = rc == 0
                return results
            finally:
                for agent in agents.values():
                    await agent.close()

        results = asyncio.run(scenario())
        for key, got in sorted(results.items()):
            print(f"  {key[0]} -> {key[1]} {key[2]}: {'reached' if got else 'unreachable'}")
        expected = {
            key: key[1] == "gateway" or (key[0].startswith("iso-a") and key[1].startswith("iso-a"))
            for key in results
        }
        assert results == expected
    finally:
        _delete_all(guests)
    assert not any(n.startswith(daemon.vm_netns_prefix) for n in netns.listnetns())


# -- 2. the rx rate limit, measured ----------------------------------------------------------

# Runs in the daemon's host namespace: send n bytes to address:port, wait until the guest has
# read them all and closed; print bytes per second.
SENDER = """
import socket, sys, time
address, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for _ in range(150):
    s = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET)
    try:
        s.connect((address, port))
        break
    except OSError:
        s.close()
        time.sleep(0.1)
else:
    sys.exit("could not connect")
chunk = bytes(65536)
start = time.perf_counter()
for _ in range(n // len(chunk)):
    s.sendall(chunk)
s.shutdown(socket.SHUT_WR)
while s.recv(65536):
    pass
print(n / (time.perf_counter() - start))
"""
# The other way: connect to address:port, read until the guest closes; bytes per second.
RECEIVER = """
import socket, sys, time
address, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for _ in range(150):
    s = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET)
    try:
        s.connect((address, port))
        break
    except OSError:
        s.close()
        time.sleep(0.1)
else:
    sys.exit("could not connect")
start = time.perf_counter()
got = 0
while chunk := s.recv(65536):
    got += len(chunk)
if got != n:
    sys.exit(f"got {got} bytes, not {n}")
print(got / (time.perf_counter() - start))
"""
# dd writes straight into the socket nc hands it (nc's own copy loop is slow under TCG).
SOURCE_SETUP = (
    "printf '#!/bin/sh\\nexec dd if=/dev/zero bs=65536 count=$(cat /tmp/blocks) 2>/dev/null\\n'"
    " >/tmp/source && chmod +x /tmp/source"
)
SOURCE_LISTEN = "nc -l -p 5002 -e /tmp/source </dev/null >/dev/null 2>&1 &"
SINK_SETUP = (
    "printf '#!/bin/sh\\nexec cat >/dev/null\\n' >/tmp/sink && chmod +x /tmp/sink"
)  # fmt: skip
SINK_LISTEN = "nc -l -p 5001 -e /tmp/sink </dev/null >/dev/null 2>&1 &"


def test_rate_limits_hold_within_20_percent(metald_factory: Callable[..., Daemon]) -> None:
    daemon = metald_factory(UNKEY_METALD_GUEST_AGENT="true")
    call = CurlConnect(daemon.url, "dev_customer_r")
    limited_nic = {**NIC, "rx_rate_limit": {"bandwidth": MIB}, "tx_rate_limit": {"bandwidth": MIB}}
    guests: list[Guest] = []
    try:
        guests = [_create(call, "rl-limited", limited_nic), _create(call, "rl-free")]
        limited, free = guests
        _boot_all(guests)

        def send_into(g: Guest, nbytes: int) -> float:
            out = _in_ns(
                daemon.host_netns, sys.executable, "-c", SENDER, g.ip4, "5001", str(nbytes),
                timeout=60,
            )  # fmt: skip
            assert out.returncode == 0, out.stderr
            return float(out.stdout.strip())

        async def listen(gs: list[Guest]) -> None:
            agents = await _agents(gs)
            try:
                for agent in agents:
                    for command in (SINK_SETUP, SINK_LISTEN):
                        rc, text = await agent.run(command)
                        assert rc == 0, text
            finally:
                for agent in agents:
                    await agent.close()

        def receive_from(g: Guest, nbytes: int) -> float:
            async def serve() -> None:
                (agent,) = await _agents([g])
                try:
                    for command in (
                        f"echo {nbytes // 65536} >/tmp/blocks",
                        SOURCE_SETUP,
                        SOURCE_LISTEN,
                    ):
                        rc, text = await agent.run(command)
                        assert rc == 0, text
                finally:
                    await agent.close()

            asyncio.run(serve())
            out = _in_ns(
                daemon.host_netns, sys.executable, "-c", RECEIVER, g.ip4, "5002", str(nbytes),
                timeout=60,
            )  # fmt: skip
            assert out.returncode == 0, out.stderr
            return float(out.stdout.strip())

        asyncio.run(listen(guests))
        free_rate = send_into(free, 16 * MIB)
        limited_rate = send_into(limited, 5 * MIB)
        # Again, the other way round (the first transfer warmed nothing the second used).
        asyncio.run(listen(guests))
        limited_again = send_into(limited, 5 * MIB)
        free_again = send_into(free, 16 * MIB)
        print(
            f"\ninto the guest, rx_rate_limit 1 MiB/s: {limited_rate / MIB:.3f} and "
            f"{limited_again / MIB:.3f} MiB/s (5 MiB each)"
            f"\ninto the guest, no limit: {free_rate / MIB:.2f} and {free_again / MIB:.2f} MiB/s"
            " (16 MiB each)"
        )
        for rate in (limited_rate, limited_again):
            assert 0.8 * MIB <= rate <= 1.2 * MIB, rate / MIB
        for rate in (free_rate, free_again):
            assert rate > 2 * max(limited_rate, limited_again), rate / MIB
        # tx_rate_limit: what the guest sends.
        free_out = receive_from(free, 8 * MIB)
        limited_out = receive_from(limited, 4 * MIB)
        print(
            f"from the guest, tx_rate_limit 1 MiB/s: {limited_out / MIB:.3f} MiB/s (4 MiB); "
            f"no limit: {free_out / MIB:.2f} MiB/s (8 MiB)"
        )
        assert 0.8 * MIB <= limited_out <= 1.2 * MIB, limited_out / MIB
        assert free_out > 2 * limited_out, free_out / MIB
    finally:
        _delete_all(guests)


# -- 3. thirty VMs with networking, created and deleted --------------------------------------


def test_thirty_networked_vms_leave_nothing(daemon: Daemon) -> None:
    call = CurlConnect(daemon.url, "dev_customer_churn")
    before = _host_view(daemon)
    alive: list[str] = []
    create_times: list[float] = []
    delete_times: list[float] = []
    addresses: set[str] = set()
    booted = 0
    try:
        # A window of up to five VMs alive at once: addresses are reused after release.
        for i in range(30):
            start = time.monotonic()
            vm_id = call.must("CreateVm", {"vm_id": f"churn-{i}", "config": _config([NIC])}).body[
                "vm_id"
            ]
            create_times.append(time.monotonic() - start)
            alive.append(vm_id)
            if i % 10 == 3:
                # A few are running (their VMM in the jail, the TAP in use) when deleted.
                call.must("BootVm", {"vm_id": vm_id})
                booted += 1
            info = call.info(vm_id).body["network_info"]
            assert info["ip_address"] and info["network_namespace"], info
            addresses.add(info["ip_address"])
            if len(alive) > 5:
                start = time.monotonic()
                call.must("DeleteVm", {"vm_id": alive.pop(0), "force": True})
                delete_times.append(time.monotonic() - start)
        assert len(_allocations(daemon)) == 2 * 5  # IPv4 and IPv6 per VM
        assert len([n for n in netns.listnetns() if n.startswith(daemon.vm_netns_prefix)]) == 5
        # The same address twice at the same time would have been a duplicate: never seen.
        assert len(addresses) >= 6
        assert booted == 3
    finally:
        for vm_id in alive:
            start = time.monotonic()
            call("DeleteVm", {"vm_id": vm_id, "force": True})
            delete_times.append(time.monotonic() - start)
    print(
        f"\nCreateVm with networking: mean {sum(create_times) / 30 * 1000:.0f} ms, "
        f"max {max(create_times) * 1000:.0f} ms; DeleteVm: mean "
        f"{sum(delete_times) / len(delete_times) * 1000:.0f} ms, "
        f"max {max(delete_times) * 1000:.0f} ms"
    )
    assert _host_view(daemon) == before

    # Ten more at once, then deleted at once: concurrent set-ups and teardowns.
    ids = [f"churn-c{i}" for i in range(10)]
    with ThreadPoolExecutor(10) as pool:
        made = list(
            pool.map(lambda v: call("CreateVm", {"vm_id": v, "config": _config([NIC])}), ids)
        )
        assert all(r.ok for r in made), [r for r in made if not r.ok]
        ips = [call.info(v).body["network_info"]["ip_address"] for v in ids]
        assert len(set(ips)) == 10, ips
        gone = list(pool.map(lambda v: call("DeleteVm", {"vm_id": v}), ids))
        assert all(r.ok for r in gone), [r for r in gone if not r.ok]
    assert _host_view(daemon) == before


# -- 4. restart reconciliation ---------------------------------------------------------------


def test_restart_reconciles_a_dead_vmm_and_a_stray_namespace(daemon: Daemon) -> None:
    call = CurlConnect(daemon.url, "dev_customer_rr")
    before = _host_view(daemon)
    guest = _create(call, "rr-vm")
    stray = f"{daemon.vm_netns_prefix}stray-{secrets.token_hex(2)}"
    try:
        guest.boot()
        info = call.info(guest.vm_id).body
        pid = int(info["backend_info"]["pid"])
        vm_ns = info["network_info"]["network_namespace"]
        assert vm_ns in netns.listnetns()
        daemon.kill9()
        os.kill(pid, signal.SIGKILL)
        wait_pid_gone(pid)
        reap(pid)
        netns.create(stray)
        daemon.start_again()
        assert stray not in netns.listnetns(), "a namespace no VM owns survived the start"
        assert state_name(call.info(guest.vm_id).body["state"]) == "SHUTDOWN"
        assert not pid_alive(pid)
        # The VM is usable again: it boots, keeps its address and answers on both families.
        after = call.info(guest.vm_id).body["network_info"]
        assert after["ip_address"] == guest.ip4, after
        call.must("BootVm", {"vm_id": guest.vm_id})
        state = state_name(call.info(guest.vm_id).body["state"])
        try:
            # (A new VMM may start a new console file: wait for the guest's answer instead.)
            wait_until(
                lambda: _in_ns(daemon.host_netns, "ping", "-c", "1", "-W", "1", guest.ip4)
                .returncode == 0,
                BOOT_TIMEOUT, "the rebooted guest to answer ping",
            )  # fmt: skip
        except AssertionError as exc:
            raise AssertionError(
                f"{exc}; state {state}; console:\n{guest.console.tail(30)}"
            ) from None
        for address in guest.addresses:
            ping = _in_ns(daemon.host_netns, "ping", "-c", "2", "-W", "3", address)
            assert ping.returncode == 0, f"after the restart: ping {address}: {ping.stdout}"
    finally:
        with contextlib.suppress(Exception):
            if stray in netns.listnetns():
                netns.remove(stray)
    call.must("DeleteVm", {"vm_id": guest.vm_id, "force": True})
    assert not [n for n in netns.listnetns() if n.startswith(daemon.vm_netns_prefix)]
    assert not _jails(daemon)
    assert _allocations(daemon) == []
    assert _host_view(daemon) == before


# -- 5. the daemon inside a namespace the test made ------------------------------------------


def _ns_curl(ns: str, port: int, method: str, body: dict[str, Any], token: str) -> Any:
    out = _in_ns(
        ns, "curl", "-sS", "--http1.1", "--noproxy", "*", "--max-time", "120",
        "-H", "Content-Type: application/json", "-H", f"Authorization: Bearer {token}",
        "--data-binary", json.dumps(body), "-w", "\n%{http_code}",
        f"http://127.0.0.1:{port}/{SERVICE}/{method}",
        timeout=130,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    text, _, status = out.stdout.rpartition("\n")
    assert status == "200", f"{method}({body}): HTTP {status} {text}"
    return json.loads(text)  # Connect JSON: lowerCamelCase field names


def test_the_daemon_runs_inside_a_namespace_the_test_made(e2e_root: Path) -> None:
    tag = secrets.token_hex(3)
    ns, seg, prefix = f"mtn{tag}", f"mtm{tag}", f"mtw{tag}-"
    # Its own cgroup parent, like every Daemon's: the default ("metald") is shared with any
    # other daemon on this machine (another test session's, the lead's own).
    cgroup_parent = f"metald-test-{tag}"
    workdir = Path(tempfile.mkdtemp(prefix="n", dir=e2e_root))
    jail_dir = Path(tempfile.mkdtemp(prefix="mj", dir="/tmp"))
    machine_links = _link_names(None)
    port = free_port()
    proc: subprocess.Popen[bytes] | None = None
    log = workdir / "metald.log"
    try:
        netns.create(ns)
        assert _in_ns(ns, "ip", "link", "set", "lo", "up").returncode == 0
        env = {
            **client_env(),
            "UNKEY_METALD_ADDRESS": "127.0.0.1",
            "UNKEY_METALD_PORT": str(port),
            "UNKEY_METALD_BACKEND": "qemu",
            "UNKEY_METALD_DATA_DIR": str(workdir / "data"),
            "UNKEY_METALD_ASSETMANAGER_CACHE_DIR": str(ASSETS),
            "UNKEY_METALD_AUTH_DEV_TOKENS": "true",
            "UNKEY_METALD_QEMU_ACCEL": "tcg",
            # Empty: the daemon's own namespace is the host side (here: the test's `ns`).
            "UNKEY_METALD_NETWORK_HOST_NETNS": "",
            "UNKEY_METALD_NETWORK_SEGMENTS_NETNS": seg,
            "UNKEY_METALD_NETWORK_NETNS_PREFIX": prefix,
            "UNKEY_METALD_JAILER_CHROOT_DIR": str(jail_dir),
            "UNKEY_METALD_JAILER_CGROUP_PARENT": cgroup_parent,
            "UNKEY_METALD_EXPOSE_HOST_DETAILS": "true",  # the console path below
            "UNKEY_METALD_BILLING_ENABLED": "false",
        }
        with log.open("wb") as out:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", ns, str(METALD), "serve"],
                env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, cwd=workdir,
            )  # fmt: skip

        def healthy() -> bool:
            assert proc is not None
            if proc.poll() is not None:
                raise AssertionError(f"metald exited with {proc.returncode}: {log.read_text()}")
            got = _in_ns(
                ns, "curl", "-s", "--noproxy", "*", "-o", "/dev/null", "-w", "%{http_code}",
                f"http://127.0.0.1:{port}/health", timeout=10,
            )  # fmt: skip
            return got.stdout.strip() == "200"

        wait_until(healthy, 60, "metald in the test's namespace to answer /health", 0.2)
        assert "br-vms" in _link_names(ns)
        assert _link_names(None) == machine_links, "the daemon changed the machine's links"

        token = "dev_customer_nsd"
        vm_id = _ns_curl(ns, port, "CreateVm", {"config": _config([NIC])}, token)["vmId"]
        info = _ns_curl(ns, port, "GetVmInfo", {"vm_id": vm_id}, token)
        assert info["networkInfo"]["networkNamespace"].startswith(prefix)
        ip4 = info["networkInfo"]["ipAddress"]
        _ns_curl(ns, port, "BootVm", {"vm_id": vm_id}, token)
        console = Console(Path(info["backendInfo"]["console_log"]))
        wait_until(lambda: console.ready_count() >= 1, BOOT_TIMEOUT, "READY on the console")
        ip4_seen, ip6 = _wait_net_line(console)
        assert ip4_seen == ip4
        for address in (ip4, ip6):
            ping = _in_ns(ns, "ping", "-c", "2", "-W", "3", address)
            assert ping.returncode == 0, f"ping {address} in {ns}: {ping.stdout}{ping.stderr}"
            print(f"\nfrom the test's namespace {ns}: ping {address}: ok")
        _ns_curl(ns, port, "DeleteVm", {"vm_id": vm_id, "force": True}, token)
        assert not [n for n in netns.listnetns() if n.startswith(prefix)]
        assert not (jail_dir / "qemu" / vm_id).exists()
        assert _link_names(None) == machine_links, "the daemon changed the machine's links"
    finally:
        if proc is not None and proc.poll() is None:
            # `ip netns exec` execs metald: proc.pid is the daemon.
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(10)
        for pid in qemu_processes(str(workdir)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(AssertionError):
                wait_pid_gone(pid)
        for name in netns.listnetns():
            if name.startswith(prefix) or name in (ns, seg):
                netns.remove(name)
        if proc is not None and log.exists():
            print(f"\n----- metald in {ns} -----\n" + "\n".join(log.read_text().splitlines()[-80:]))
        shutil.rmtree(jail_dir, ignore_errors=True)
        shutil.rmtree(workdir, ignore_errors=True)
        cgroups_left = []
        for hierarchy in ("/sys/fs/cgroup/unified", "/sys/fs/cgroup"):
            parent = Path(hierarchy) / cgroup_parent
            if parent.is_dir():
                try:
                    parent.rmdir()  # goes once it has no VM cgroups left
                except OSError as exc:
                    cgroups_left.append(f"{parent}: {exc.strerror}")
    assert _link_names(None) == machine_links
    assert not cgroups_left, f"cgroup left behind: {cgroups_left}"


# -- 6. two daemons on one machine -----------------------------------------------------------


def test_a_second_daemon_leaves_the_first_ones_vms_alone(
    metald_factory: Callable[..., Daemon],
) -> None:
    """Two daemons (own data dirs, jail bases, namespace prefixes) on one machine: the second
    one's start-up reconciliation and a VM of the same id in it leave the first one's running
    VM as it was. VM ids are unique per daemon, not per machine."""
    first = metald_factory(name="first")
    call = CurlConnect(first.url, "dev_customer_two")
    guest = _create(call, f"twin-{secrets.token_hex(2)}")
    try:
        guest.boot()
        info = call.info(guest.vm_id).body
        pid = int(info["backend_info"]["pid"])
        vm_ns = info["network_info"]["network_namespace"]
        view = _host_view(first)

        def first_vm_intact() -> None:
            assert pid_alive(pid) and vm_ns in netns.listnetns()
            assert state_name(call.info(guest.vm_id).body["state"]) == "RUNNING"
            assert _host_view(first) == view
            for address in guest.addresses:
                ping = _in_ns(first.host_netns, "ping", "-c", "2", "-W", "3", address)
                assert ping.returncode == 0, f"ping {address}: {ping.stdout}"

        second = metald_factory(name="second")
        other = CurlConnect(second.url, "dev_customer_two")
        first_vm_intact()
        mentions = [line for line in second.log_tail(400).splitlines() if guest.vm_id in line]
        print("\nthe second daemon's log about the first one's VM:", *mentions, sep="\n  ")

        second_view = _host_view(second)
        twin = other("CreateVm", {"vm_id": guest.vm_id, "config": _config([NIC])})
        print(f"CreateVm of the same id in the second daemon: {twin!r}")
        first_vm_intact()
        assert twin.ok, f"the same VM id in another daemon (own cgroup parent): {twin!r}"
        twin_guest = Guest(other, guest.vm_id)
        twin_guest.boot()
        assert int(other.info(guest.vm_id).body["backend_info"]["pid"]) != pid
        other.must("DeleteVm", {"vm_id": guest.vm_id, "force": True})
        assert _host_view(second) == second_view
        first_vm_intact()
    finally:
        call("DeleteVm", {"vm_id": guest.vm_id, "force": True})
