"""Ports: what the service needs from the outside world. Adapters implement these."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Protocol

from metald.core.apikeys import ApiKey
from metald.core.audit import AuditEvent
from metald.core.counters import Meter
from metald.core.metering import UsageRecord
from metald.core.models import (
    Allocation,
    ConsoleChunk,
    LaunchSpec,
    NetworkInfo,
    NetworkInterface,
    NicSpec,
    ProcessIdentity,
    VmRecord,
    VmSummary,
    VmUsage,
)
from metald.core.outbox import Entry, Notice
from metald.core.quotas import AdmissionView, Claim, Limit, Resource, Usage
from metald.core.states import VmState

# Called by a backend when a VMM exits without metald asking: (vm_id, reason).
ExitCallback = Callable[[str, str], Awaitable[None]]
# Decides an admission from what the store counted; raises (QuotaExceeded) to refuse it.
AdmissionCheck = Callable[[AdmissionView], None]
# Called by a backend after each launch of a VM with a NIC, vCPUs still stopped: (vm_id).
TapCallback = Callable[[str], Awaitable[None]]


class Backend(Protocol):
    """A VMM backend. Every method acts on one VM; the service serialises calls per VM."""

    @property
    def name(self) -> str:
        """The backend's name ("qemu", "firecracker"), recorded in each VM's row."""

    async def start(self) -> None:
        """Check the host can run this backend (binary, accelerator); raise with advice if not."""

    def set_exit_callback(self, callback: ExitCallback) -> None: ...

    def set_tap_callback(self, callback: TapCallback | None) -> None:
        """Join each new TAP to the VM's network before the guest runs (a raise fails it)."""

    def accelerator(self) -> str:
        """The accelerator in use ("kvm" or "tcg"); known after start()."""

    async def create(self, spec: LaunchSpec) -> ProcessIdentity:
        """Start the VMM with its vCPUs stopped. Leaves nothing behind if it fails."""

    async def boot(self, vm_id: str) -> ProcessIdentity:
        """Start the vCPUs; after a shutdown, first start a new VMM from the saved spec."""

    async def pause(self, vm_id: str) -> None: ...
    async def resume(self, vm_id: str) -> None: ...

    async def reboot(self, vm_id: str) -> ProcessIdentity:
        """A guest-visible hard reset; the VMM's identity afterwards (a VMM whose guest reset
        ends it is replaced by a new process)."""

    async def shutdown(self, vm_id: str, *, timeout: float, force: bool) -> str:
        """Stop the guest (gracefully unless force); returns how it ended ("graceful"/"forced")."""

    async def destroy(self, vm_id: str) -> None:
        """Kill the VMM if alive and remove every per-VM file. Idempotent."""

    async def adopt(self, vm_id: str, identity: ProcessIdentity) -> VmState | None:
        """Re-attach to a VMM left by an earlier metald; its live state, or None if gone."""

    async def remove_orphans(self, known_vm_ids: set[str]) -> list[str]:
        """Kill VMMs and remove per-VM directories that no known VM owns; returns what went."""

    async def usage(self, vm_id: str) -> VmUsage:
        """The latest usage sample (taken at most a short while ago)."""

    async def sample_usage(self, vm_id: str, *, exact: bool = False) -> VmUsage:
        """A usage sample taken now, which usage() then hands out (metering's hook); the
        slower counters (disk) may be a little older unless `exact` (a final sample)."""

    def info(self, vm_id: str) -> dict[str, str]:
        """backend_info for GetVmInfo: pid, accelerator, console log path, ... (host details
        included: the service decides what a tenant sees)."""

    async def console(self, vm_id: str, offset: int, max_bytes: int) -> ConsoleChunk:
        """At most `max_bytes` of the VM's console output from byte `offset` (negative: that
        many bytes before the end); an empty chunk at offset 0 when there is no log yet. The
        log is read without following links (its directory is the VMM's to write)."""

    async def close(self) -> None:
        """Drop control connections; VMM processes keep running."""


class Store(Protocol):
    async def migrate(self) -> None: ...
    async def insert(self, vm: VmRecord) -> None:
        """Raises AlreadyExists when a row has the id (a deleted VM's too: ids are never
        reused)."""

    async def get(self, vm_id: str) -> VmRecord | None:
        """A VM that is not deleted."""

    async def update(self, vm: VmRecord) -> None: ...
    async def remove(self, vm_id: str) -> None:
        """Forget a row outright: only for a create whose VMM never started."""

    async def list_live(self) -> list[VmRecord]: ...
    async def list_for_start(self) -> tuple[list[VmRecord], set[str]]:
        """What start-up needs of this host's rows that are not deleted: the records of
        those it must look at (a live state, or a network to restore) and every id (the
        rest, SHUTDOWN without a network, are only owners of their leftovers)."""

    async def live_backends(self) -> set[str]:
        """The backends of this host's VMs that are not deleted (list_live's, without
        reading every row: start-up asks before it adopts)."""

    async def list_for_customer(
        self,
        customer_id: str | None,
        states: Sequence[VmState],
        limit: int,
        after: tuple[float, str] | None,
    ) -> tuple[list[VmSummary], int]:
        """One page ordered by (created_at, id) after the cursor, and the total matching;
        `customer_id` None: every customer's VMs (an operator's list)."""

    async def count_by_state_and_backend(self) -> dict[tuple[VmState, str], int]:
        """VMs not deleted, by (state, backend); pairs with none are left out."""

    async def ping(self) -> None: ...
    async def close(self) -> None: ...


class Assets(Protocol):
    def resolve(self, field: str, reference: str, *, customer: str) -> Path:
        """A path inside the asset store, or an asset id, to a trusted file in the store
        that `customer` may attach, opened once without following symlinks; the returned
        path names that very file for good (a pin): a later swap in the store reaches no VM.

        Raises InvalidArgument naming `field` for a reference that names no usable file,
        NotFound for an asset nobody has or another customer owns (the same words), and
        FailedPrecondition for a file the store must not hand out.
        """

    def default_boot(self) -> tuple[Path, Path | None]:
        """The default guest's kernel and initrd (shared), resolved like resolve()."""

    def ping(self) -> None: ...


class Network(Protocol):
    """Per-VM networking: a namespace, a link to the customer's segment, addresses."""

    async def start(self) -> None: ...
    async def stop(self) -> None: ...

    def check(self, interfaces: Sequence[NetworkInterface]) -> None:
        """Raise InvalidArgument (naming the field) for interfaces this host cannot give."""

    async def setup(
        self, vm_id: str, customer_id: str, interfaces: Sequence[NetworkInterface]
    ) -> NicSpec | None:
        """Start the VM's network (None when it asks for none): returns once what the VMM
        needs (its addresses and namespace) exists, while the rest (links, filters,
        segment, limits) is still being built, so the VMM starts meanwhile. `ready` waits
        for the rest; leaves nothing on failure."""

    async def ready(self, vm_id: str) -> None:
        """Wait until the network `setup` started is whole; raises what its build raised
        (what the build made is then undone). Nothing to wait for without one."""

    async def attach(self, vm_id: str) -> None:
        """Join the TAP the VMM's jailer made to the VM's network and apply its limits
        (after the network is whole: it waits for `ready`)."""

    async def adopt(
        self,
        vm_id: str,
        customer_id: str,
        interfaces: Sequence[NetworkInterface],
        vmm_pid: int | None,
    ) -> None:
        """At start-up, make a known VM's network whole again: a namespace whose name was
        lost is taken back from its VMM (``vmm_pid``: alive, adopted) or, without one,
        made anew; missing links and entries are rebuilt. Nothing to do when it is whole."""

    async def teardown(self, vm_id: str) -> None:
        """Remove the VM's network and release its addresses (after a build under way has
        ended). Idempotent."""

    async def describe(
        self, vm_id: str, customer_id: str, interfaces: Sequence[NetworkInterface]
    ) -> NetworkInfo | None:
        """The VM's network and its traffic counters (None without a network)."""

    async def remove_orphans(self, known_vm_ids: set[str]) -> list[str]: ...


class AddressBook(Protocol):
    """Which VM holds which IP address. A claim is atomic: two claims of one address
    cannot both win, also between two metald processes or after a restart."""

    async def claim(self, vm_id: str, family: int, address: str) -> bool:
        """Record that vm_id holds address; False (nothing recorded) if someone holds it."""

    async def used(self, family: int) -> set[str]:
        """Every address of the family that is held."""

    async def for_vm(self, vm_id: str) -> list[Allocation]: ...

    async def release(self, vm_id: str) -> int:
        """Drop every address vm_id holds; how many went. Idempotent."""

    async def release_address(self, vm_id: str, address: str) -> None: ...

    async def all(self) -> list[Allocation]:
        """Every allocation, ordered by address (for reconciliation and tests)."""


class JailIds(Protocol):
    """Which VM's VMM runs as which unprivileged id (its uid and its gid: one number), taken
    from a configured range. A claim is atomic: two VMs never hold one id, also between two
    metald processes or after a restart. A VM keeps its id until it is released (on delete:
    its disk copies belong to that id)."""

    async def claim(self, vm_id: str) -> int:
        """The id vm_id holds, else the lowest free one, now recorded for it. Raises
        ResourceExhausted when every id of the range is held."""

    async def for_vm(self, vm_id: str) -> int | None: ...

    async def release(self, vm_id: str) -> None:
        """Give the VM's id back. Idempotent."""

    async def all(self) -> dict[str, int]:
        """Every VM holding an id, with its id (for reconciliation and tests)."""


class Quotas(Protocol):
    """Per-customer quota overrides, and the admission ledger: one claim per VM (its vCPUs,
    memory and writable disk bytes) from which usage is counted, together with the VM's
    state in the store (core.quotas says which states count for what).

    `admit` is the atomic step: two admissions of one customer, or on one host, never
    both see the usage before the other, also when several metald processes share the
    database."""

    async def overrides(self, customer_id: str) -> dict[Resource, Limit]:
        """The customer's overrides (a resource without one is absent; None: unlimited)."""

    async def all_overrides(self) -> dict[str, dict[Resource, Limit]]:
        """Every customer that has an override, with its overrides."""

    async def set_override(self, customer_id: str, resource: Resource, limit: Limit) -> None: ...

    async def clear_override(self, customer_id: str, resource: Resource | None = None) -> int:
        """Drop one override (or all of the customer's with None); how many went."""

    async def usage(self, customer_id: str) -> Usage:
        """What the customer holds now, on every host."""

    async def admit(
        self, customer_id: str, vm_id: str, claim: Claim, check: AdmissionCheck, *, new: bool
    ) -> None:
        """In one transaction that excludes every other admission of the customer and of
        this host: count the customer's usage (every host) and this host's, without vm_id;
        call `check`, whose raise refuses (nothing is recorded); then hold vm_id's claim,
        counted live until `settle` (a create's VM row may not exist yet; a boot's is still
        SHUTDOWN). `new` (a create) records `claim` and raises AlreadyExists if vm_id has
        one; otherwise (a boot) the claim recorded at its create is held."""

    async def settle(self, vm_id: str) -> None:
        """The VM's state in the store tells again whether it is live: end the hold."""

    async def release(self, vm_id: str) -> None:
        """Forget the VM's claim (its create failed, or it was deleted). Idempotent."""

    async def sweep(self) -> int:
        """At start-up, before any admission on this host: end this host's holds and drop
        its claims whose VM row is missing or deleted (an admission a crash cut short)."""


class Billing(Protocol):
    """The billing service (billing.v1.BillingService: the existing billaged, or `metald
    billing-sink`). Every call names the VM's customer, which the wire carries as the
    `X-Tenant-ID` header. A call that may not have arrived raises BillingUnavailable (the
    caller keeps the records and retries); one the service refused raises BillingRejected.
    Times are Unix nanoseconds."""

    async def send_batch(
        self, vm_id: str, customer_id: str, records: Sequence[UsageRecord]
    ) -> None:
        """Records of one VM, oldest first."""

    async def heartbeat(self, instance_id: str, active_vm_ids: Sequence[str]) -> None: ...
    async def vm_started(self, vm_id: str, customer_id: str, at_ns: int) -> None: ...
    async def vm_stopped(self, vm_id: str, customer_id: str, at_ns: int) -> None: ...
    async def possible_gap(
        self, vm_id: str, customer_id: str, last_sent_ns: int, resume_ns: int
    ) -> None: ...
    async def close(self) -> None: ...


class UsageLog(Protocol):
    """Metering's outbox (core/outbox.py) and each VM's metering state (core/counters.py),
    in the database: records are stored before billing is told, so nothing metered is lost
    when billing or metald goes down. One log per host (rows carry their node)."""

    async def meters(self) -> dict[str, Meter]:
        """Every VM's last metering state (to continue the counters after a restart)."""

    async def record_tick(
        self, meters: Sequence[Meter], notices: Sequence[Notice], backlog_max: int
    ) -> int:
        """In ONE transaction: store each meter's record (and the meter as the VM's state)
        and the notices. While the backlog (entries not delivered) is at `backlog_max` or
        more, a VM's record replaces its newest undelivered record instead of adding one,
        when that is a sample (cumulative counters lose resolution, never usage). Returns
        how many records replaced one."""

    async def add_notices(self, notices: Sequence[Notice]) -> None: ...

    async def pending(self, per_vm: int) -> dict[str, list[Entry]]:
        """The oldest `per_vm` undelivered entries of every VM that has any, in seq order."""

    async def delivered(self, entries: Sequence[Entry], at: float) -> None:
        """The entries reached billing (or were refused by it: they are never retried).
        A VM's entries given are its oldest undelivered ones, in order (delivery sends each
        VM's in order and stops at a failure): every undelivered entry of the VM up to the
        last one given is marked."""

    async def backlog(self) -> int:
        """How many entries are stored and not delivered."""

    async def prune(self, before: float) -> int:
        """Drop entries delivered before `before` (Unix seconds); how many went."""

    async def forget(self, vm_id: str) -> None:
        """Drop the VM's metering state (it was deleted); its entries stay until delivered."""


class Audit(Protocol):
    """The append-only audit log (core/audit.py)."""

    async def record(self, event: AuditEvent) -> None:
        """Append the event; it is kept before the call returns (see the adapter)."""


# -- API keys (core/apikeys.py, store/api_keys.py) -----------------------------------------


class ApiKeys(Protocol):
    """API keys in the store: only the keyed hash of each secret is kept."""

    async def add(self, key: ApiKey) -> None: ...

    async def by_key_id(self, key_id: str) -> ApiKey | None:
        """The key (revoked and expired ones too: the caller checks), by its public id."""

    async def all(self) -> list[ApiKey]:
        """Every key, oldest first."""

    async def revoke(self, key_id: str, at: float) -> ApiKey | None:
        """Mark it revoked at `at` (a revoked key stays revoked, at its first time); the key
        as it now is, None if there is none."""
