"""The blocking client."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Self, TypeVar, cast

from connectrpc.errors import ConnectError
from pyqwest import SyncClient, SyncHTTPTransport

from metald.client import _build
from metald.client._build import Disk, Rpc
from metald.client.convert import VmStateLike
from metald.gen.vmprovisioner.v1 import vm_pb2
from metald.gen.vmprovisioner.v1.vm_connect import VmServiceClientSync

T = TypeVar("T")


class MetaldClient:
    """Blocking client for metald's VmService (Connect protocol, binary protobuf).

    Every method returns the response message and raises `MetaldClientError` on failure.

        with MetaldClient("http://127.0.0.1:8080", "dev_customer_acme") as client:
            vm = client.create_vm(vcpus=2, memory_mib=512)
            client.boot_vm(vm.vm_id)
    """

    def __init__(
        self,
        address: str,
        token: str | None,
        *,
        timeout: float = 60.0,
        ca_file: str | Path | None = None,
        cert_file: str | Path | None = None,
        key_file: str | Path | None = None,
    ) -> None:
        """`ca_file`: the CA of an https:// server (default: the system's); `cert_file` and
        `key_file`: a client certificate for mTLS (then `token` may be None)."""
        tls = _build.tls_options(address, ca_file, cert_file, key_file)
        self._settings = _build.ClientSettings(address, token, timeout, tls)
        self._transport = (
            SyncHTTPTransport(**tls.transport_arguments()) if tls is not None else None
        )
        http = SyncClient(self._transport) if self._transport is not None else None
        self._stub = VmServiceClientSync(
            self._settings.address, send_compression=None, http_client=http
        )

    @property
    def address(self) -> str:
        return self._settings.address

    def close(self) -> None:
        self._stub.close()
        if self._transport is not None:
            self._transport.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _invoke(self, rpc: Rpc[T]) -> T:
        method = getattr(self._stub, rpc.method)
        try:
            response = method(
                rpc.request,
                headers=self._settings.headers,
                timeout_ms=self._settings.call_timeout_ms(rpc),
            )
        except ConnectError as err:
            raise self._settings.error(err, rpc) from err
        return cast(T, response)

    def create_vm(
        self,
        *,
        vcpus: int = 1,
        memory_mib: int = 256,
        kernel_path: str | None = None,
        initrd_path: str | None = None,
        kernel_args: str | None = None,
        disks: Iterable[Disk | str] = (),
        metadata: Mapping[str, str] | None = None,
        vm_id: str | None = None,
        network: str | None = None,
    ) -> vm_pb2.CreateVmResponse:
        return self._invoke(
            _build.create_vm(
                vcpus=vcpus,
                memory_mib=memory_mib,
                kernel_path=kernel_path,
                initrd_path=initrd_path,
                kernel_args=kernel_args,
                disks=disks,
                metadata=metadata,
                vm_id=vm_id,
                network=network,
            )
        )

    def boot_vm(self, vm_id: str) -> vm_pb2.BootVmResponse:
        return self._invoke(_build.boot_vm(vm_id))

    def pause_vm(self, vm_id: str) -> vm_pb2.PauseVmResponse:
        return self._invoke(_build.pause_vm(vm_id))

    def resume_vm(self, vm_id: str) -> vm_pb2.ResumeVmResponse:
        return self._invoke(_build.resume_vm(vm_id))

    def reboot_vm(self, vm_id: str, *, force: bool = False) -> vm_pb2.RebootVmResponse:
        return self._invoke(_build.reboot_vm(vm_id, force))

    def shutdown_vm(
        self, vm_id: str, *, force: bool = False, timeout_seconds: int = 0
    ) -> vm_pb2.ShutdownVmResponse:
        return self._invoke(
            _build.shutdown_vm(vm_id, force, timeout_seconds, self._settings.timeout)
        )

    def delete_vm(self, vm_id: str, *, force: bool = False) -> vm_pb2.DeleteVmResponse:
        return self._invoke(_build.delete_vm(vm_id, force))

    def get_vm_info(self, vm_id: str) -> vm_pb2.GetVmInfoResponse:
        return self._invoke(_build.get_vm_info(vm_id))

    def get_vm_console(
        self, vm_id: str, *, offset: int = 0, max_bytes: int = 0
    ) -> vm_pb2.GetVmConsoleResponse:
        """The VM's console output from byte `offset` (negative: the last -offset bytes);
        pass the response's next_offset as the next offset to follow it."""
        return self._invoke(_build.get_vm_console(vm_id, offset, max_bytes))

    def list_vms(
        self,
        *,
        states: Iterable[VmStateLike] = (),
        page_size: int = 0,
        page_token: str = "",
        customer_id: str = "",
    ) -> vm_pb2.ListVmsResponse:
        """One page of VMs; `customer_id`: an operator's filter (a customer may name only
        itself)."""
        return self._invoke(_build.list_vms(states, page_size, page_token, customer_id))

    def iter_vms(
        self, *, states: Iterable[VmStateLike] = (), page_size: int = 0, customer_id: str = ""
    ) -> Iterator[vm_pb2.VmInfo]:
        """Every VM (of the caller; of every customer or `customer_id` for an operator),
        following next_page_token across pages."""
        states = tuple(states)
        pages = _build.PageTracker()
        while True:
            response = self.list_vms(
                states=states, page_size=page_size, page_token=pages.token, customer_id=customer_id
            )
            yield from response.vms
            if not pages.advance(response):
                return
