"""An in-memory VmService served over real HTTP, for testing code that uses the SDK.

This is not metald: no VMs, no store, only the state machine and the auth and ownership
rules of the API (§1 of the design). It is served by the generated
`VmServiceASGIApplication` under hypercorn, so clients exercise the real Connect wire protocol.

    with serve_in_thread(VmServiceASGIApplication(InMemoryVmService())) as address:
        MetaldClient(address, "dev_customer_acme").list_vms()
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext
from hypercorn.asyncio import serve
from hypercorn.config import Config

from metald.gen.vmprovisioner.v1 import vm_pb2

DEV_TOKEN_PREFIX = "dev_customer_"

S = vm_pb2.VmState
# operation -> {state it may start from: state it ends in} (mirrors core/states.py)
_TRANSITIONS: dict[str, dict[vm_pb2.VmState, vm_pb2.VmState]] = {
    "boot": {S.VM_STATE_CREATED: S.VM_STATE_RUNNING, S.VM_STATE_SHUTDOWN: S.VM_STATE_RUNNING},
    "pause": {S.VM_STATE_RUNNING: S.VM_STATE_PAUSED},
    "resume": {S.VM_STATE_PAUSED: S.VM_STATE_RUNNING},
    "reboot": {S.VM_STATE_RUNNING: S.VM_STATE_RUNNING},
    "shutdown": {S.VM_STATE_RUNNING: S.VM_STATE_SHUTDOWN, S.VM_STATE_PAUSED: S.VM_STATE_SHUTDOWN},
}


@dataclass
class FakeVm:
    vm_id: str
    customer_id: str
    config: Any  # vm_pb2.VmConfig
    state: vm_pb2.VmState = S.VM_STATE_CREATED
    created: int = 0


@dataclass
class InMemoryVmService:
    """VmService keeping VMs in a dict. `calls` records (method, request, authorization)."""

    vms: dict[str, FakeVm] = field(default_factory=dict)
    calls: list[tuple[str, Any, str]] = field(default_factory=list)
    _ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    def _customer(self, name: str, request: Any, ctx: RequestContext[Any, Any]) -> str:
        authorization = ctx.request_headers.get("authorization", "")
        self.calls.append((name, request, authorization))
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.startswith(DEV_TOKEN_PREFIX):
            raise ConnectError(Code.UNAUTHENTICATED, "missing or invalid bearer token")
        return token.removeprefix(DEV_TOKEN_PREFIX)

    def _vm(self, customer: str, vm_id: str) -> FakeVm:
        vm = self.vms.get(vm_id)
        if vm is None:
            raise ConnectError(Code.NOT_FOUND, f"vm {vm_id} not found")
        if vm.customer_id != customer:
            raise ConnectError(Code.PERMISSION_DENIED, f"vm {vm_id} belongs to another customer")
        return vm

    def _move(self, name: str, request: Any, ctx: RequestContext[Any, Any]) -> FakeVm:
        vm = self._vm(self._customer(name, request, ctx), request.vm_id)
        allowed = _TRANSITIONS[name]
        if vm.state not in allowed:
            state = vm_pb2.VmState.Name(vm.state).removeprefix("VM_STATE_")
            raise ConnectError(Code.FAILED_PRECONDITION, f"cannot {name} a vm in state {state}")
        vm.state = allowed[vm.state]
        return vm

    async def create_vm(
        self, request: Any, ctx: RequestContext[Any, Any]
    ) -> vm_pb2.CreateVmResponse:
        customer = self._customer("create", request, ctx)
        if request.config.cpu.vcpu_count <= 0:
            raise ConnectError(Code.INVALID_ARGUMENT, "config.cpu.vcpu_count must be positive")
        vm_id = request.vm_id or f"vm-{next(self._ids):04d}"
        if vm_id in self.vms:
            raise ConnectError(Code.ALREADY_EXISTS, f"vm {vm_id} already exists")
        self.vms[vm_id] = FakeVm(vm_id, customer, request.config, created=1_700_000_000)
        return vm_pb2.CreateVmResponse(vm_id=vm_id, state=S.VM_STATE_CREATED)

    async def boot_vm(self, request: Any, ctx: RequestContext[Any, Any]) -> vm_pb2.BootVmResponse:
        vm = self._move("boot", request, ctx)
        return vm_pb2.BootVmResponse(success=True, state=vm.state)

    async def pause_vm(self, request: Any, ctx: RequestContext[Any, Any]) -> vm_pb2.PauseVmResponse:
        vm = self._move("pause", request, ctx)
        return vm_pb2.PauseVmResponse(success=True, state=vm.state)

    async def resume_vm(
        self, request: Any, ctx: RequestContext[Any, Any]
    ) -> vm_pb2.ResumeVmResponse:
        vm = self._move("resume", request, ctx)
        return vm_pb2.ResumeVmResponse(success=True, state=vm.state)

    async def reboot_vm(
        self, request: Any, ctx: RequestContext[Any, Any]
    ) -> vm_pb2.RebootVmResponse:
        vm = self._move("reboot", request, ctx)
        return vm_pb2.RebootVmResponse(success=True, state=vm.state)

    async def shutdown_vm(
        self, request: Any, ctx: RequestContext[Any, Any]
    ) -> vm_pb2.ShutdownVmResponse:
        vm = self._move("shutdown", request, ctx)
        return vm_pb2.ShutdownVmResponse(success=True, state=vm.state)

    async def delete_vm(
        self, request: Any, ctx: RequestContext[Any, Any]
    ) -> vm_pb2.DeleteVmResponse:
        vm = self._vm(self._customer("delete", request, ctx), request.vm_id)
        live = (S.VM_STATE_RUNNING, S.VM_STATE_PAUSED)
        if vm.state in live and not request.force:
            state = vm_pb2.VmState.Name(vm.state).removeprefix("VM_STATE_")
            raise ConnectError(
                Code.FAILED_PRECONDITION, f"vm is {state}: shut it down or use force"
            )
        del self.vms[vm.vm_id]
        return vm_pb2.DeleteVmResponse(success=True)

    async def get_vm_info(
        self, request: Any, ctx: RequestContext[Any, Any]
    ) -> vm_pb2.GetVmInfoResponse:
        vm = self._vm(self._customer("info", request, ctx), request.vm_id)
        return vm_pb2.GetVmInfoResponse(
            vm_id=vm.vm_id,
            config=vm.config,
            state=vm.state,
            backend_info={"backend": "in-memory"},
            network_info=vm_pb2.VmNetworkInfo(ip_address="10.100.0.2", tap_device="tap0"),
        )

    async def list_vms(self, request: Any, ctx: RequestContext[Any, Any]) -> vm_pb2.ListVmsResponse:
        customer = self._customer("list", request, ctx)
        mine = [
            vm
            for vm in self.vms.values()
            if vm.customer_id == customer
            and (not request.state_filter or vm.state in request.state_filter)
        ]
        start = int(request.page_token or "0")
        end = len(mine) if request.page_size <= 0 else start + request.page_size
        page = mine[start:end]
        return vm_pb2.ListVmsResponse(
            vms=[
                vm_pb2.VmInfo(
                    vm_id=vm.vm_id,
                    state=vm.state,
                    vcpu_count=vm.config.cpu.vcpu_count,
                    memory_size_bytes=vm.config.memory.size_bytes,
                    created_timestamp=vm.created,
                    modified_timestamp=vm.created,
                    metadata=dict(vm.config.metadata),
                    customer_id=vm.customer_id,
                )
                for vm in page
            ],
            next_page_token=str(end) if end < len(mine) else "",
            total_count=len(mine),
        )


@contextlib.contextmanager
def serve_in_thread(app: Any) -> Iterator[str]:
    """Serve an ASGI app with hypercorn on 127.0.0.1 (a free port) in a background thread.

    Yields the base address (`http://127.0.0.1:<port>`); stops the server on exit.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)  # connections queue from here on, so no wait for start-up is needed
    port = sock.getsockname()[1]

    config = Config()
    config.bind = [f"fd://{sock.detach()}"]  # hypercorn owns (and closes) the socket now
    config.accesslog = None
    config.errorlog = None
    config.graceful_timeout = 1.0

    loop = asyncio.new_event_loop()
    stop = threading.Event()
    stopped = asyncio.Event()
    failure: list[BaseException] = []

    async def main() -> None:
        async def wait_for_stop() -> None:
            await stopped.wait()

        await serve(app, config, shutdown_trigger=wait_for_stop)

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(main())
        except BaseException as err:  # reported to the test thread below
            failure.append(err)
        finally:
            loop.close()
            stop.set()

    thread = threading.Thread(target=run, name=f"fake-metald-{port}", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        if not stop.is_set():
            loop.call_soon_threadsafe(stopped.set)
        thread.join(timeout=10)
        if thread.is_alive():
            raise RuntimeError("fake metald server did not stop")
        if failure:
            raise RuntimeError("fake metald server failed") from failure[0]
