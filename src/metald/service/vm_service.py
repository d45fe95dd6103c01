"""VM use cases: ownership, per-VM locking and the state machine around the ports.

Tenants and ids: VM ids are one namespace for the whole host (they name directories, jails
and namespaces), and a caller may choose one. So that no call reveals another customer's VM:
- every call on an id the caller does not own answers not_found, exactly as for an id nobody
  holds, and at once: ownership is checked before the VM's lock is taken, so the call never
  waits behind the owner's operations (a wait would tell that the VM exists and is busy);
- CreateVm with an id that is taken answers already_exists with one message whoever holds
  it (the caller, another customer, a VM deleted long ago: ids are never reused) or is
  creating it right now, and at once (a busy id is not waited for). What a tenant learns is
  only "this id is not free", which a global namespace cannot hide; generated ids (the
  default) are never taken.

What a tenant is shown of the host: backend_info is cut to the keys in
core.redaction.TENANT_INFO_KEYS (unless `host_details`, for development and tests), and the
host details are logged for operators when a VMM starts.

Roles (core/identity.py): every use case takes the authenticated Caller. A customer acts on
its own VMs only (another customer's answers not_found, as above); an operator or admin acts
on every customer's VM. An operator's CreateVm names the customer it creates for (the
request's customer_id). The API layer writes the call's audit row (api/audit.py: every
operator call among them); what only the service learns, the VM's id and whose VM it is, it
notes for that row (core.audit.note) once ownership is checked.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import replace
from pathlib import Path

from metald.core import audit, callcontext, paging, timing
from metald.core.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    MetaldError,
    NotFound,
    NotYours,
    PermissionDenied,
    Unavailable,
)
from metald.core.identity import Caller
from metald.core.ids import new_vm_id
from metald.core.models import (
    ConsoleChunk,
    LaunchSpec,
    NetworkInfo,
    Page,
    ProcessIdentity,
    ResolvedDisk,
    VmConfig,
    VmRecord,
    VmUsage,
)
from metald.core.ports import Assets, Backend, Network, Store
from metald.core.quotas import QuotaExceeded
from metald.core.redaction import tenant_backend_info, vmm_text
from metald.core.states import DELETE_NEEDS_FORCE, LIVE_STATES, Operation, VmState, next_state
from metald.core.telemetry import NoTelemetry, VmTelemetry
from metald.core.undo import Undo
from metald.core.validation import (
    Limits,
    check_config,
    check_customer_id,
    check_shutdown_timeout,
    check_vm_id,
)
from metald.service.admission import Admission
from metald.service.locks import VmLocks
from metald.service.metering import Collector
from metald.service.registry import VmRegistry

log = logging.getLogger(__name__)

DEFAULT_CONSOLE_BYTES = 64 * 1024
MAX_CONSOLE_BYTES = 1024 * 1024


class _Keep:
    """Marks an argument of _save as 'leave this field as it is'."""


_KEEP = _Keep()


class VmService:
    def __init__(
        self,
        store: Store,
        backends: Mapping[str, Backend],
        assets: Assets,
        network: Network,
        limits: Limits,
        *,
        admission: Admission,
        default_backend: str = "",
        default_shutdown_timeout: float = 30.0,
        clock: Callable[[], float] = time.time,
        host_details: bool = False,
        telemetry: VmTelemetry | None = None,
        metering: Collector | None = None,
    ) -> None:
        """`backends`: every VMM backend this host can run, by name (a VM row records its
        backend, so VMs of each are adopted after a restart); new VMs use `default_backend`
        (the only one when there is one). `host_details`: GetVmInfo shows the backend's
        host details (pid, paths, versions) to tenants too: development and tests only.
        `telemetry`: told of creates (their steps, core/timing.py), boots, adoptions,
        unasked VMM exits and quota refusals (the adapter publishes them on /metrics).
        `metering`: told of boots, shutdowns and deletes (service/metering.py), when
        billing is on."""
        if not backends:
            raise ValueError("at least one backend")
        default_backend = default_backend or next(iter(backends))
        if default_backend not in backends:
            raise ValueError(f"default backend {default_backend!r} is not among the backends")
        self._store = store
        self._backends = dict(backends)
        self._backend = self._backends[default_backend]
        self._assets = assets
        self._network = network
        self._limits = limits
        self._admission = admission
        self._default_shutdown_timeout = default_shutdown_timeout
        self._clock = clock
        self._locks = VmLocks()
        self._host_details = host_details
        # The live VMs, read by GetVmInfo and ownership checks (service/registry.py).
        self.registry = VmRegistry()
        self._telemetry: VmTelemetry = telemetry or NoTelemetry()
        self._metering = metering

    # -- life of the service -------------------------------------------------------------

    async def start(self) -> None:
        """Adopt VMMs left by an earlier metald, mark lost ones SHUTDOWN, remove orphans."""
        await self._admission.start()
        for backend in self._backends.values():
            backend.set_exit_callback(self._on_vmm_exit)
            backend.set_tap_callback(self._network.attach)
        # Only rows with a VMM to adopt or a network to restore are read whole; of the
        # others (SHUTDOWN, no network) only the ids, which own their leftovers.
        records, known = await self._store.list_for_start()
        for vm in records:
            async with self._locks.hold(vm.id):
                await self._reconcile(vm)
                await self._adopt_network(vm)
                self.registry.put(vm)  # as the store now holds it
        removed: list[str] = []
        for backend in self._backends.values():
            removed += await backend.remove_orphans(known)
        removed += await self._network.remove_orphans(known)
        if removed:
            log.info("removed leftovers no VM owns: %s", ", ".join(removed))

    async def _reconcile(self, vm: VmRecord) -> None:
        if vm.state not in LIVE_STATES:
            return
        backend = self._backends.get(vm.backend)
        if backend is None:
            # Its processes, if any, are left alone: a daemon with that backend adopts them.
            log.error(
                "vm %s: its backend %r is not available on this daemon; left as it is",
                vm.id,
                vm.backend,
            )
            return
        live = await backend.adopt(vm.id, vm.process) if vm.process else None
        self._telemetry.adoption(vm.backend, live is not None)
        if live is None:
            reason = "vmm process was gone when metald started"
            metered = vm.state in (VmState.RUNNING, VmState.PAUSED)
            await self._save(vm, state=VmState.SHUTDOWN, process=None, exit_reason=reason)
            log.info("vm %s: %s", vm.id, reason)
            if metered:
                await self._meter("stopped", vm)  # when it stopped is not known: now
        elif live != vm.state:
            await self._save(vm, state=live)

    async def _adopt_network(self, vm: VmRecord) -> None:
        """Make the VM's network whole again after the restart (after _reconcile, so the
        VMM, if any, is adopted). A failure is logged, never stops start-up: the VM stays
        deletable, and its next boot finds what could be rebuilt."""
        if not vm.config.network or vm.backend not in self._backends:
            return  # a VM of a backend we do not run is left as it is, network included
        pid = vm.process.pid if vm.process is not None and vm.state in LIVE_STATES else None
        try:
            await self._network.adopt(vm.id, vm.customer_id, vm.config.network, pid)
        except Exception:
            log.exception("vm %s: its network could not be restored after the restart", vm.id)

    async def _on_vmm_exit(self, vm_id: str, reason: str) -> None:
        with callcontext.scope():
            callcontext.bind(vm_id=vm_id)
            await self._record_exit(vm_id, reason)

    async def _record_exit(self, vm_id: str, reason: str) -> None:
        async with self._locks.hold(vm_id):
            vm = await self._read(vm_id)
            if vm is None or vm.state not in LIVE_STATES:
                return
            await self._save(vm, state=VmState.SHUTDOWN, process=None, exit_reason=reason)
            self._telemetry.vmm_exited(vm.backend)
            log.info("vm %s stopped on its own: %s", vm_id, reason)
            await self._meter("stopped", vm)

    # -- use cases -------------------------------------------------------------------------

    async def create_vm(
        self, caller: Caller, vm_id: str, config: VmConfig, customer_id: str = ""
    ) -> VmRecord:
        """A VM of `customer_id` (empty: the caller's own customer). A customer may create
        only its own; an operator must name the customer (unless its credential has one)."""
        owner = self._creating_for(caller, customer_id)
        with callcontext.scope(), timing.collecting() as times, self._quota_refusals():
            vm = await self._create_vm(owner, vm_id, config)
            # Only a create that succeeded: a failed one's steps stop anywhere.
            log.debug("vm %s: created in %s", vm.id, times.describe())
        self._telemetry.create_steps(vm.backend, times)
        return vm

    @staticmethod
    def _creating_for(caller: Caller, customer_id: str) -> str:
        """Whose VM a CreateVm makes, refused before anything is looked at."""
        if caller.is_operator:
            owner = customer_id or caller.customer_id
            if not owner:
                raise InvalidArgument("customer_id", "an operator must name the VM's customer")
        else:
            if customer_id and customer_id != caller.customer_id:
                raise PermissionDenied("customer_id must be the caller's own customer id")
            owner = caller.customer_id or ""
        check_customer_id(owner)
        return owner

    async def _create_vm(self, caller: str, vm_id: str, config: VmConfig) -> VmRecord:
        """`caller`: the customer the VM is for (checked by _creating_for)."""
        with timing.step("check"):
            if vm_id:
                check_vm_id(vm_id)
            check_config(config, self._limits)
            self._network.check(config.network)
            spec_of = self._resolve(config, caller)
            vm_id = vm_id or new_vm_id()
            audit.note(vm_id=vm_id, owner=caller)
            claim = self._admission.check_request(config, spec_of(vm_id).disks)
        callcontext.bind(vm_id=vm_id)  # log lines and the RPC's span name it from here
        taken = AlreadyExists(f"vm_id {vm_id!r} is taken (VM ids are never reused)")
        if self._locks.busy(vm_id):
            raise taken  # someone's VM, or someone's create of it: not waited for
        async with self._locks.hold(vm_id):  # free: taken at once, with no wait
            now = self._clock()
            vm = VmRecord(
                id=vm_id,
                customer_id=caller,
                config=config,
                state=VmState.CREATED,
                backend=self._backend.name,
                created_at=now,
                updated_at=now,
            )
            async with contextlib.AsyncExitStack() as admitted:
                try:  # the ledger holds every id too: it may be the first to see it taken
                    await admitted.enter_async_context(
                        self._admission.creating(caller, vm_id, claim)
                    )
                except AlreadyExists:
                    raise taken from None
                with timing.step("store"):
                    try:
                        await self._store.insert(vm)  # intent: the id is taken
                    except AlreadyExists:
                        raise taken from None
                self.registry.put(vm)
                # Every step's undo runs even if an earlier one fails: what stays is logged
                # and the next start's orphan removal takes it (no row owns it any more).
                undo = Undo(log, f"vm {vm_id}: undoing a failed create")
                undo.add("its row", self._forget, vm_id)
                undo.add("its network", self._network.teardown, vm_id)
                undo.add("its VMM", self._backend.destroy, vm_id)
                try:
                    with timing.step("network"):
                        nic = await self._network.setup(vm_id, caller, config.network)
                    spec = replace(spec_of(vm_id), nic=nic)
                    # The network's build goes on while the VMM starts (Network.setup).
                    vm.process = await self._backend.create(spec)
                    with timing.step("network_ready"):
                        await self._network.ready(vm_id)
                    # Recording the VMM is part of the create: a row without its process
                    # could never be adopted, and the next start would keep its VMM as a
                    # known VM's.
                    with timing.step("store"):
                        await self._store.update(vm)
                    self.registry.put(vm)
                except BaseException:
                    await undo.run_async()
                    raise
            self._log_host_details(vm)
            return vm

    async def boot_vm(self, caller: Caller, vm_id: str) -> VmRecord:
        async with self._owned_and_locked(caller, vm_id) as vm:
            new_state = next_state(Operation.BOOT, vm.state)
            first = vm.state is VmState.CREATED
            started = time.perf_counter()
            with self._quota_refusals():
                async with self._admission.booting(vm):
                    with timing.step("vmm.boot"):
                        process = await self._backend_of(vm).boot(vm_id)
                    await self._meter("started", vm)  # before a tick can see it running
                    saved = await self._save(vm, state=new_state, process=process, exit_reason=None)
            since_create = max(0.0, saved.updated_at - vm.created_at) if first else None
            self._telemetry.booted(vm.backend, time.perf_counter() - started, since_create)
            self._log_host_details(vm)
            return saved

    async def pause_vm(self, caller: Caller, vm_id: str) -> VmRecord:
        async with self._owned_and_locked(caller, vm_id) as vm:
            new_state = next_state(Operation.PAUSE, vm.state)
            with timing.step("vmm.pause"):
                await self._backend_of(vm).pause(vm_id)
            return await self._save(vm, state=new_state)

    async def resume_vm(self, caller: Caller, vm_id: str) -> VmRecord:
        async with self._owned_and_locked(caller, vm_id) as vm:
            new_state = next_state(Operation.RESUME, vm.state)
            with timing.step("vmm.resume"):
                await self._backend_of(vm).resume(vm_id)
            return await self._save(vm, state=new_state)

    async def reboot_vm(self, caller: Caller, vm_id: str) -> VmRecord:
        async with self._owned_and_locked(caller, vm_id) as vm:
            new_state = next_state(Operation.REBOOT, vm.state)
            with timing.step("vmm.reboot"):
                process = await self._backend_of(vm).reboot(vm_id)
            return await self._save(vm, state=new_state, process=process)

    async def shutdown_vm(
        self, caller: Caller, vm_id: str, *, force: bool = False, timeout_seconds: int = 0
    ) -> VmRecord:
        check_shutdown_timeout(timeout_seconds)
        timeout = float(timeout_seconds) or self._default_shutdown_timeout
        async with self._owned_and_locked(caller, vm_id) as vm:
            new_state = next_state(Operation.SHUTDOWN, vm.state)
            await self._meter("final_sample", vm)  # ticks go on while it stops
            with timing.step("vmm.shutdown"):
                how = await self._backend_of(vm).shutdown(vm_id, timeout=timeout, force=force)
            saved = await self._save(
                vm, state=new_state, process=None, exit_reason=f"shutdown requested ({how})"
            )
            await self._meter("stopped", vm)
            return saved

    async def delete_vm(self, caller: Caller, vm_id: str, *, force: bool = False) -> None:
        async with self._owned_and_locked(caller, vm_id) as vm:
            next_state(Operation.DELETE, vm.state)
            if vm.state in DELETE_NEEDS_FORCE and not force:
                raise FailedPrecondition(
                    f"VM is {vm.state.value}: shut it down first or delete with force"
                )
            metered = vm.state in (VmState.RUNNING, VmState.PAUSED)
            if metered:
                await self._meter("final_sample", vm)
            with timing.step("vmm.destroy"):
                await self._backend_of(vm).destroy(vm_id)
            with timing.step("network.teardown"):
                await self._network.teardown(vm_id)
            vm.deleted_at = self._clock()
            await self._save(vm, state=VmState.SHUTDOWN, process=None)
            await self._admission.release(vm_id)
            if metered:
                await self._meter("stopped", vm)
            if self._metering is not None:
                await self._metering.deleted(vm_id)

    async def get_vm(
        self, caller: Caller, vm_id: str
    ) -> tuple[VmRecord, VmUsage, dict[str, str], NetworkInfo | None]:
        vm = await self._owned(caller, vm_id)
        network = await self._network.describe(vm_id, vm.customer_id, vm.config.network)
        usage = VmUsage()
        info = dict(vm.backend_info)
        if vm.state in LIVE_STATES:
            try:
                backend = self._backend_of(vm)
                usage = await backend.usage(vm_id)
                info.update(backend.info(vm_id))
            except MetaldError as exc:
                # The VMM may be exiting right now; the exit callback will record it.
                log.debug("usage of %s unavailable: %s", vm_id, exc)
        if self._host_details:
            if "exit_reason" in info:
                info["exit_reason"] = vmm_text(info["exit_reason"])
        else:
            info = tenant_backend_info(info)
        return vm, usage, info, network

    async def get_console(
        self, caller: Caller, vm_id: str, offset: int, max_bytes: int
    ) -> ConsoleChunk:
        """The VM's console output for its owner: at most `max_bytes` (0: 64 KiB; at most
        1 MiB) from byte `offset` (negative: the last -offset bytes). No lock: a read."""
        if max_bytes < 0:
            raise InvalidArgument("max_bytes", "must not be negative")
        limit = min(max_bytes or DEFAULT_CONSOLE_BYTES, MAX_CONSOLE_BYTES)
        vm = await self._owned(caller, vm_id)
        return await self._backend_of(vm).console(vm_id, offset, limit)

    async def list_vms(
        self,
        caller: Caller,
        states: Sequence[VmState],
        page_size: int,
        page_token: str,
        customer_id: str = "",
    ) -> Page:
        """A page of VMs. A customer sees its own (`customer_id` may name only itself); an
        operator every customer's, or only `customer_id`'s."""
        if customer_id:
            check_customer_id(customer_id)
        if not caller.is_operator:
            if customer_id and customer_id != caller.customer_id:
                raise PermissionDenied("customer_id must be the caller's own customer id")
            customer_id = caller.customer_id or ""
            if not customer_id:
                raise PermissionDenied("the credential names no customer")
        limit = paging.page_size(page_size)
        cursor = paging.decode_token(page_token)
        audit.note(owner=customer_id or None)
        vms, total = await self._store.list_for_customer(
            customer_id or None, states, limit + 1, cursor
        )
        next_token = ""
        if len(vms) > limit:
            vms = vms[:limit]
            next_token = paging.encode_token(vms[-1].created_at, vms[-1].id)
        return Page(vms=vms, next_token=next_token, total_count=total)

    # -- helpers -----------------------------------------------------------------------------

    @contextmanager
    def _quota_refusals(self) -> Iterator[None]:
        try:
            yield
        except QuotaExceeded as exc:
            self._telemetry.quota_refused(exc.scope, exc.resource.value)
            raise

    def _backend_of(self, vm: VmRecord) -> Backend:
        backend = self._backends.get(vm.backend)
        if backend is None:
            raise Unavailable(
                f"VM {vm.id} runs on the {vm.backend} backend, which this daemon does not run"
            )
        return backend

    @asynccontextmanager
    async def _owned_and_locked(self, caller: Caller, vm_id: str) -> AsyncIterator[VmRecord]:
        """The caller's VM under its lock. Ownership is checked first, so another customer's
        call on the id answers not_found at once instead of waiting for the lock; read again
        once the lock is held (the VM may have been deleted meanwhile)."""
        await self._owned(caller, vm_id)
        async with self._locks.hold(vm_id):
            yield await self._owned(caller, vm_id)

    def _log_host_details(self, vm: VmRecord) -> None:
        """What tenants are not shown, for operators: pid, sockets, console path, version."""
        try:
            details = self._backend_of(vm).info(vm.id)
        except MetaldError:
            return
        shown = " ".join(f"{k}={v}" for k, v in sorted(details.items()) if k != "exit_reason")
        log.info("vm %s of %s: %s", vm.id, vm.customer_id, shown)

    async def _meter(self, hook: str, vm: VmRecord) -> None:
        """Tell metering (started, final_sample, stopped); its failure never fails the call:
        the records it has stored stand, and the log says what was missed."""
        if self._metering is None:
            return
        try:
            await getattr(self._metering, hook)(vm)
        except Exception:
            log.exception("vm %s: metering could not record %s", vm.id, hook)

    async def _owned(self, caller: Caller, vm_id: str) -> VmRecord:
        check_vm_id(vm_id)
        vm = await self._read(vm_id)
        # Someone else's VM looks exactly like a missing one: ids leak nothing (NotYours is
        # answered as NotFound; the API counts it and logs a security event for it).
        if vm is None:
            raise NotFound(f"VM {vm_id!r} not found")
        if not caller.may_act_on(vm.customer_id):
            raise NotYours(f"VM {vm_id!r} not found")
        audit.note(vm_id=vm_id, owner=vm.customer_id)
        return vm

    async def _read(self, vm_id: str) -> VmRecord | None:
        """The VM not deleted: from the registry when it is live, else from the store."""
        vm = self.registry.get(vm_id)
        return vm if vm is not None else await self._store.get(vm_id)

    async def _forget(self, vm_id: str) -> None:
        """Remove a row whose VMM never started (an undone create), here and in the store."""
        await self._store.remove(vm_id)
        self.registry.drop(vm_id)

    def _resolve(self, config: VmConfig, caller: str) -> Callable[[str], LaunchSpec]:
        """Resolve every path now, so a bad one is refused before anything is created; only
        assets that are shared or the caller's own resolve."""
        kernel: Path
        initrd: Path | None = None
        if config.kernel_path:
            kernel = self._assets.resolve(
                "config.boot.kernel_path", config.kernel_path, customer=caller
            )
        else:
            kernel, initrd = self._assets.default_boot()
        if config.initrd_path:
            initrd = self._assets.resolve(
                "config.boot.initrd_path", config.initrd_path, customer=caller
            )
        disks = tuple(
            ResolvedDisk(
                id=d.id,
                path=self._assets.resolve(f"config.storage[{i}].path", d.path, customer=caller),
                read_only=d.read_only,
                is_root_device=d.is_root_device,
            )
            for i, d in enumerate(config.storage)
        )

        def spec(vm_id: str) -> LaunchSpec:
            return LaunchSpec(
                vm_id=vm_id,
                vcpu_count=config.vcpu_count,
                memory_bytes=config.memory_bytes,
                kernel=kernel,
                initrd=initrd,
                kernel_args=config.kernel_args,
                disks=disks,
            )

        return spec

    async def _save(
        self,
        vm: VmRecord,
        *,
        state: VmState,
        process: ProcessIdentity | _Keep | None = _KEEP,
        exit_reason: str | _Keep | None = _KEEP,
    ) -> VmRecord:
        """Persist a transition; `process` and `exit_reason` change only when given."""
        vm.state = state
        vm.updated_at = self._clock()
        if not isinstance(process, _Keep):
            vm.process = process
        if not isinstance(exit_reason, _Keep):
            info = {k: v for k, v in vm.backend_info.items() if k != "exit_reason"}
            if exit_reason is not None:
                info["exit_reason"] = vmm_text(exit_reason)  # a VMM's words: bounded
            vm.backend_info = info
        with timing.step("store"):
            await self._store.update(vm)
        self.registry.put(vm)  # after the store took it: never ahead of the truth
        return replace(vm)
