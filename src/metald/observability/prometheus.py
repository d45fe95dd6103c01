"""metald's Prometheus metrics: one registry, what the service and the API report into it
(core/telemetry.py), and what is read at scrape time (VM counts, committed resources,
metering and delivery totals).

Naming follows Prometheus's conventions: a `metald_` prefix, base units in the name
(`_seconds`, `_bytes`), `_total` on every counter, and labels only with a small, fixed set
of values (method, code, state, backend, step, scope, resource, reason, result). Never a VM
or customer id: /metrics is open on the API port, and a series per VM would grow without
bound; per-VM usage is what metering sends to billing. Label sets that are known in advance
are created at zero, so a dashboard's query has data before the first event.

A registry of our own per app (tests run several in one process); /metrics on the API port
and the dedicated listener (api/metrics_listener.py) serve the same exposition.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from metald.core.metering import MeteringStats
from metald.core.models import VmRecord
from metald.core.ports import Store
from metald.core.quotas import Resource
from metald.core.states import VmState
from metald.core.timing import StepTimes

# No `<name>_created` series beside each counter and histogram: the text format carries
# them as gauges that double the series and that Prometheus does not need (a counter's
# reset is seen in its values). prometheus_client's switch is process-wide; metald's
# process has only these registries.
disable_created_metrics()  # type: ignore[no-untyped-call]

# metald's own steps of a create are milliseconds; the VMM's start can be seconds.
_STEP_BUCKETS = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30,
)  # fmt: skip
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# A boot is a QMP round trip, or a relaunch (a jail and a VMM start); create-to-running is
# also the caller's own pause between CreateVm and BootVm.
_BOOT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_CREATE_TO_RUNNING_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)

AUTH_REASONS = ("missing", "malformed", "invalid", "expired", "revoked", "certificate")
QUOTA_SCOPES = ("customer", "host")
RATE_LIMIT_REASONS = ("customer", "auth_failures")  # api/ratelimit.py
ADOPTION_RESULTS = ("adopted", "lost")


@dataclass
class MetricSources:
    """What /metrics reads at scrape time. `live_vms`: the records of the live VMs (the
    service's registry); `metering`: the totals the metering service keeps."""

    store: Store
    backends: Sequence[str]
    live_vms: Callable[[], Iterable[VmRecord]] = lambda: ()
    metering: MeteringStats = field(default_factory=MeteringStats)
    host_vcpus: int = 0  # the admission ceiling (core/quotas.py HostCeiling)
    host_memory_bytes: int = 0
    version: str = ""


class PrometheusMetrics:
    """Implements core.telemetry.VmTelemetry and ApiTelemetry over one registry."""

    def __init__(self, sources: MetricSources) -> None:
        self._sources = sources
        self._vm_counts: dict[tuple[VmState, str], int] = {}
        self.registry = r = CollectorRegistry()
        backends = list(sources.backends)

        self._requests = Counter(
            "metald_rpc_requests_total",
            "RPCs served, by method and Connect code",
            ["method", "code"],
            registry=r,
        )
        self._latency = Histogram(
            "metald_rpc_duration_seconds",
            "RPC latency, by method and Connect code",
            ["method", "code"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self._create_steps = Histogram(
            "metald_create_step_seconds",
            "Where the time of a successful CreateVm went, by step (core/timing.py; "
            "step=total is the whole use case, network is the network set-up, jailer the "
            "jail's, jailer.* the helper's own steps inside it)",
            ["step", "backend"],
            buckets=_STEP_BUCKETS,
            registry=r,
        )
        self._boots = Histogram(
            "metald_vm_boot_seconds",
            "Successful BootVm use cases, admission and a VMM relaunch included",
            ["backend"],
            buckets=_BOOT_BUCKETS,
            registry=r,
        )
        self._create_to_running = Histogram(
            "metald_vm_create_to_running_seconds",
            "From a VM's CreateVm to its first RUNNING (includes the caller's wait before BootVm)",
            ["backend"],
            buckets=_CREATE_TO_RUNNING_BUCKETS,
            registry=r,
        )
        self._adoptions = Counter(
            "metald_vmm_adoptions_total",
            "Live VMs found at start-up: their VMM adopted again, or lost (the VM became SHUTDOWN)",
            ["backend", "result"],
            registry=r,
        )
        self._exits = Counter(
            "metald_vmm_unexpected_exits_total",
            "VMMs that exited without metald asking (guest poweroff, crash, kill)",
            ["backend"],
            registry=r,
        )
        self._quota_refusals = Counter(
            "metald_quota_refusals_total",
            "Admissions refused, by scope (customer quota or host ceiling) and resource",
            ["scope", "resource"],
            registry=r,
        )
        self._auth_refusals = Counter(
            "metald_auth_refusals_total",
            "Calls refused for their credentials (bearer token or client certificate), by reason",
            ["reason"],
            registry=r,
        )
        self._access_refusals = Counter(
            "metald_access_refusals_total",
            "Authenticated calls refused for another customer's VM or customer id, by method",
            ["method"],
            registry=r,
        )
        self._rate_limit_refusals = Counter(
            "metald_rate_limit_refusals_total",
            "Calls refused by a rate limit, by reason (customer, auth_failures)",
            ["reason"],
            registry=r,
        )
        for reason in RATE_LIMIT_REASONS:
            self._rate_limit_refusals.labels(reason)
        info = Gauge("metald_build_info", "Always 1: the running version", ["version"], registry=r)
        info.labels(sources.version or "unknown").set(1)
        for backend in backends:
            self._boots.labels(backend)
            self._create_to_running.labels(backend)
            self._exits.labels(backend)
            for result in ADOPTION_RESULTS:
                self._adoptions.labels(backend, result)
        for scope in QUOTA_SCOPES:
            for resource in Resource:
                self._quota_refusals.labels(scope, resource.value)
        for reason in AUTH_REASONS:
            self._auth_refusals.labels(reason)
        ProcessCollector(registry=r)  # process_cpu_seconds_total, process_resident_memory_bytes
        r.register(_ScrapeTime(self))

    # -- core.telemetry.VmTelemetry --------------------------------------------------------

    def create_steps(self, backend: str, times: StepTimes) -> None:
        for step, seconds in times.steps.items():
            self._create_steps.labels(step, backend).observe(seconds)
        if times.total is not None:
            self._create_steps.labels("total", backend).observe(times.total)

    def booted(self, backend: str, seconds: float, since_create: float | None) -> None:
        self._boots.labels(backend).observe(seconds)
        if since_create is not None:
            self._create_to_running.labels(backend).observe(since_create)

    def adoption(self, backend: str, adopted: bool) -> None:
        self._adoptions.labels(backend, "adopted" if adopted else "lost").inc()

    def vmm_exited(self, backend: str) -> None:
        self._exits.labels(backend).inc()

    def quota_refused(self, scope: str, resource: str) -> None:
        self._quota_refusals.labels(scope, resource).inc()

    # -- core.telemetry.ApiTelemetry -------------------------------------------------------

    def rpc_served(self, method: str, code: str, seconds: float) -> None:
        self._requests.labels(method, code).inc()
        self._latency.labels(method, code).observe(seconds)

    def auth_refused(self, reason: str) -> None:
        self._auth_refusals.labels(reason).inc()

    def access_refused(self, method: str) -> None:
        self._access_refusals.labels(method).inc()

    def rate_limited(self, reason: str) -> None:
        self._rate_limit_refusals.labels(reason).inc()

    async def exposition(self) -> bytes:
        counts = await self._sources.store.count_by_state_and_backend()
        # No await from here on: a concurrent scrape cannot swap the counts in between.
        self._vm_counts = counts
        return generate_latest(self.registry)

    # -- read at scrape time ---------------------------------------------------------------

    def scrape_time_metrics(self) -> Iterator[Metric]:
        src = self._sources
        vms = GaugeMetricFamily(
            "metald_vms", "VMs not deleted, by state and backend", labels=["state", "backend"]
        )
        backends = list(dict.fromkeys([*src.backends, *(b for _, b in self._vm_counts)]))
        for backend in backends:
            for state in VmState:
                n = self._vm_counts.get((state, backend), 0)
                vms.add_metric([state.value.lower(), backend], n)
        yield vms

        vcpus = memory = 0
        for vm in src.live_vms():
            vcpus += vm.config.vcpu_count
            memory += vm.config.memory_bytes
        yield _gauge(
            "metald_committed_vcpus",
            "vCPUs of the VMs that hold a VMM (CREATED, RUNNING, PAUSED)",
            vcpus,
        )
        yield _gauge(
            "metald_committed_memory_bytes",
            "Guest memory of the VMs that hold a VMM (CREATED, RUNNING, PAUSED)",
            memory,
        )
        yield _gauge(
            "metald_host_ceiling_vcpus", "The host's ceiling on committed vCPUs", src.host_vcpus
        )
        yield _gauge(
            "metald_host_ceiling_memory_bytes",
            "The host's ceiling on committed guest memory",
            src.host_memory_bytes,
        )
        yield from _metering(src.metering)


class _ScrapeTime:
    """A collector: the values PrometheusMetrics reads at scrape time."""

    def __init__(self, metrics: PrometheusMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return self._metrics.scrape_time_metrics()


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name.removesuffix("_total"), doc, value=value)


def _metering(m: MeteringStats) -> Iterator[Metric]:
    """core.metering.MeteringStats, as it is now."""
    yield _counter("metald_metering_samples_total", "Usage samples taken", m.samples_total)
    yield _counter(
        "metald_metering_sample_errors_total",
        "Usage samples that failed (that VM's tick was skipped)",
        m.sample_errors_total,
    )
    yield _gauge(
        "metald_metering_lag_seconds",
        "How late the last metering tick started against its schedule",
        m.tick_lag_seconds,
    )
    yield _gauge(
        "metald_billing_backlog_records",
        "Usage records stored and not yet delivered to billing",
        m.backlog_records,
    )
    yield _gauge(
        "metald_billing_backlog_limit_records",
        "The configured bound of the backlog",
        m.backlog_limit,
    )
    yield _counter(
        "metald_billing_backlog_full_total",
        "Samples that found the backlog full",
        m.backlog_full_total,
    )
    yield _counter(
        "metald_billing_batches_sent_total", "Batches delivered to billing", m.batches_sent_total
    )
    yield _counter(
        "metald_billing_records_sent_total", "Records delivered to billing", m.records_sent_total
    )
    yield _counter(
        "metald_billing_send_retries_total",
        "Billing calls repeated after a failure",
        m.send_retries_total,
    )
    yield _counter(
        "metald_billing_send_failures_total",
        "Billing calls that failed (unreachable or refused)",
        m.send_failures_total,
    )
    yield _counter(
        "metald_billing_notices_sent_total",
        "Started, stopped, gap and heartbeat calls delivered to billing",
        m.notices_sent_total,
    )
    yield _gauge(
        "metald_billing_last_delivery_timestamp_seconds",
        "When billing last accepted a call (Unix seconds; 0: never)",
        m.last_delivery_unix,
    )
