"""The request bodies that configure one Firecracker process, built from a launch.

Pure functions from metald's records (LaunchContext, Drive, NicSpec, RateLimit) to the JSON
bodies of Firecracker's API (reference/firecracker-api.yaml, v1.16.1), so that every body the
driver sends can be checked against the spec's schema in a unit test without a VMM. Nothing
here does I/O; `api.py` sends the bodies, `driver.py` decides when.

Paths in the bodies are the VMM's own view (`VmmFiles`): inside the jail when it is jailed.

Rate limits. metald's `RateLimit` says what the caller asked for: ``bandwidth`` bytes per
second, ``refill_time_ms`` (0: one second) and ``burst`` extra bytes. Firecracker's
`TokenBucket` holds ``size`` tokens (bytes) and refills completely in ``refill_time``
milliseconds, so its steady rate is size / refill_time; ``one_time_burst`` is an extra budget
spent once before that rate applies. So:

    refill_time    = refill_time_ms or 1000
    size           = bandwidth * refill_time / 1000   (the bytes that refill in that time)
    one_time_burst = burst                            (only when non-zero)

A size of 0 means "no limit" to Firecracker, so a tiny rate over a short refill time is
rounded up to one byte rather than silently lifting the limit.
"""

from __future__ import annotations

import re
from typing import Any

from metald.backends.vmm.driver import Drive, LaunchContext, VmmFiles
from metald.core.errors import InvalidArgument
from metald.core.models import NicSpec, RateLimit

Body = dict[str, Any]

MIB = 1024 * 1024
# Firecracker's limit (MachineConfiguration.vcpu_count: 1..32). The spec's "either 1 or an
# even number" holds only with SMT on; metald turns SMT off, and a real Firecracker 1.16.1
# takes 3 vCPUs with smt false (it refuses them only with smt true).
MAX_VCPUS = 32
# File names in the VMM's run directory (the jail's /run when jailed).
LOG_FILE_NAME = "firecracker.log"
METRICS_FIFO_NAME = "metrics.fifo"
LOG_LEVEL = "Warning"
# The guest's only network card.
IFACE_ID = "eth0"
DEFAULT_REFILL_TIME_MS = 1000

# Firecracker's rules for ids: an instance id (--id) is 1-64 characters of ASCII letters,
# digits and '-'; a resource id in a path (drive_id, iface_id) holds letters, digits and '_'.
_INSTANCE_ID_BAD = re.compile(r"[^A-Za-z0-9-]")
_RESOURCE_ID_BAD = re.compile(r"[^A-Za-z0-9_]")
MAX_ID_LENGTH = 64


def instance_id(vm_id: str) -> str:
    """The `--id` of a VM's Firecracker: its VM id (metald's ids already satisfy
    Firecracker's rule), anything outside the rule replaced, cut to 64 characters."""
    safe = _INSTANCE_ID_BAD.sub("-", vm_id)[:MAX_ID_LENGTH]
    return safe or "vm"


def machine_config(launch: LaunchContext) -> Body:
    """vCPUs, memory (MiB, rounded up) and SMT off. InvalidArgument for a vCPU count
    Firecracker cannot run (none, or more than 32); with SMT off any count in between,
    odd ones too."""
    vcpus = launch.spec.vcpu_count
    if vcpus < 1 or vcpus > MAX_VCPUS:
        raise InvalidArgument(
            "config.cpu.vcpu_count",
            f"Firecracker runs 1 to {MAX_VCPUS} vCPUs, not {vcpus}",
        )
    mem_mib = -(-launch.spec.memory_bytes // MIB)
    return {"vcpu_count": vcpus, "mem_size_mib": mem_mib, "smt": False}


def boot_source(launch: LaunchContext) -> Body:
    """The jail's kernel (an ELF vmlinux), its initrd, and the whole guest command line."""
    body: Body = {
        "kernel_image_path": str(launch.files.kernel),
        "boot_args": launch.kernel_cmdline,
    }
    if launch.files.initrd is not None:
        body["initrd_path"] = str(launch.files.initrd)
    return body


def drive_ids(drives: tuple[Drive, ...]) -> dict[str, str]:
    """Each disk's Firecracker drive_id, keyed by metald's disk id. metald allows '-' in disk
    ids and Firecracker does not: it becomes '_'; should two ids then collide, the later one
    gets its index appended (ids stay unique and stable for one launch)."""
    result: dict[str, str] = {}
    taken: set[str] = set()
    for index, drive in enumerate(drives):
        safe = _RESOURCE_ID_BAD.sub("_", drive.drive_id)[:MAX_ID_LENGTH] or f"disk{index}"
        if safe in taken:
            safe = f"{safe[: MAX_ID_LENGTH - 8]}_{index}"
        taken.add(safe)
        result[drive.drive_id] = safe
    return result


def drives(files: VmmFiles) -> list[tuple[str, Body]]:
    """(drive_id, body) for every disk, the root device first (it becomes /dev/vda)."""
    ordered = sorted(files.drives, key=lambda d: not d.is_root_device)  # stable
    ids = drive_ids(tuple(ordered))
    return [
        (
            ids[d.drive_id],
            {
                "drive_id": ids[d.drive_id],
                "path_on_host": str(d.path),
                "is_root_device": d.is_root_device,
                "is_read_only": d.read_only,
            },
        )
        for d in ordered
    ]


def token_bucket(limit: RateLimit) -> Body | None:
    """A RateLimit as a Firecracker byte bucket (see the module docstring); None for no
    limit (bandwidth 0)."""
    if limit.bandwidth <= 0:
        return None
    refill_time = limit.refill_time_ms if limit.refill_time_ms > 0 else DEFAULT_REFILL_TIME_MS
    size = max(1, limit.bandwidth * refill_time // 1000)
    bucket: Body = {"size": size, "refill_time": refill_time}
    if limit.burst > 0:
        bucket["one_time_burst"] = limit.burst
    return bucket


def rate_limiter(limit: RateLimit | None) -> Body | None:
    """A RateLimiter with a bandwidth bucket only (metald limits bytes, not packets)."""
    bucket = token_bucket(limit) if limit is not None else None
    return None if bucket is None else {"bandwidth": bucket}


def network_interface(nic: NicSpec) -> tuple[str, Body]:
    """(iface_id, body): the VM's TAP as eth0, its MAC, and its rate limits (rx is toward
    the guest, as Firecracker counts it too)."""
    body: Body = {"iface_id": IFACE_ID, "host_dev_name": nic.tap, "guest_mac": nic.mac}
    rx = rate_limiter(nic.rx_rate_limit)
    tx = rate_limiter(nic.tx_rate_limit)
    if rx is not None:
        body["rx_rate_limiter"] = rx
    if tx is not None:
        body["tx_rate_limiter"] = tx
    return IFACE_ID, body


def entropy() -> Body:
    """A virtio-rng device without a limiter (the guest seeds its RNG from the host)."""
    return {}


def logger(files: VmmFiles) -> Body:
    """Firecracker's own log, warnings and errors, in its run directory."""
    return {"log_path": str(files.run_dir / LOG_FILE_NAME), "level": LOG_LEVEL}


def metrics(files: VmmFiles) -> Body:
    """The metrics FIFO in its run directory (metald made it and reads it)."""
    return {"metrics_path": str(files.run_dir / METRICS_FIFO_NAME)}


def serial(files: VmmFiles) -> Body:
    """The guest's serial console into the VM's console log."""
    return {"serial_out_path": str(files.console_log)}
