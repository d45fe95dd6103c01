"""Issue 3 through the daemon: every VMM jailed (unprivileged, chrooted, in the VM's own
network namespace), and guests with working, isolated networking. The host side of the
network is a namespace this test's daemon owns; the machine's own is never touched."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from pyroute2 import netns

from ._support import MIB, ApiConsole, Caller, Daemon, wait_until

pytestmark = pytest.mark.guest

NIC = {"id": "eth0", "mode": "NETWORK_MODE_DUAL_STACK"}


def _config(network: list[dict[str, object]] | None = None) -> dict[str, object]:
    config: dict[str, object] = {"memory": {"size_bytes": 128 * MIB}}
    if network is not None:
        config["network"] = network
    return config


def _status(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def _in_host_ns(
    daemon: Daemon, *argv: str, timeout: float = 20
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", daemon.host_netns, *argv],
        capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


def test_a_vmm_runs_jailed(daemon: Daemon, callers: Callable[..., Caller]) -> None:
    call = callers("grpcio", daemon.url)
    vm_id = call.must("CreateVm", {"vm_id": "jailed", "config": _config([NIC])}).body["vm_id"]
    try:
        info = call.info(vm_id).body
        pid = int(info["backend_info"]["pid"])
        # Its own ids, claimed in the store from the daemon's range (not a shared jail user).
        uid = daemon.jail_ids()[vm_id]
        status = _status(pid)
        assert status["Uid"].split() == [str(uid)] * 4
        assert status["Gid"].split() == [str(uid)] * 4
        assert int(status["CapEff"], 16) == 0 and int(status["CapBnd"], 16) == 0
        assert status["NoNewPrivs"] == "1"
        # After pivot_root, /proc/<pid>/root reads as "/": compare the inode instead.
        jail_root = daemon.jail_dir / "qemu" / vm_id / "root"
        seen, made = os.stat(f"/proc/{pid}/root"), os.stat(jail_root)
        assert (seen.st_dev, seen.st_ino) == (made.st_dev, made.st_ino)
        # Only what the VMM needs: its binaries' paths, the boot files, /dev, its /run.
        allowed = {"usr", "lib", "lib64", "dev", "run", "vmlinux", "initrd", "etc", "bin", "sbin"}
        listing = set(os.listdir(f"/proc/{pid}/root"))
        assert listing <= allowed and {"vmlinux", "run", "dev"} <= listing, listing
        netns_name = info["network_info"]["network_namespace"]
        assert netns_name.startswith(daemon.vm_netns_prefix)
        vm_ns = os.stat(f"/run/netns/{netns_name}").st_ino
        assert os.stat(f"/proc/{pid}/ns/net").st_ino == vm_ns
    finally:
        call.must("DeleteVm", {"vm_id": vm_id, "force": True})
    assert not any(n.startswith(daemon.vm_netns_prefix) for n in netns.listnetns())
    assert not (daemon.jail_dir / "qemu" / vm_id).exists()


def test_guests_answer_ping_on_both_families(
    daemon: Daemon, callers: Callable[..., Caller]
) -> None:
    call = callers("curl-connect-json", daemon.url)
    vm_id = call.must("CreateVm", {"vm_id": "pingme", "config": _config([NIC])}).body["vm_id"]
    try:
        info = call.info(vm_id).body
        net = info["network_info"]
        assert net["gateway"] == "10.100.0.1" and net["tap_device"] and net["mac_address"]
        ip4 = net["ip_address"]
        assert ip4.startswith("10.100.")
        call.must("BootVm", {"vm_id": vm_id})
        console = ApiConsole(call, vm_id)
        wait_until(lambda: console.ready_count() >= 1, 90, "READY on the console")
        ip6 = wait_until(lambda: _guest_ipv6(console), 10, "the guest's NET line")
        # GetVmInfo reports the guest's IPv6 address and gateway too (dual-stack).
        assert (net["ipv6_address"], net["ipv6_gateway"]) == (ip6, "fd00::1"), net
        for address in (ip4, ip6):
            ping = _in_host_ns(daemon, "ping", "-c", "2", "-W", "3", address)
            assert ping.returncode == 0, f"ping {address}: {ping.stdout}{ping.stderr}"
        stats = call.info(vm_id).body["metrics"]["network_stats"]
        assert int(stats["packets_received"]) > 0
    finally:
        call.must("DeleteVm", {"vm_id": vm_id, "force": True})
    # The address is free again: the same static address can be taken by a new VM.
    again = {"id": "eth0", "ipv4_config": {"address": ip4}, "mode": "NETWORK_MODE_IPV4_ONLY"}
    vm2 = call.must("CreateVm", {"config": _config([again])}).body["vm_id"]
    assert call.info(vm2).body["network_info"]["ip_address"] == ip4
    call.must("DeleteVm", {"vm_id": vm2})


def _guest_ipv6(console: ApiConsole) -> str | None:
    for line in console.text().splitlines():
        if line.startswith("METALD-GUEST NET") and "ip6=" in line:
            return line.split("ip6=")[1].split()[0].split("/")[0]
    return None


def test_bad_network_requests(daemon: Daemon, callers: Callable[..., Caller]) -> None:
    call = callers("curl-connect-json", daemon.url)
    before = daemon.snapshot()
    outside = {"id": "eth0", "ipv4_config": {"address": "192.0.2.7"}}
    reply = call("CreateVm", {"config": _config([outside])})
    assert reply.code == "invalid_argument" and "ipv4_config" in reply.message, reply
    two = call("CreateVm", {"config": _config([NIC, {**NIC, "id": "eth1"}])})
    assert two.code == "invalid_argument", two
    taken = call.must("CreateVm", {"config": _config([NIC])}).body["vm_id"]
    ip4 = call.info(taken).body["network_info"]["ip_address"]
    dup = {"id": "eth0", "ipv4_config": {"address": ip4}, "mode": "NETWORK_MODE_IPV4_ONLY"}
    reply = call("CreateVm", {"config": _config([dup])})
    assert reply.code == "resource_exhausted", reply
    call.must("DeleteVm", {"vm_id": taken})
    assert daemon.snapshot()[1:] == before[1:]
    assert not any(n.startswith(daemon.vm_netns_prefix) for n in netns.listnetns())
