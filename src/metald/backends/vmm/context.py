"""What the parts of the VMM runtime share: the driver, where VMs and jails live, the jail
settings, the timeouts, the host the driver found at start-up, and the answers that follow
from these alone (a VM's directory, where its jail is, the longest VM id that fits).

The runtime is split by job (launch, supervision, adoption and orphans, clean-up); each part
takes this context instead of reaching into the others' state. Start-up checks live here too:
they decide what the context may be used for (jailing needs root and a safe jail base; the
socket directory must leave room for VM ids).
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from metald.backends.vmm.driver import VmmDriver, VmmHost
from metald.backends.vmm.jail import JailSettings, load_jail_spec
from metald.backends.vmm.layout import (
    CONSOLE_LOG,
    JAILED_RUN_DIR,
    MAX_UNIX_SOCKET_PATH,
    MAX_VM_ID,
    VmLayout,
    check_vm_id,
    max_vm_id_length,
)
from metald.backends.vmm.process import VmmProcess
from metald.core.errors import BackendError
from metald.core.ports import JailIds
from metald.host import caps
from metald.jailer.needs import JAILER_CAPABILITIES
from metald.jailer.spares import Spares
from metald.jailer.spec import JailSpec

log = logging.getLogger(__name__)

# start() refuses a socket directory too long for ids of this length (generated ids are 19).
_ID_BUDGET = 24


@dataclass(frozen=True)
class LogCaps:
    """The most metald keeps of a VMM's console log and of its stderr file, and how often it
    looks (backends/vmm/logcaps.py)."""

    console_bytes: int = 1024 * 1024
    stderr_bytes: int = 256 * 1024
    interval: float = 1.0


class VmmContext:
    """One backend's configuration and host, shared by the runtime's parts."""

    def __init__(
        self,
        driver: VmmDriver,
        vm_root: Path,
        *,
        jail: JailSettings | None,
        guest_agent: bool,
        start_timeout: float,
        control_timeout: float,
        jail_ids: JailIds | None = None,
        log_caps: LogCaps | None = None,
    ) -> None:
        if jail is not None and jail.uid_range is not None and jail_ids is None:
            raise ValueError("per-VM jail ids (a uid range) need the JailIds store")
        self.jail_ids = jail_ids
        self.log_caps = log_caps or LogCaps()
        self.driver = driver
        self.vm_root = Path(vm_root)
        self.jail = jail
        self.guest_agent = guest_agent and driver.supports_guest_agent
        self.start_timeout = start_timeout
        self.control_timeout = control_timeout
        self.found_host: VmmHost | None = None  # set by start()
        # Jailer helpers started ahead of need (started by start(), ended by close()).
        self.spares: Spares | None = None if jail is None else Spares(jail.spare_helpers)

    @property
    def name(self) -> str:
        return self.driver.name

    @property
    def host(self) -> VmmHost:
        if self.found_host is None:
            raise BackendError(f"the {self.name} backend has not been started")
        return self.found_host

    async def start(self) -> None:
        """Check the host through the driver, the jail base and the socket budget; make
        vm_root."""
        host = await self.driver.probe()
        if self.jail is not None:
            if not caps.privileged(JAILER_CAPABILITIES):
                raise BackendError(
                    "jailing VMMs needs root or the capabilities "
                    f"{', '.join(caps.missing(JAILER_CAPABILITIES))}: run metald as root or "
                    "with them (or without the jailer, which only a development host should do)"
                )
            await asyncio.to_thread(self.jail.check_base, self.name)
        sockets_under = self._sockets_under()
        longest = self.max_vm_id()
        if longest < _ID_BUDGET:
            what = "jail base" if self.jail is not None else "VM directory"
            raise BackendError(
                f"the {what} {sockets_under} is too long for control socket paths "
                f"(AF_UNIX allows {MAX_UNIX_SOCKET_PATH} bytes): use a shorter one"
            )
        if longest < MAX_VM_ID:
            log.warning(
                "VM ids longer than %d characters cannot be used under %s (Unix socket path "
                "limit): a shorter directory lifts this",
                longest,
                sockets_under,
            )
        await asyncio.to_thread(self.vm_root.mkdir, parents=True, exist_ok=True)
        if self.spares is not None:
            self.spares.fill()
        self.found_host = host
        log.info(
            "%s %s: accelerator %s (%s)",
            self.name,
            host.version or "(version unknown)",
            host.accelerator,
            host.accelerator_reason,
        )

    async def ensure_started(self) -> None:
        if self.found_host is None:
            await self.start()

    def _sockets_under(self) -> Path:
        return self.jail.backend_dir(self.name) if self.jail is not None else self.vm_root

    def max_vm_id(self) -> int:
        """The longest VM id whose control socket path fits AF_UNIX here."""
        socket_name = self.driver.control_socket_name
        if self.jail is not None:
            suffix = f"/root{JAILED_RUN_DIR}/{socket_name}"
            return max_vm_id_length(self.jail.backend_dir(self.name), suffix)
        return max_vm_id_length(self.vm_root, f"/run/{socket_name}")

    def vm_dir(self, vm_id: str) -> Path:
        check_vm_id(vm_id)
        return self.vm_root / vm_id

    async def vmm_ids(self, vm_id: str) -> tuple[int, int]:
        """(uid, gid) the VM's VMM runs as: its own id from the store's range (claimed now if
        it holds none), else the shared jail user, else (run directly) metald's own."""
        jail = self.jail
        if jail is None:
            return os.geteuid(), os.getegid()
        if jail.uid_range is None or self.jail_ids is None:
            return jail.uid, jail.gid
        uid = await self.jail_ids.claim(vm_id)
        first, last = jail.uid_range
        if not first <= uid <= last:  # a store shared with a differently set metald
            raise BackendError(f"VM {vm_id} holds jail id {uid}, outside {first}-{last}")
        return uid, uid

    async def release_ids(self, vm_id: str) -> None:
        if self.jail_ids is not None:
            await self.jail_ids.release(vm_id)

    def jail_place(self, vm_id: str) -> JailSpec:
        """Where a VM's jail is (paths only)."""
        settings = self.jail
        assert settings is not None
        return JailSpec(
            vm_id=vm_id,
            uid=settings.uid,
            gid=settings.gid,
            argv=("/",),
            backend=self.name,
            jail_base=str(settings.chroot_base),
        )

    def saved_jail(self, layout: VmLayout) -> JailSpec | None:
        return load_jail_spec(layout.jail_spec_file, layout.vm_id, self.name)

    def jail_of(self, vm: VmmProcess | None, layout: VmLayout) -> JailSpec | None:
        """The jail of the VM's VMM (`vm`, the one the runtime knows, else the last one
        saved), None if the VM was not jailed."""
        if vm is not None and vm.jail is not None:
            return vm.jail
        return self.saved_jail(layout)

    def host_files(self, vm: VmmProcess | None, layout: VmLayout) -> tuple[Path, Path]:
        """(console log, control socket) on the host."""
        socket_name = self.driver.control_socket_name
        jail = self.jail_of(vm, layout)
        if jail is None and self.jail is not None and not layout.spec_file.exists():
            jail = self.jail_place(layout.vm_id)  # not launched yet: where its jail will be
        if jail is not None:
            run = jail.host_path(str(JAILED_RUN_DIR))
            return run / CONSOLE_LOG, run / socket_name
        return layout.console_log, layout.run_dir / socket_name
