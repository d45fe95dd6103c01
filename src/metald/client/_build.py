"""Request building shared by the sync and async clients.

Each function returns an `Rpc`: the generated client's method name, the request message and an
optional longer deadline. The clients only send it and translate errors.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from connectrpc.errors import ConnectError

from metald.client.convert import VmStateLike, parse_state
from metald.client.errors import MetaldClientError, from_connect_error
from metald.gen.vmprovisioner.v1 import vm_pb2

MIB = 1024 * 1024
DEFAULT_ADDRESS = "http://127.0.0.1:8080"
# Extra time allowed past a graceful-shutdown timeout before the client gives up waiting.
SHUTDOWN_GRACE_SECONDS = 30.0


@dataclass(frozen=True, slots=True)
class Disk:
    """A disk to attach. The first disk is the root device unless another one says `root`."""

    path: str
    read_only: bool = False
    root: bool | None = None
    id: str = ""
    interface_type: str = ""

    @classmethod
    def parse(cls, spec: str) -> Disk:
        """`PATH`, `PATH:ro` or `PATH:rw` (as the CLI's --disk takes it)."""
        path, read_only = spec, False
        if spec.endswith((":ro", ":rw")):
            path, read_only = spec[:-3], spec.endswith(":ro")
        if not path:
            raise ValueError(f"invalid disk {spec!r}: expected PATH or PATH:ro")
        return cls(path=path, read_only=read_only)


T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Rpc(Generic[T]):
    """One call: `T` is its response message type."""

    method: str  # attribute of the generated VmServiceClient / VmServiceClientSync
    request: Any  # the request message
    timeout: float | None = None  # seconds, when this call needs longer than the default


def normalize_address(address: str) -> str:
    """`127.0.0.1:8080` -> `http://127.0.0.1:8080`; no trailing slash."""
    address = address.strip().rstrip("/")
    if not address:
        raise ValueError("server address must not be empty")
    if "://" not in address:
        address = "http://" + address
    return address


def _invalid(err: Exception) -> MetaldClientError:
    return MetaldClientError("invalid_argument", str(err))


def _storage(disks: Iterable[Disk | str]) -> list[vm_pb2.StorageDevice]:
    specs = [Disk.parse(d) if isinstance(d, str) else d for d in disks]
    explicit_root = any(d.root for d in specs)
    devices = []
    for index, disk in enumerate(specs):
        root = bool(disk.root) if explicit_root else (disk.root is not False and index == 0)
        devices.append(
            vm_pb2.StorageDevice(
                id=disk.id or ("rootfs" if root else f"disk{index}"),
                path=disk.path,
                read_only=disk.read_only,
                is_root_device=root,
                interface_type=disk.interface_type,
            )
        )
    return devices


NETWORK_MODES = {
    "dual-stack": vm_pb2.NETWORK_MODE_DUAL_STACK,
    "ipv4-only": vm_pb2.NETWORK_MODE_IPV4_ONLY,
    "ipv6-only": vm_pb2.NETWORK_MODE_IPV6_ONLY,
}


def create_vm(
    *,
    vcpus: int,
    memory_mib: int,
    kernel_path: str | None,
    initrd_path: str | None,
    kernel_args: str | None,
    disks: Iterable[Disk | str],
    metadata: Mapping[str, str] | None,
    vm_id: str | None,
    network: str | None = None,
) -> Rpc[vm_pb2.CreateVmResponse]:
    try:
        config = vm_pb2.VmConfig(
            cpu=vm_pb2.CpuConfig(vcpu_count=vcpus),
            memory=vm_pb2.MemoryConfig(size_bytes=memory_mib * MIB),
            storage=_storage(disks),
            metadata=dict(metadata or {}),
        )
        if kernel_path or initrd_path or kernel_args:
            # Left out otherwise, so the server picks its default guest.
            config.boot.CopyFrom(
                vm_pb2.BootConfig(
                    kernel_path=kernel_path or "",
                    initrd_path=initrd_path or "",
                    kernel_args=kernel_args or "",
                )
            )
        if network is not None:
            if network not in NETWORK_MODES:
                raise ValueError(f"network must be one of {', '.join(NETWORK_MODES)}")
            config.network.add(id="eth0", mode=NETWORK_MODES[network])
        request = vm_pb2.CreateVmRequest(vm_id=vm_id or "", config=config)
    except (TypeError, ValueError) as err:
        raise _invalid(err) from err
    return Rpc("create_vm", request)


def boot_vm(vm_id: str) -> Rpc[vm_pb2.BootVmResponse]:
    return Rpc("boot_vm", vm_pb2.BootVmRequest(vm_id=vm_id))


def pause_vm(vm_id: str) -> Rpc[vm_pb2.PauseVmResponse]:
    return Rpc("pause_vm", vm_pb2.PauseVmRequest(vm_id=vm_id))


def resume_vm(vm_id: str) -> Rpc[vm_pb2.ResumeVmResponse]:
    return Rpc("resume_vm", vm_pb2.ResumeVmRequest(vm_id=vm_id))


def reboot_vm(vm_id: str, force: bool) -> Rpc[vm_pb2.RebootVmResponse]:
    return Rpc("reboot_vm", vm_pb2.RebootVmRequest(vm_id=vm_id, force=force))


def shutdown_vm(
    vm_id: str, force: bool, timeout_seconds: int, default_timeout: float
) -> Rpc[vm_pb2.ShutdownVmResponse]:
    try:
        request = vm_pb2.ShutdownVmRequest(
            vm_id=vm_id, force=force, timeout_seconds=timeout_seconds
        )
    except (TypeError, ValueError) as err:
        raise _invalid(err) from err
    # A graceful shutdown may legitimately take timeout_seconds: wait at least that long.
    wait = max(default_timeout, timeout_seconds + SHUTDOWN_GRACE_SECONDS)
    return Rpc("shutdown_vm", request, timeout=wait if wait != default_timeout else None)


def delete_vm(vm_id: str, force: bool) -> Rpc[vm_pb2.DeleteVmResponse]:
    return Rpc("delete_vm", vm_pb2.DeleteVmRequest(vm_id=vm_id, force=force))


def get_vm_info(vm_id: str) -> Rpc[vm_pb2.GetVmInfoResponse]:
    return Rpc("get_vm_info", vm_pb2.GetVmInfoRequest(vm_id=vm_id))


def get_vm_console(vm_id: str, offset: int, max_bytes: int) -> Rpc[vm_pb2.GetVmConsoleResponse]:
    try:
        request = vm_pb2.GetVmConsoleRequest(vm_id=vm_id, offset=offset, max_bytes=max_bytes)
    except (TypeError, ValueError) as err:
        raise _invalid(err) from err
    return Rpc("get_vm_console", request)


def list_vms(
    states: Iterable[VmStateLike], page_size: int, page_token: str, customer_id: str = ""
) -> Rpc[vm_pb2.ListVmsResponse]:
    try:
        request = vm_pb2.ListVmsRequest(
            state_filter=[parse_state(s) for s in states],
            page_size=page_size,
            page_token=page_token,
            customer_id=customer_id,
        )
    except (TypeError, ValueError) as err:
        raise _invalid(err) from err
    return Rpc("list_vms", request)


class PageTracker:
    """Follows next_page_token, refusing a token the server already returned (a loop)."""

    def __init__(self) -> None:
        self._seen: set[str] = set()
        self.token = ""

    def advance(self, response: vm_pb2.ListVmsResponse) -> bool:
        """Record a page; True if there is another page to fetch."""
        token: str = response.next_page_token
        if not token:
            return False
        if token in self._seen:
            raise MetaldClientError(
                "internal", f"server returned page token {token!r} twice; stopping"
            )
        self._seen.add(token)
        self.token = token
        return True


def timeout_ms(seconds: float | None) -> int | None:
    """connectrpc wants milliseconds; None or a non-finite value means no deadline."""
    if seconds is None or not math.isfinite(seconds) or seconds <= 0:
        return None
    return max(1, round(seconds * 1000))


@dataclass(frozen=True, slots=True)
class TlsOptions:
    """TLS to an https:// address: the CA to trust (else the system's) and, for mTLS, the
    client certificate and key (PEM files)."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("a client certificate needs its key (and a key its certificate)")

    @property
    def client_certificate(self) -> bool:
        return self.cert_file is not None

    def transport_arguments(self) -> dict[str, Any]:
        """pyqwest's (Sync)HTTPTransport TLS arguments; files are read now (OSError)."""
        return {
            "tls_ca_cert": self.ca_file.read_bytes() if self.ca_file else None,
            "tls_include_system_certs": self.ca_file is None,
            "tls_cert": self.cert_file.read_bytes() if self.cert_file else None,
            "tls_key": self.key_file.read_bytes() if self.key_file else None,
        }


def tls_options(
    address: str,
    ca_file: str | Path | None,
    cert_file: str | Path | None,
    key_file: str | Path | None,
) -> TlsOptions | None:
    """TLS options for an https:// address (None for http://, which takes none of them)."""
    files = (ca_file, cert_file, key_file)
    if not normalize_address(address).startswith("https://"):
        if any(f is not None for f in files):
            raise ValueError("a CA file or client certificate needs an https:// address")
        return None
    ca, cert, key = (Path(f) if f is not None else None for f in files)
    return TlsOptions(ca, cert, key)


class ClientSettings:
    """What both clients hold: the address, the auth header, the default deadline and TLS.

    The token may be left out only when a client certificate names the caller (mTLS)."""

    def __init__(
        self, address: str, token: str | None, timeout: float, tls: TlsOptions | None = None
    ) -> None:
        if not token and not (tls is not None and tls.client_certificate):
            raise ValueError("token must not be empty (without a client certificate)")
        self.address = normalize_address(address)
        if tls is not None and not self.address.startswith("https://"):
            raise ValueError(f"TLS options need an https:// address, not {self.address}")
        self.timeout = timeout
        self.tls = tls
        self.headers = {"authorization": f"Bearer {token}"} if token else {}

    def call_timeout_ms(self, rpc: Rpc[Any]) -> int | None:
        return timeout_ms(self.timeout if rpc.timeout is None else rpc.timeout)

    def error(self, err: ConnectError, rpc: Rpc[Any]) -> MetaldClientError:
        return from_connect_error(
            err, self.address, self.timeout if rpc.timeout is None else rpc.timeout
        )
