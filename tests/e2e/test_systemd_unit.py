"""contrib/systemd/metald.service, tested for what it promises.

- metald run as the unit's user with exactly the unit's capabilities (ambient, inheritable
  and bounding sets, no_new_privs: parsed from the unit file and handed to `setpriv`), in a
  mount namespace whose /run/netns is a slave of the host's (what the unit's hardening
  gives it), passes a VM's whole life with a NIC: create, boot, reach it, shut it down,
  delete it. Its own process holds those capabilities and no more; the VMM holds none.
- `systemd-analyze verify` accepts the unit.

The user is made here when the host has none (`useradd --system`, as the README's set-up
does); its data directory is its own, as in production.
"""

from __future__ import annotations

import pwd
import resource
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from ._support import MIB, ROOT, ApiConsole, Caller, Daemon, wait_until

UNIT = ROOT / "contrib" / "systemd" / "metald.service"
ENV_EXAMPLE = ROOT / "contrib" / "systemd" / "metald.env.example"
NIC = {"id": "eth0", "mode": "NETWORK_MODE_IPV4_ONLY"}


def unit_settings(path: Path = UNIT) -> dict[str, list[str]]:
    """Every `Key=value` of the [Service] section, values of repeated keys in order."""
    settings: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
            continue
        if section == "[Service]":
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def unit_capabilities(settings: dict[str, list[str]]) -> tuple[list[str], list[str]]:
    ambient = " ".join(settings["AmbientCapabilities"]).split()
    bounding = " ".join(settings["CapabilityBoundingSet"]).split()
    return ambient, bounding


def _setpriv_caps(names: list[str]) -> str:
    return ",".join("+" + n.removeprefix("CAP_").lower() for n in names)


def unit_command(settings: dict[str, list[str]]) -> tuple[str, ...]:
    """`setpriv ...`: the unit's user, group and capabilities (ambient ones must be
    inheritable too), no supplementary groups, no_new_privs as the unit says."""
    ambient, bounding = unit_capabilities(settings)
    (user,) = settings["User"]
    (group,) = settings["Group"]
    argv = [
        "setpriv",
        f"--reuid={user}",
        f"--regid={group}",
        "--clear-groups",
        f"--inh-caps=-all,{_setpriv_caps(ambient)}",
        f"--ambient-caps=-all,{_setpriv_caps(ambient)}",
        f"--bounding-set=-all,{_setpriv_caps(bounding)}",
    ]
    if settings.get("NoNewPrivileges") == ["yes"]:
        argv.append("--no-new-privs")
    return (*argv, "--")


def _ensure_user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--user-group", "--no-create-home",
             "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", name],
            check=True, capture_output=True,
        )  # fmt: skip
        return pwd.getpwnam(name)


def _mask(names: list[str]) -> int:
    return sum(1 << _CAP_NUMBERS[n] for n in names)


# linux/capability.h, written out here (the test does not take metald's word for it).
_CAP_NAMES = (
    "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID",
    "SETUID", "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN",
    "NET_RAW", "IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE",
    "SYS_PACCT", "SYS_ADMIN", "SYS_BOOT", "SYS_NICE", "SYS_RESOURCE", "SYS_TIME",
    "SYS_TTY_CONFIG", "MKNOD", "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP",
    "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG", "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ",
    "PERFMON", "BPF", "CHECKPOINT_RESTORE",
)  # fmt: skip
_CAP_NUMBERS = {f"CAP_{name}": number for number, name in enumerate(_CAP_NAMES)}


def _status(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def _in_host_ns(daemon: Daemon, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", daemon.host_netns, *argv],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip


def test_the_unit_names_a_dedicated_user_and_no_full_root() -> None:
    settings = unit_settings()
    ambient, bounding = unit_capabilities(settings)
    assert settings["User"] == ["metald"] and settings["Group"] == ["metald"]
    assert sorted(ambient) == sorted(bounding), "ambient and bounding sets are the same list"
    assert set(ambient) <= set(_CAP_NUMBERS), set(ambient) - set(_CAP_NUMBERS)
    assert len(ambient) < len(_CAP_NUMBERS) // 2
    for never in ("CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_BOOT", "CAP_SETFCAP", "CAP_BPF"):
        assert never not in ambient
    assert settings["Restart"] == ["on-failure"]
    assert settings["NoNewPrivileges"] == ["yes"]
    # What the jailer checks for at start-up is in the unit (jailer/needs.py).
    from metald.jailer.needs import JAILER_CAPABILITIES

    assert set(JAILER_CAPABILITIES) <= set(ambient)
    assert ENV_EXAMPLE.exists()


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    # verify checks that ExecStart's binary exists: point it at this checkout's metald.
    metald = ROOT / ".venv" / "bin" / "metald"
    text = UNIT.read_text()
    assert "ExecStart=/opt/metald/venv/bin/metald serve" in text
    unit = tmp_path / "metald.service"
    unit.write_text(text.replace("/opt/metald/venv/bin/metald", str(metald)))
    done = subprocess.run(
        [analyze, "verify", "--man=no", str(unit)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0 and not done.stderr.strip(), done.stdout + done.stderr


@pytest.mark.guest
def test_a_vm_lives_its_whole_life_under_the_units_user_and_capabilities(
    metald_factory: Callable[..., Daemon], callers: Callable[..., Caller]
) -> None:
    settings = unit_settings()
    ambient, bounding = unit_capabilities(settings)
    user = _ensure_user(settings["User"][0])
    # Run in the daemon's work directory: its data directory is made its user's (as the
    # unit's ExecStartPre does), the unit's umask and file limit, then a mount namespace like
    # the unit's, then the unit's user and capabilities; each step execs the next, so the
    # pid is metald's.
    (umask,) = settings["UMask"]
    # The unit's file limit, or this machine's hard limit when that is lower (a container's:
    # only systemd as PID 1 could raise it).
    nofile = min(int(settings["LimitNOFILE"][0]), resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    owned = (
        f"install -d -o {user.pw_uid} -g {user.pw_gid} -m 0700 data && umask {umask} && "
        f'ulimit -n {nofile} && exec "$@"'
    )
    prefix = (
        "sh", "-c", owned, "sh",
        "unshare", "--mount", "--propagation", "slave", "--", *unit_command(settings),
    )  # fmt: skip
    daemon = metald_factory(command_prefix=prefix)
    status = _status(daemon.pid)
    assert status["Uid"].split() == [str(user.pw_uid)] * 4, status["Uid"]
    assert status["Gid"].split() == [str(user.pw_gid)] * 4, status["Gid"]
    assert int(status["CapEff"], 16) == _mask(ambient), status["CapEff"]
    assert int(status["CapAmb"], 16) == _mask(ambient), status["CapAmb"]
    assert int(status["CapBnd"], 16) == _mask(bounding), status["CapBnd"]
    assert status["NoNewPrivs"] == "1"
    assert status["Umask"] == umask.zfill(4)
    limits = Path(f"/proc/{daemon.pid}/limits").read_text()
    assert f"Max open files            {nofile}" in limits, limits

    call = callers("curl-connect-json", daemon.url)
    config = {"memory": {"size_bytes": 128 * MIB}, "network": [NIC]}
    vm_id = call.must("CreateVm", {"vm_id": "unit-life", "config": config}).body["vm_id"]
    try:
        info = call.info(vm_id).body
        ip4 = info["network_info"]["ip_address"]
        call.must("BootVm", {"vm_id": vm_id})
        console = ApiConsole(call, vm_id)
        wait_until(lambda: console.ready_count() >= 1, 120, "READY on the console")
        ping = _in_host_ns(daemon, "ping", "-c", "2", "-W", "3", ip4)
        assert ping.returncode == 0, f"ping {ip4}: {ping.stdout}{ping.stderr}"
        pid = int(call.info(vm_id).body["backend_info"]["pid"])
        vmm = _status(pid)
        assert vmm["Uid"].split() == [str(daemon.jail_ids()[vm_id])] * 4
        assert int(vmm["CapEff"], 16) == 0 and int(vmm["CapBnd"], 16) == 0
        # A restart (Restart=on-failure, an upgrade): the running VM is adopted, still reached.
        assert daemon.stop() == 0
        daemon.start_again()
        assert call.info(vm_id).body["state"] == "VM_STATE_RUNNING"
        assert int(call.info(vm_id).body["backend_info"]["pid"]) == pid
        ping = _in_host_ns(daemon, "ping", "-c", "1", "-W", "3", ip4)
        assert ping.returncode == 0, f"ping {ip4} after the restart: {ping.stdout}{ping.stderr}"
        assert call.must("ShutdownVm", {"vm_id": vm_id}).body["state"] == "VM_STATE_SHUTDOWN"
        # A VMM that must be killed (another uid's process): a forced delete of a live VM.
        other = call.must("CreateVm", {"vm_id": "unit-kill", "config": config}).body["vm_id"]
        other_pid = int(call.info(other).body["backend_info"]["pid"])
        call.must("DeleteVm", {"vm_id": other, "force": True})
        wait_until(lambda: not Path(f"/proc/{other_pid}").exists(), 10, "the killed VMM gone")
    finally:
        call.must("DeleteVm", {"vm_id": vm_id, "force": True})
    assert call("GetVmInfo", {"vm_id": vm_id}).code == "not_found"
    assert not (daemon.jail_dir / "qemu" / vm_id).exists()
    # metald's own files are its user's.
    assert daemon.db_path.stat().st_uid == user.pw_uid
