"""Quotas and host admission: what a customer and this host may hold, and the pure decision
whether one more VM (a create) or one more running VMM (a boot) fits.

Which states count for what (a VM is counted from the moment its admission is recorded,
before its VMM starts, until it is deleted):

- ``vms`` and ``disk_bytes``: every VM that is not deleted, whatever its state (a shut-down
  VM keeps its disk copies in its directory). ``disk_bytes`` is the size of the VM's
  writable disks (each is copied per VM and may grow to its image's size); read-only disks
  are shared with other VMs and cost nothing per VM.
- ``running_vms``, ``vcpus`` and ``memory_bytes``: VMs whose VMM process holds host memory
  and CPU time: CREATED (the VMM is started with its vCPUs stopped, its memory allocated),
  RUNNING and PAUSED, plus a VM whose boot from SHUTDOWN is in flight. SHUTDOWN is free.

So CreateVm is checked against all five quotas (it starts a VMM) and BootVm of a SHUTDOWN
VM against the three that a VMM holds; BootVm of a CREATED VM, Resume and Reboot hold what
they held and are not checked. A quota lowered below what a customer holds refuses new
admissions only: nothing running is stopped.

The host ceiling counts the same live states over every customer's VMs on this host.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from metald.core.errors import ResourceExhausted


class Resource(StrEnum):
    """A quota's name, as settings (UNKEY_METALD_QUOTA_<NAME>), the CLI and errors spell it."""

    RUNNING_VMS = "running_vms"
    VMS = "vms"
    VCPUS = "vcpus"
    MEMORY_BYTES = "memory_bytes"
    DISK_BYTES = "disk_bytes"


# What each kind of admission adds to (the rest it leaves as it is).
CREATE_CHECKS = tuple(Resource)
BOOT_CHECKS = (Resource.RUNNING_VMS, Resource.VCPUS, Resource.MEMORY_BYTES)

# A limit: a number (0: none allowed), or None for no limit.
Limit = int | None


@dataclass(frozen=True)
class Usage:
    """What a customer (or a host) holds, counted as the module docstring says."""

    running_vms: int = 0
    vms: int = 0
    vcpus: int = 0
    memory_bytes: int = 0
    disk_bytes: int = 0

    def of(self, resource: Resource) -> int:
        value: int = getattr(self, resource.value)
        return value


@dataclass(frozen=True)
class Claim:
    """What one VM holds when counted in full (live and existing)."""

    vcpus: int
    memory_bytes: int
    disk_bytes: int

    def of(self, resource: Resource) -> int:
        if resource in (Resource.RUNNING_VMS, Resource.VMS):
            return 1
        value: int = getattr(self, resource.value)
        return value


@dataclass(frozen=True)
class QuotaDefaults:
    """The operator's per-customer defaults (settings); None: no limit."""

    limits: Mapping[Resource, Limit] = field(default_factory=dict)

    def effective(self, overrides: Mapping[Resource, Limit]) -> dict[Resource, Limit]:
        """Each resource's limit for a customer: its override if it has one, else the default."""
        return {r: overrides[r] if r in overrides else self.limits.get(r) for r in Resource}


@dataclass(frozen=True)
class HostCeiling:
    """Committed guest memory and vCPUs this host takes, over every customer's live VMs."""

    memory_bytes: int
    vcpus: int


@dataclass(frozen=True)
class AdmissionView:
    """What the store read inside the admission's transaction; the VM being admitted is
    not counted in either usage."""

    customer_usage: Usage
    host_usage: Usage
    overrides: Mapping[Resource, Limit]


class QuotaExceeded(ResourceExhausted):
    """A quota or the host's ceiling refused an admission; names which one and its value."""

    def __init__(self, scope: str, resource: Resource, limit: int, used: int, asked: int) -> None:
        if scope == "customer":
            what = f"quota {resource.value} is {limit} for this customer"
        else:
            what = f"this host's ceiling on committed {resource.value} is {limit}"
        super().__init__(f"{what}: {used} in use, this VM needs {asked} more")
        self.scope = scope
        self.resource = resource
        self.limit = limit


def check_admission(
    checks: tuple[Resource, ...],
    claim: Claim,
    view: AdmissionView,
    defaults: QuotaDefaults,
    host: HostCeiling,
) -> None:
    """Raise QuotaExceeded for the first quota (in Resource order), then host ceiling, that
    the claim would take past its limit. A claim of 0 of a resource never fails on it."""
    limits = defaults.effective(view.overrides)
    for resource in checks:
        limit = limits[resource]
        asked = claim.of(resource)
        used = view.customer_usage.of(resource)
        if limit is not None and asked and used + asked > limit:
            raise QuotaExceeded("customer", resource, limit, used, asked)
    for resource, limit in (
        (Resource.VCPUS, host.vcpus),
        (Resource.MEMORY_BYTES, host.memory_bytes),
    ):
        if resource not in checks:
            continue
        asked = claim.of(resource)
        used = view.host_usage.of(resource)
        if asked and used + asked > limit:
            raise QuotaExceeded("host", resource, limit, used, asked)


@dataclass(frozen=True)
class VmMaxima:
    """Per-VM maxima besides vCPUs and memory (core.validation.Limits checks those)."""

    disks: int
    disk_bytes: int
    # The operator's maximum network rate per direction, bytes/s (0: none).
    rate_limit_bandwidth: int = 0
