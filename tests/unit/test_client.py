"""The Python SDK: request building and conversions as pure functions, then real round trips
over the Connect protocol against the real service, handlers and interceptors over in-memory
ports (tests/fakes/daemon.py, hypercorn on a free loopback port)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext
from fakes.daemon import FakeDaemon, serve_fake_daemon

from metald.api.handlers import VmHandlers
from metald.client import (
    STATE_CHOICES,
    AsyncMetaldClient,
    Disk,
    MetaldClient,
    MetaldClientError,
    _build,
    parse_state,
    pb,
    state_name,
    to_dict,
)
from metald.client.errors import from_connect_error

TOKEN = "dev_customer_acme"

# --- pure: states and conversions ---------------------------------------------------------


def test_state_names_round_trip() -> None:
    assert state_name(pb.VM_STATE_RUNNING) == "RUNNING"
    assert state_name(0) == "UNSPECIFIED"
    assert state_name(42) == "UNKNOWN(42)"
    assert STATE_CHOICES == ("CREATED", "RUNNING", "PAUSED", "SHUTDOWN")
    for name in STATE_CHOICES:
        assert state_name(parse_state(name)) == name


@pytest.mark.parametrize("value", ["running", "RUNNING", " Running ", "VM_STATE_RUNNING", 2])
def test_parse_state_accepts_names_and_numbers(value: str | int) -> None:
    assert parse_state(value) == pb.VM_STATE_RUNNING


@pytest.mark.parametrize("value", ["bogus", "UNSPECIFIED", 0, 9, "", True])
def test_parse_state_rejects_unknown(value: Any) -> None:
    with pytest.raises(ValueError, match="CREATED, RUNNING, PAUSED, SHUTDOWN"):
        parse_state(value)


def test_to_dict_uses_proto_names_short_enums_and_numbers() -> None:
    response = pb.ListVmsResponse(
        vms=[
            pb.VmInfo(
                vm_id="vm-1",
                state=pb.VM_STATE_PAUSED,
                memory_size_bytes=5 * 1024**3,
                metadata={"k": "v"},
            )
        ],
        total_count=1,
    )
    data = to_dict(response)
    vm = data["vms"][0]
    assert vm["vm_id"] == "vm-1"
    assert vm["state"] == "PAUSED"
    assert vm["memory_size_bytes"] == 5 * 1024**3  # a number, not the proto-JSON string
    assert vm["created_timestamp"] == 0  # zero values are present
    assert vm["metadata"] == {"k": "v"}
    assert data["next_page_token"] == ""


def test_to_dict_shortens_nested_and_other_enums() -> None:
    info = pb.GetVmInfoResponse(
        vm_id="x",
        state=pb.VM_STATE_SHUTDOWN,
        config=pb.VmConfig(network=[pb.NetworkInterface(mode=pb.NETWORK_MODE_IPV4_ONLY)]),
    )
    data = to_dict(info)
    assert data["state"] == "SHUTDOWN"
    assert data["config"]["network"][0]["mode"] == "IPV4_ONLY"
    request = pb.ListVmsRequest(state_filter=[pb.VM_STATE_CREATED, pb.VM_STATE_RUNNING])
    assert to_dict(request)["state_filter"] == ["CREATED", "RUNNING"]


# --- pure: request building ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "disk"),
    [
        ("/a/root.ext4", Disk("/a/root.ext4")),
        ("/a/root.ext4:ro", Disk("/a/root.ext4", read_only=True)),
        ("/a/root.ext4:rw", Disk("/a/root.ext4")),
        ("c:/odd:name", Disk("c:/odd:name")),
    ],
)
def test_disk_parse(spec: str, disk: Disk) -> None:
    assert Disk.parse(spec) == disk


@pytest.mark.parametrize("spec", ["", ":ro", ":rw"])
def test_disk_parse_rejects_empty_path(spec: str) -> None:
    with pytest.raises(ValueError, match="PATH"):
        Disk.parse(spec)


def test_create_request_fields() -> None:
    rpc = _build.create_vm(
        vcpus=2,
        memory_mib=512,
        kernel_path="vmlinux",
        initrd_path=None,
        kernel_args="console=ttyS0",
        disks=["/root.ext4", Disk("/data.img", read_only=True)],
        metadata={"team": "a"},
        vm_id="my-vm",
    )
    assert rpc.method == "create_vm"
    assert rpc.timeout is None
    request = rpc.request
    assert request.vm_id == "my-vm"
    assert request.customer_id == ""  # the server takes the customer from the token
    config = request.config
    assert config.cpu.vcpu_count == 2
    assert config.memory.size_bytes == 512 * 1024 * 1024
    assert config.boot.kernel_path == "vmlinux"
    assert config.boot.initrd_path == ""
    assert config.boot.kernel_args == "console=ttyS0"
    assert [(d.id, d.path, d.read_only, d.is_root_device) for d in config.storage] == [
        ("rootfs", "/root.ext4", False, True),
        ("disk1", "/data.img", True, False),
    ]
    assert dict(config.metadata) == {"team": "a"}


def test_create_request_defaults_leave_boot_to_the_server() -> None:
    request = _build.create_vm(
        vcpus=1,
        memory_mib=256,
        kernel_path=None,
        initrd_path=None,
        kernel_args=None,
        disks=(),
        metadata=None,
        vm_id=None,
    ).request
    assert request.vm_id == ""
    assert not request.config.HasField("boot")
    assert list(request.config.storage) == []


def test_create_request_explicit_root_disk() -> None:
    storage = _build.create_vm(
        vcpus=1,
        memory_mib=256,
        kernel_path=None,
        initrd_path=None,
        kernel_args=None,
        disks=[Disk("/scratch.img"), Disk("/root.ext4", root=True, id="sys")],
        metadata=None,
        vm_id=None,
    ).request.config.storage
    assert [(d.id, d.is_root_device) for d in storage] == [("disk0", False), ("sys", True)]


def test_create_request_out_of_range_is_invalid_argument() -> None:
    with pytest.raises(MetaldClientError) as caught:
        _build.create_vm(
            vcpus=2**40,
            memory_mib=256,
            kernel_path=None,
            initrd_path=None,
            kernel_args=None,
            disks=(),
            metadata=None,
            vm_id=None,
        )
    assert caught.value.code == "invalid_argument"


def test_list_request_states() -> None:
    request = _build.list_vms(["running", pb.VM_STATE_PAUSED], 10, "tok").request
    assert list(request.state_filter) == [pb.VM_STATE_RUNNING, pb.VM_STATE_PAUSED]
    assert (request.page_size, request.page_token) == (10, "tok")
    assert _build.list_vms([], 0, "", "globex").request.customer_id == "globex"
    with pytest.raises(MetaldClientError) as caught:
        _build.list_vms(["sleeping"], 0, "")
    assert caught.value.code == "invalid_argument"


def test_simple_requests() -> None:
    assert _build.boot_vm("a").request == pb.BootVmRequest(vm_id="a")
    assert _build.pause_vm("a").request == pb.PauseVmRequest(vm_id="a")
    assert _build.resume_vm("a").request == pb.ResumeVmRequest(vm_id="a")
    assert _build.reboot_vm("a", True).request == pb.RebootVmRequest(vm_id="a", force=True)
    assert _build.delete_vm("a", True).request == pb.DeleteVmRequest(vm_id="a", force=True)
    assert _build.get_vm_info("a").request == pb.GetVmInfoRequest(vm_id="a")


def test_shutdown_waits_longer_than_its_graceful_timeout() -> None:
    short = _build.shutdown_vm("a", False, 10, default_timeout=60.0)
    assert short.request == pb.ShutdownVmRequest(vm_id="a", timeout_seconds=10)
    assert short.timeout is None
    long = _build.shutdown_vm("a", True, 120, default_timeout=60.0)
    assert long.timeout == 120 + _build.SHUTDOWN_GRACE_SECONDS


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
        ("http://127.0.0.1:8080/", "http://127.0.0.1:8080"),
        ("127.0.0.1:8080", "http://127.0.0.1:8080"),
        (" localhost:9 ", "http://localhost:9"),
    ],
)
def test_normalize_address(given: str, expected: str) -> None:
    assert _build.normalize_address(given) == expected


def test_client_settings() -> None:
    with pytest.raises(ValueError, match="token"):
        MetaldClient("http://x", "")
    with pytest.raises(ValueError, match="address"):
        MetaldClient("  ", TOKEN)
    settings = _build.ClientSettings("127.0.0.1:1", "t0k", 2.5)
    assert settings.headers == {"authorization": "Bearer t0k"}
    assert settings.call_timeout_ms(_build.boot_vm("a")) == 2500
    assert settings.call_timeout_ms(_build.Rpc("x", None, timeout=90.0)) == 90_000
    assert _build.timeout_ms(0) is None
    assert _build.timeout_ms(float("inf")) is None


def test_page_tracker_refuses_a_repeated_token() -> None:
    pages = _build.PageTracker()
    assert pages.advance(pb.ListVmsResponse(next_page_token="2"))
    assert pages.token == "2"
    assert not pages.advance(pb.ListVmsResponse())
    with pytest.raises(MetaldClientError) as caught:
        pages.advance(pb.ListVmsResponse(next_page_token="2"))
    assert caught.value.code == "internal"


# --- pure: error translation --------------------------------------------------------------


def _raised(err: ConnectError, cause: BaseException | None) -> ConnectError:
    try:
        raise err from cause
    except ConnectError as raised:
        return raised


def test_server_errors_keep_code_and_message() -> None:
    err = from_connect_error(
        _raised(ConnectError(Code.FAILED_PRECONDITION, "vm is PAUSED"), None), "http://h:1"
    )
    assert (err.code, err.message) == ("failed_precondition", "vm is PAUSED")
    assert str(err) == "failed_precondition: vm is PAUSED"
    # `unavailable` sent by the server (backend down) is not a transport failure.
    err = from_connect_error(_raised(ConnectError(Code.UNAVAILABLE, "backend down"), None), "a")
    assert (err.code, err.message) == ("unavailable", "backend down")


def test_transport_errors_say_cannot_reach() -> None:
    cause = ConnectionError(
        "Request failed: error sending request for url (http://h:1/x): "
        "client error (Connect): tcp connect error: Connection refused (os error 111)"
    )
    err = from_connect_error(
        _raised(ConnectError(Code.UNAVAILABLE, str(cause)), cause), "http://h:1"
    )
    assert err.code == "unavailable"
    assert err.message == (
        "cannot reach http://h:1: tcp connect error: Connection refused (os error 111)"
    )


def test_local_deadline_names_the_timeout() -> None:
    err = from_connect_error(
        _raised(ConnectError(Code.DEADLINE_EXCEEDED, "Request timed out"), TimeoutError()),
        "http://h:1",
        timeout=1.5,
    )
    assert (err.code, err.message) == ("deadline_exceeded", "no answer from http://h:1 within 1.5s")


# --- round trips over the real wire protocol ----------------------------------------------


@pytest.fixture
def daemon() -> Iterator[FakeDaemon]:
    with serve_fake_daemon() as served:
        yield served


@pytest.fixture
def address(daemon: FakeDaemon) -> str:
    return daemon.address


def _unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_sync_lifecycle(address: str, daemon: FakeDaemon) -> None:
    with MetaldClient(address, TOKEN) as client:
        created = client.create_vm(
            vcpus=2, memory_mib=128, disks=["/r.ext4:ro"], metadata={"a": "b"}
        )
        assert created.state == pb.VM_STATE_CREATED
        vm_id = created.vm_id
        assert client.boot_vm(vm_id).state == pb.VM_STATE_RUNNING
        assert client.pause_vm(vm_id).state == pb.VM_STATE_PAUSED
        assert client.resume_vm(vm_id).state == pb.VM_STATE_RUNNING
        assert client.reboot_vm(vm_id, force=True).state == pb.VM_STATE_RUNNING
        info = client.get_vm_info(vm_id)
        assert info.config.cpu.vcpu_count == 2
        assert info.config.memory.size_bytes == 128 * 1024 * 1024
        assert info.config.storage[0].read_only
        assert dict(info.config.metadata) == {"a": "b"}
        shut = client.shutdown_vm(vm_id, timeout_seconds=5)
        assert (shut.success, shut.state) == (True, pb.VM_STATE_SHUTDOWN)
        assert client.delete_vm(vm_id).success
        assert client.list_vms().vms == []
    # Every call carried the bearer token, in binary protobuf (the server decoded it).
    assert {call.authorization for call in daemon.calls} == {f"Bearer {TOKEN}"}
    assert daemon.requests("RebootVm")[0].force
    assert daemon.requests("ShutdownVm")[0].timeout_seconds == 5
    shutdown = next(c for c in daemon.backend.calls if c.method == "shutdown")
    assert shutdown.args == {"timeout": 5.0, "force": False}
    assert daemon.backend.vmms == {} and daemon.backend.saved == {}  # deleted for real


def test_sync_errors_carry_connect_codes(address: str) -> None:
    client = MetaldClient(address, TOKEN)
    with pytest.raises(MetaldClientError) as caught:
        client.boot_vm("missing")
    assert caught.value.code == "not_found"
    vm_id = client.create_vm().vm_id
    with pytest.raises(MetaldClientError) as caught:
        client.pause_vm(vm_id)
    assert caught.value.code == "failed_precondition"
    assert "CREATED" in caught.value.message
    # Another customer's VM looks like a missing one (ids leak nothing).
    with pytest.raises(MetaldClientError) as caught:
        MetaldClient(address, "dev_customer_other").get_vm_info(vm_id)
    assert caught.value.code == "not_found"
    with pytest.raises(MetaldClientError) as caught:
        client.create_vm(vm_id=vm_id)
    assert caught.value.code == "already_exists"
    with pytest.raises(MetaldClientError) as caught:
        client.create_vm(memory_mib=64)
    assert caught.value.code == "invalid_argument"
    assert "config.memory.size_bytes" in caught.value.message
    with pytest.raises(MetaldClientError) as caught:
        MetaldClient(address, "not-a-dev-token").list_vms()
    assert caught.value.code == "unauthenticated"


def test_sync_unreachable_server() -> None:
    address = f"http://127.0.0.1:{_unused_port()}"
    with pytest.raises(MetaldClientError) as caught:
        MetaldClient(address, TOKEN, timeout=5).list_vms()
    assert caught.value.code == "unavailable"
    assert caught.value.message.startswith(f"cannot reach {address}: ")


def test_sync_list_filters_and_pages(address: str) -> None:
    client = MetaldClient(address, TOKEN)
    ids = [client.create_vm(vm_id=f"vm-{i}").vm_id for i in range(5)]
    client.boot_vm(ids[1])
    client.boot_vm(ids[3])
    first = client.list_vms(page_size=2)
    assert [vm.vm_id for vm in first.vms] == ids[:2]
    assert first.next_page_token
    assert first.total_count == 5
    second = client.list_vms(page_size=2, page_token=first.next_page_token)
    assert [vm.vm_id for vm in second.vms] == ids[2:4]
    assert [vm.vm_id for vm in client.iter_vms(page_size=2)] == ids
    running = client.iter_vms(states=["running"], page_size=1)
    assert [vm.vm_id for vm in running] == [ids[1], ids[3]]
    # A customer may name itself in the operator's filter, and no one else.
    assert [vm.vm_id for vm in client.iter_vms(page_size=2, customer_id="acme")] == ids
    with pytest.raises(MetaldClientError) as caught:
        client.list_vms(customer_id="globex")
    assert caught.value.code == "permission_denied"


class _LoopingPages(VmHandlers):
    """A broken server (the real service never does this): the same page for ever."""

    async def list_vms(self, request: Any, ctx: RequestContext[Any, Any], /) -> pb.ListVmsResponse:
        return pb.ListVmsResponse(vms=[pb.VmInfo(vm_id="same")], next_page_token="again")


def test_iter_vms_stops_on_a_looping_server() -> None:
    with serve_fake_daemon(_LoopingPages) as daemon:
        client = MetaldClient(daemon.address, TOKEN)
        with pytest.raises(MetaldClientError) as caught:
            list(client.iter_vms())
    assert caught.value.code == "internal"


async def test_async_lifecycle(address: str, daemon: FakeDaemon) -> None:
    async with AsyncMetaldClient(address, TOKEN) as client:
        created = await client.create_vm(vm_id="a1", kernel_path="vmlinux")
        assert (created.vm_id, created.state) == ("a1", pb.VM_STATE_CREATED)
        assert (await client.boot_vm("a1")).state == pb.VM_STATE_RUNNING
        assert (await client.pause_vm("a1")).state == pb.VM_STATE_PAUSED
        assert (await client.resume_vm("a1")).state == pb.VM_STATE_RUNNING
        assert (await client.reboot_vm("a1")).state == pb.VM_STATE_RUNNING
        info = await client.get_vm_info("a1")
        assert info.config.boot.kernel_path == "vmlinux"
        with pytest.raises(MetaldClientError) as caught:
            await client.delete_vm("a1")
        assert caught.value.code == "failed_precondition"
        assert (await client.shutdown_vm("a1", force=True)).state == pb.VM_STATE_SHUTDOWN
        await client.create_vm(vm_id="a2")
        await client.create_vm(vm_id="a3")
        listed = [vm.vm_id async for vm in client.iter_vms(page_size=1)]
        assert listed == ["a1", "a2", "a3"]
        page = await client.list_vms(states=[pb.VM_STATE_SHUTDOWN])
        assert [vm.vm_id for vm in page.vms] == ["a1"]
        assert (await client.delete_vm("a1", force=True)).success
    assert {call.authorization for call in daemon.calls} == {f"Bearer {TOKEN}"}


async def test_async_errors() -> None:
    address = f"http://127.0.0.1:{_unused_port()}"
    async with AsyncMetaldClient(address, TOKEN, timeout=5) as client:
        with pytest.raises(MetaldClientError) as caught:
            await client.get_vm_info("x")
    assert caught.value.code == "unavailable"
    assert "cannot reach" in caught.value.message


def _create_with_network(network: str | None) -> pb.CreateVmRequest:
    return _build.create_vm(
        vcpus=1,
        memory_mib=256,
        kernel_path=None,
        initrd_path=None,
        kernel_args=None,
        disks=(),
        metadata=None,
        vm_id=None,
        network=network,
    ).request


def test_create_request_with_a_network_card() -> None:
    assert list(_create_with_network(None).config.network) == []
    (nic,) = _create_with_network("ipv4-only").config.network
    assert (nic.id, nic.mode) == ("eth0", pb.NETWORK_MODE_IPV4_ONLY)
    with pytest.raises(MetaldClientError) as caught:
        _create_with_network("ipx")
    assert caught.value.code == "invalid_argument" and "dual-stack" in caught.value.message
