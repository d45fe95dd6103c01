"""What a tenant sees, through the API, on a daemon as deployed (no
UNKEY_METALD_EXPOSE_HOST_DETAILS): its console through GetVmConsole in three protocols, no
host path, pid or version in backend_info or in any error (a VMM that fails to start
included), and nothing of another customer's VM. Also the input checks a tenant meets first:
kernel arguments in reserved spellings, malformed page tokens, an uncapped shutdown
timeout, all refused the same in every protocol."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest

from ._support import ASSETS, ApiConsole, Caller, Daemon, wait_until

PROTOCOLS = ["curl-connect-json", "grpcio", "buf-grpcweb"]
TENANT = "dev_customer_alice"
OTHER = "dev_customer_other"
BOOT_TIMEOUT = 180


def _deployed(metald_factory: Callable[..., Daemon]) -> Daemon:
    return metald_factory(UNKEY_METALD_EXPOSE_HOST_DETAILS="false")


def _host_strings(daemon: Daemon) -> list[str]:
    """Host paths a tenant must never see."""
    return [
        str(daemon.jail_dir),
        str(daemon.data_dir),
        str(daemon.workdir),
        str(ASSETS),
        str(ASSETS.resolve()),
        "/srv/",
        "/tmp/",
    ]


def _assert_no_host_details(daemon: Daemon, text: str, pids: Iterable[int] = ()) -> None:
    for host in _host_strings(daemon):
        assert host not in text, f"{host!r} shown to a tenant: {text}"
    assert not re.search(r"qemu[-_ ]?(version|\d)", text, re.IGNORECASE), text
    for pid in pids:
        assert not re.search(rf"\b{pid}\b", text), f"host pid {pid} shown: {text}"


@pytest.mark.guest
def test_a_tenant_reads_its_console_and_sees_no_host_details(
    metald_factory: Callable[..., Daemon], callers: Callable[..., Caller]
) -> None:
    daemon = _deployed(metald_factory)
    owner = callers("grpcio", daemon.url, TENANT)
    vm_id = owner.must("CreateVm", {"vm_id": "tenant-view"}).body["vm_id"]
    try:
        owner.must("BootVm", {"vm_id": vm_id})
        console = ApiConsole(owner, vm_id)
        wait_until(lambda: console.ready_count() >= 1, BOOT_TIMEOUT, "READY via GetVmConsole")
        assert f"vm={vm_id}" in console.text(), console.tail()
        # Following: a heartbeat the guest writes later arrives through the offsets.
        beats = console.heartbeats()
        wait_until(lambda: console.heartbeats() > beats, 60, "a later heartbeat, followed")

        for name in PROTOCOLS:
            c = callers(name, daemon.url, TENANT)
            head = c.must("GetVmConsole", {"vm_id": vm_id, "max_bytes": 64}).msg
            assert (head.offset, head.next_offset) == (0, 64) and head.size >= 64, head
            assert console.data.startswith(head.data), name
            tail = c.must("GetVmConsole", {"vm_id": vm_id, "offset": -32}).msg
            assert tail.offset == tail.size - 32 and len(tail.data) == 32, (name, tail)

        pids = {pid for pid, _ in daemon.recorded_processes().values()}
        assert pids, "the VM's QEMU is not recorded"
        for name in PROTOCOLS:
            body = callers(name, daemon.url, TENANT).info(vm_id).body
            assert set(body["backend_info"]) <= {"accelerator", "exit_reason"}, body
            _assert_no_host_details(daemon, json.dumps(body), pids)

        # Another customer: every call on the id answers as for an id nobody holds.
        other = callers("curl-connect-json", daemon.url, OTHER)
        for method, extra in (
            ("GetVmConsole", {}),
            ("GetVmInfo", {}),
            ("PauseVm", {}),
            ("ShutdownVm", {"force": True}),
            ("DeleteVm", {"force": True}),
        ):
            hers = other(method, {"vm_id": vm_id, **extra})
            nobody = other(method, {"vm_id": "nobody-holds-this", **extra})
            assert hers.code == nobody.code == "not_found", (method, hers, nobody)
            assert hers.message.replace(vm_id, "<id>") == nobody.message.replace(
                "nobody-holds-this", "<id>"
            ), method
        taken = other("CreateVm", {"vm_id": vm_id})
        own_again = owner("CreateVm", {"vm_id": vm_id})
        assert taken.code == own_again.code == "already_exists"
        assert taken.message == own_again.message and "alice" not in taken.message
        assert owner.state(vm_id) == "RUNNING"

        owner.must("ShutdownVm", {"vm_id": vm_id, "force": True})
        body = owner.info(vm_id).body
        assert body["backend_info"].get("exit_reason"), body
        _assert_no_host_details(daemon, json.dumps(body), pids)
        # After the shutdown the owner still reads what the guest wrote.
        after = owner.must("GetVmConsole", {"vm_id": vm_id}).msg
        assert b"METALD-GUEST READY" in after.data
    finally:
        owner.must("DeleteVm", {"vm_id": vm_id, "force": True})


@pytest.fixture
def broken_kernel_store(private_store: Path) -> Path:
    """The private store with an empty file where a kernel would be: QEMU exits at once."""
    (private_store / "kernels").mkdir()
    (private_store / "kernels" / "empty").write_bytes(b"")
    return private_store


@pytest.mark.parametrize("caller_name", PROTOCOLS)
def test_a_vmm_that_fails_to_start_shows_no_host_path(
    metald_factory: Callable[..., Daemon],
    callers: Callable[..., Caller],
    broken_kernel_store: Path,
    caller_name: str,
) -> None:
    """QEMU cannot load the kernel and exits at start-up, saying why with a path. The
    tenant gets `internal` with a reference; the operator's log has the details under it."""
    daemon = metald_factory(
        UNKEY_METALD_EXPOSE_HOST_DETAILS="false",
        UNKEY_METALD_ASSETMANAGER_CACHE_DIR=str(broken_kernel_store),
    )
    call = callers(caller_name, daemon.url, TENANT)
    config = {"boot": {"kernel_path": "kernels/empty"}}
    bad = call("CreateVm", {"vm_id": "bad-kernel", "config": config})
    assert bad.code == "internal", bad
    _assert_no_host_details(daemon, bad.message)
    _assert_no_host_details(daemon, bad.raw)
    ref = re.search(r"reference ([0-9a-f]{12})", bad.message)
    assert ref, bad.message
    log = daemon.log_tail(400)
    assert f"internal error {ref.group(1)}" in log and "failed to start VM bad-kernel" in log, log
    assert call("GetVmInfo", {"vm_id": "bad-kernel"}).code == "not_found"  # nothing left

    # Errors a tenant is meant to read name the field, not the host.
    for path in ("/etc/passwd", "escape", "blobs/up/etc/passwd", "nothing/here"):
        refused = call("CreateVm", {"config": {"boot": {"kernel_path": path}}})
        assert refused.code == "invalid_argument", (path, refused)
        assert refused.message.startswith("config.boot.kernel_path"), (path, refused)
        _assert_no_host_details(daemon, refused.message)
        assert str(broken_kernel_store) not in refused.message


SPELLINGS = [
    "init=/bin/sh",
    '"init=/bin/sh"',
    "INIT=/bin/sh",
    "rd_init=/bin/sh",
    "quiet\tinit=/bin/sh",
    "quiet\u00a0init=/bin/sh",
    "Metald.Vm_Id=other",
    "metald-vm_id=other",
    "sysctl/kernel/ctrl-alt-del=1",
    "console=tty0",
    "-- init=/bin/sh",
]


@pytest.mark.parametrize("caller_name", PROTOCOLS)
def test_inputs_a_tenant_controls_are_refused_the_same_in_every_protocol(
    daemon: Daemon, callers: Callable[..., Caller], caller_name: str
) -> None:
    call = callers(caller_name, daemon.url, TENANT)
    for args in SPELLINGS:
        reply = call("CreateVm", {"config": {"boot": {"kernel_args": args}}})
        assert reply.code == "invalid_argument", (args, reply)
        assert reply.message.startswith("config.boot.kernel_args"), (args, reply)
    for token in ("garbage!", "W10", "A" * 5000, "WzEsIi4uL2V0YyJd"):  # [1,"../etc"]
        reply = call("ListVms", {"page_token": token})
        assert (reply.code, reply.message) == (
            "invalid_argument",
            "page_token: is not a token returned by ListVms",
        ), token
    reply = call("ShutdownVm", {"vm_id": "any", "timeout_seconds": 2**31 - 1})
    assert reply.code == "invalid_argument" and "timeout_seconds" in reply.message, reply
    reply = call("CreateVm", {"config": {"metadata": {"k": "line\nbreak"}}})
    assert reply.code == "invalid_argument" and "config.metadata[k]" in reply.message, reply
    reply = call(
        "CreateVm", {"config": {"boot": {"boot_options": {f"k{i}": "v" for i in range(17)}}}}
    )
    assert reply.code == "invalid_argument" and "boot_options" in reply.message, reply
    assert call.must("ListVms", {}).body["vms"] == []  # nothing was created
