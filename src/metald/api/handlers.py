"""The VmService RPCs (the existing API's nine and GetVmConsole): proto in, service call,
proto out. The caller is the one the auth interceptor set (api/auth.py current_caller)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

from connectrpc.request import RequestContext

from metald.api import convert
from metald.api.auth import current_caller
from metald.gen.vmprovisioner.v1 import vm_pb2 as pb
from metald.service.vm_service import VmService

T = TypeVar("T")
Ctx = RequestContext[Any, Any]


async def _to_completion(operation: Awaitable[T]) -> T:
    """A client that hangs up must not cancel an operation half-way (a VMM started but not
    recorded): the operation finishes on its own, only the wait for it is cancelled."""
    return await asyncio.shield(asyncio.ensure_future(operation))


class VmHandlers:
    def __init__(self, service: VmService) -> None:
        self._service = service

    async def create_vm(self, request: pb.CreateVmRequest, ctx: Ctx, /) -> pb.CreateVmResponse:
        vm = await _to_completion(
            self._service.create_vm(
                current_caller.get(),
                request.vm_id,
                convert.config_from_pb(request.config),
                request.customer_id,
            )
        )
        return pb.CreateVmResponse(vm_id=vm.id, state=convert.state_to_pb(vm.state))

    async def delete_vm(self, request: pb.DeleteVmRequest, ctx: Ctx, /) -> pb.DeleteVmResponse:
        await _to_completion(
            self._service.delete_vm(current_caller.get(), request.vm_id, force=request.force)
        )
        return pb.DeleteVmResponse(success=True)

    async def boot_vm(self, request: pb.BootVmRequest, ctx: Ctx, /) -> pb.BootVmResponse:
        vm = await _to_completion(self._service.boot_vm(current_caller.get(), request.vm_id))
        return pb.BootVmResponse(success=True, state=convert.state_to_pb(vm.state))

    async def shutdown_vm(
        self, request: pb.ShutdownVmRequest, ctx: Ctx, /
    ) -> pb.ShutdownVmResponse:
        vm = await _to_completion(
            self._service.shutdown_vm(
                current_caller.get(),
                request.vm_id,
                force=request.force,
                timeout_seconds=request.timeout_seconds,
            )
        )
        return pb.ShutdownVmResponse(success=True, state=convert.state_to_pb(vm.state))

    async def pause_vm(self, request: pb.PauseVmRequest, ctx: Ctx, /) -> pb.PauseVmResponse:
        vm = await _to_completion(self._service.pause_vm(current_caller.get(), request.vm_id))
        return pb.PauseVmResponse(success=True, state=convert.state_to_pb(vm.state))

    async def resume_vm(self, request: pb.ResumeVmRequest, ctx: Ctx, /) -> pb.ResumeVmResponse:
        vm = await _to_completion(self._service.resume_vm(current_caller.get(), request.vm_id))
        return pb.ResumeVmResponse(success=True, state=convert.state_to_pb(vm.state))

    async def reboot_vm(self, request: pb.RebootVmRequest, ctx: Ctx, /) -> pb.RebootVmResponse:
        vm = await _to_completion(self._service.reboot_vm(current_caller.get(), request.vm_id))
        return pb.RebootVmResponse(success=True, state=convert.state_to_pb(vm.state))

    async def get_vm_info(self, request: pb.GetVmInfoRequest, ctx: Ctx, /) -> pb.GetVmInfoResponse:
        vm, usage, info, network = await self._service.get_vm(current_caller.get(), request.vm_id)
        return pb.GetVmInfoResponse(
            vm_id=vm.id,
            config=convert.config_to_pb(vm.config),
            state=convert.state_to_pb(vm.state),
            metrics=convert.usage_to_pb(usage, network.counters if network else None),
            backend_info=info,
            network_info=convert.network_info_to_pb(network),
        )

    async def list_vms(self, request: pb.ListVmsRequest, ctx: Ctx, /) -> pb.ListVmsResponse:
        page = await self._service.list_vms(
            current_caller.get(),
            convert.states_from_pb(list(request.state_filter)),
            request.page_size,
            request.page_token,
            request.customer_id,
        )
        return pb.ListVmsResponse(
            vms=[convert.vm_info_to_pb(vm) for vm in page.vms],
            next_page_token=page.next_token,
            total_count=page.total_count,
        )

    async def get_vm_console(
        self, request: pb.GetVmConsoleRequest, ctx: Ctx, /
    ) -> pb.GetVmConsoleResponse:
        chunk = await self._service.get_console(
            current_caller.get(), request.vm_id, request.offset, request.max_bytes
        )
        return pb.GetVmConsoleResponse(
            data=chunk.data, offset=chunk.offset, next_offset=chunk.next_offset, size=chunk.size
        )
