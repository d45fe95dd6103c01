"""Where one VM's files are, and the limits their paths must fit.

Each VM owns a directory ``<vm_root>/<vm_id>/`` (metald's records; root only):

    spec.json     the LaunchSpec (a VM booted again after a shutdown is relaunched from it)
    process.json  the running VMM: pid, start time, accelerator, boot time
    jail.json     the JailSpec of its jailed VMM (jailed VMs only)
    vmm.stderr    the VMM's own messages (a start failure is reported from its first line)
    disk<N>.img   sparse (reflinked where possible) copies of the writable disks
    run/          the VMM's control socket and files } a VMM run directly only; a jailed
    console.log   the guest's serial console         } VMM has them in its jail's /run

AF_UNIX paths are at most 107 bytes, and the control socket's path contains the VM id, so
the longest usable id depends on where sockets live; `max_vm_id_length` says how long.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from metald.backends.vmm.driver import Drive, VmmFiles
from metald.core.ids import MAX_VM_ID_LENGTH, VM_ID_RULE, is_vm_id
from metald.core.models import LaunchSpec

# sun_path is 108 bytes including the terminating NUL.
MAX_UNIX_SOCKET_PATH = 107
MAX_VM_ID = MAX_VM_ID_LENGTH

# Paths inside a jail.
JAILED_RUN_DIR = Path("/run")
JAILED_KERNEL = Path("/vmlinux")
JAILED_INITRD = Path("/initrd")
CONSOLE_LOG = "console.log"
AGENT_SOCKET = "agent.sock"


def check_vm_id(vm_id: str) -> None:
    """The one VM-id rule (core/ids.py), checked again for names found on disk."""
    if not is_vm_id(vm_id):
        raise ValueError(f"a VM id must be {VM_ID_RULE}")


def max_vm_id_length(sockets_under: Path, socket_suffix: str) -> int:
    """The longest VM id whose control socket, `<sockets_under>/<id><socket_suffix>`, still
    fits in AF_UNIX."""
    fixed = len(str(sockets_under).encode()) + len("/") + len(socket_suffix.encode())
    return max(0, min(MAX_VM_ID, MAX_UNIX_SOCKET_PATH - fixed))


def check_socket_path(path: Path) -> None:
    """Say clearly that a socket path is too long instead of letting bind() fail obscurely."""
    size = len(str(path).encode())
    if size > MAX_UNIX_SOCKET_PATH:
        raise ValueError(
            f"the control socket path would be {size} bytes, more than the "
            f"{MAX_UNIX_SOCKET_PATH} a Unix socket allows: use a shorter data directory"
        )


@dataclass(frozen=True)
class VmLayout:
    """The files of one VM, all inside its own directory."""

    dir: Path

    @property
    def vm_id(self) -> str:
        return self.dir.name

    @property
    def run_dir(self) -> Path:
        """A VMM run directly makes its sockets and files here; each launch gets it new."""
        return self.dir / "run"

    @property
    def console_log(self) -> Path:
        return self.dir / CONSOLE_LOG

    @property
    def stderr_log(self) -> Path:
        return self.dir / "vmm.stderr"

    @property
    def spec_file(self) -> Path:
        return self.dir / "spec.json"

    @property
    def process_file(self) -> Path:
        return self.dir / "process.json"

    @property
    def jail_spec_file(self) -> Path:
        """The JailSpec of the VM's jailed VMM (its jail is found again from it)."""
        return self.dir / "jail.json"

    def disk_copy(self, index: int) -> Path:
        return self.dir / f"disk{index}.img"


def plan_drives(spec: LaunchSpec, layout: VmLayout) -> list[Drive]:
    """Which host file the VMM opens for each disk (a run-directly VMM opens it there). The
    root device comes first (it is /dev/vda)."""
    disks = sorted(spec.disks, key=lambda d: not d.is_root_device)
    drives = []
    for index, disk in enumerate(disks):
        path = disk.path if disk.read_only else layout.disk_copy(index)
        drives.append(
            Drive(
                drive_id=disk.id,
                node_id=f"disk{index}",
                path=path,
                read_only=disk.read_only,
                source=path,
                is_root_device=disk.is_root_device,
            )
        )
    return drives


def jailed_drives(drives: Sequence[Drive]) -> list[Drive]:
    """The drives as a jailed VMM opens them: disk N at /diskN.img (`path`), placed there
    from the host file `source`."""
    return [replace(d, path=Path(f"/{d.node_id}.img")) for d in drives]


def vmm_files(
    spec: LaunchSpec, layout: VmLayout, socket_name: str, *, jailed: bool, agent: bool = False
) -> VmmFiles:
    """A VMM's files as it names them: inside its jail (its run directory is /run), or the
    host's (its run directory is the VM directory)."""
    drives = plan_drives(spec, layout)
    if jailed:
        run = JAILED_RUN_DIR
        return VmmFiles(
            run_dir=run,
            control_socket=run / socket_name,
            console_log=run / CONSOLE_LOG,
            kernel=JAILED_KERNEL,
            initrd=None if spec.initrd is None else JAILED_INITRD,
            drives=tuple(jailed_drives(drives)),
            agent_socket=run / AGENT_SOCKET if agent else None,
        )
    return VmmFiles(
        run_dir=layout.run_dir,
        control_socket=layout.run_dir / socket_name,
        console_log=layout.console_log,
        kernel=spec.kernel,
        initrd=spec.initrd,
        drives=tuple(drives),
        agent_socket=layout.run_dir / AGENT_SOCKET if agent else None,
    )
