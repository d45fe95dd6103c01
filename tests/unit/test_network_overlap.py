"""network/port.py: a VM's network is built while its VMM starts. `setup` returns once the
addresses and namespace exist (the manager's on_reserved call, made from a worker thread as
the real build does) and the rest of the build goes on; `ready` and `attach` wait for it and
raise its error; `teardown` waits for it to end before it removes anything. The manager is a
stand-in whose build the test releases step by step."""

from __future__ import annotations

import asyncio
import ipaddress
import threading
from typing import Any

import pytest

from metald.core.errors import InvalidArgument
from metald.core.models import NetworkInterface, NetworkMode, TrafficCounters
from metald.network.context import NetworkError
from metald.network.models import NetworkSettings, VmNetwork
from metald.network.port import NetlinkNetwork

NIC = (NetworkInterface(id="eth0", mode=NetworkMode.IPV4_ONLY),)


class SteppedManager:
    """setup_vm reserves (on_reserved from a thread), then waits for `finish` to be set."""

    def __init__(self, fail_before: Exception | None = None, fail_after: Exception | None = None):
        self.settings = NetworkSettings()
        self.finish = threading.Event()
        self.fail_before = fail_before
        self.fail_after = fail_after
        self.events: list[str] = []

    async def setup_vm(
        self, vm_id: str, customer_id: str, request: Any, on_reserved: Any = None
    ) -> VmNetwork:
        return await asyncio.to_thread(self._build, vm_id, on_reserved)

    def _build(self, vm_id: str, on_reserved: Any) -> VmNetwork:
        if self.fail_before is not None:
            raise self.fail_before
        net = VmNetwork(
            vm_id=vm_id, customer_id="acme", netns=f"ns-{vm_id}", tap="tap0",
            mac="02:00:00:00:00:01", mode=NetworkMode.IPV4_ONLY,
            ipv4=ipaddress.IPv4Interface("10.100.0.5/16"), ipv6=None,
            gateway4=ipaddress.IPv4Address("10.100.0.1"), gateway6=None,
        )  # fmt: skip
        self.events.append("reserved")
        on_reserved(net)
        if not self.finish.wait(10):
            raise AssertionError("the test never released the build")
        if self.fail_after is not None:
            self.events.append("build failed")
            raise self.fail_after
        self.events.append("built")
        return net

    async def attach_tap(self, vm_id: str) -> None:
        self.events.append("attach")

    async def teardown_vm(self, vm_id: str) -> None:
        self.events.append("teardown")

    async def stats(self, vm_id: str) -> TrafficCounters:
        return TrafficCounters()


async def test_setup_returns_the_nic_while_the_build_goes_on_and_ready_waits() -> None:
    manager = SteppedManager()
    port = NetlinkNetwork(manager)  # type: ignore[arg-type]
    nic = await asyncio.wait_for(port.setup("vm-1", "acme", NIC), 5)
    assert nic is not None and nic.netns == "ns-vm-1" and nic.tap == "tap0"
    assert manager.events == ["reserved"]  # returned before the rest was built
    ready = asyncio.ensure_future(port.ready("vm-1"))
    attach = asyncio.ensure_future(port.attach("vm-1"))
    await asyncio.sleep(0.05)
    assert not ready.done() and not attach.done()
    manager.finish.set()
    await asyncio.wait_for(asyncio.gather(ready, attach), 5)
    assert manager.events == ["reserved", "built", "attach"]  # the TAP joins after the build
    assert await port.describe("vm-1", "acme", NIC) is not None  # kept, no manager call


async def test_a_build_that_fails_after_the_namespace_fails_ready_and_attach() -> None:
    manager = SteppedManager(fail_after=NetworkError("filters refused"))
    port = NetlinkNetwork(manager)  # type: ignore[arg-type]
    assert await port.setup("vm-1", "acme", NIC) is not None
    manager.finish.set()
    with pytest.raises(NetworkError, match="filters refused"):
        await port.attach("vm-1")
    assert "attach" not in manager.events  # never joined a half-built network
    await port.teardown("vm-1")
    assert manager.events[-1] == "teardown"


async def test_a_build_that_fails_before_the_namespace_fails_setup() -> None:
    manager = SteppedManager(fail_before=InvalidArgument("config.network[0]", "no address"))
    port = NetlinkNetwork(manager)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="no address"):
        await port.setup("vm-1", "acme", NIC)
    await port.ready("vm-1")  # nothing under way any more


async def test_teardown_waits_for_the_build_to_end() -> None:
    manager = SteppedManager()
    port = NetlinkNetwork(manager)  # type: ignore[arg-type]
    assert await port.setup("vm-1", "acme", NIC) is not None
    teardown = asyncio.ensure_future(port.teardown("vm-1"))
    await asyncio.sleep(0.05)
    assert not teardown.done() and "teardown" not in manager.events
    manager.finish.set()
    await asyncio.wait_for(teardown, 5)
    assert manager.events == ["reserved", "built", "teardown"]
