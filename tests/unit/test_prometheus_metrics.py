"""metald's Prometheus metrics (observability/prometheus.py): what each report becomes on
/metrics, the naming rules (base units, `_total` counters, no VM or customer ids), and the
refusals the API counts, served over HTTP by the real handlers and interceptors."""

from __future__ import annotations

import asyncio
import re
from dataclasses import replace

import httpx
from fakes import MemoryStore
from fakes.daemon import serve_fake_daemon
from prometheus_client.parser import text_string_to_metric_families

from metald.core.metering import MeteringStats
from metald.core.models import VmConfig, VmRecord
from metald.core.states import VmState
from metald.core.timing import StepTimes
from metald.observability.prometheus import MetricSources, PrometheusMetrics

SECRET_VM, SECRET_CUSTOMER = "vm-secret-1234", "customer-secret-5678"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _vm(vm_id: str, state: VmState, backend: str = "qemu", **config: int) -> VmRecord:
    return VmRecord(
        id=vm_id,
        customer_id=SECRET_CUSTOMER,
        config=VmConfig(**config),
        state=state,
        backend=backend,
        created_at=1.0,
        updated_at=1.0,
    )


async def _store(*vms: VmRecord) -> MemoryStore:
    store = MemoryStore()
    for vm in vms:
        await store.insert(vm)
    return store


def _samples(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name, frozenset(s.labels.items())] = s.value
    return out


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples[name, frozenset(labels.items())]


def _exercised(metering: MeteringStats | None = None) -> tuple[PrometheusMetrics, list[VmRecord]]:
    """Metrics over two backends with every kind of report made at least once."""
    live = [
        _vm(SECRET_VM, VmState.RUNNING, vcpu_count=2, memory_bytes=512 * 2**20),
        _vm("vm-2", VmState.PAUSED, "firecracker", vcpu_count=1, memory_bytes=256 * 2**20),
        _vm("vm-3", VmState.CREATED, vcpu_count=4, memory_bytes=1024 * 2**20),
    ]
    stopped = _vm("vm-4", VmState.SHUTDOWN)
    store = asyncio.run(_store(*live, stopped))
    metrics = PrometheusMetrics(
        MetricSources(
            store,
            ["qemu", "firecracker"],
            live_vms=lambda: live,
            metering=metering or MeteringStats(),
            host_vcpus=8,
            host_memory_bytes=4 * 2**30,
            version="9.9.9",
        )
    )
    times = StepTimes(steps={"store": 0.002, "network": 0.003, "jailer": 0.004})
    times.total = 0.010
    metrics.create_steps("qemu", times)
    metrics.booted("qemu", 0.05, 1.5)
    metrics.booted("qemu", 0.07, None)
    metrics.adoption("qemu", True)
    metrics.adoption("firecracker", False)
    metrics.vmm_exited("qemu")
    metrics.quota_refused("customer", "vms")
    metrics.rpc_served("GetVmInfo", "not_found", 0.001)
    metrics.auth_refused("invalid")
    metrics.access_refused("GetVmInfo")
    return metrics, [*live, stopped]


def test_every_report_is_on_metrics() -> None:
    stats = MeteringStats(samples_total=7, backlog_records=3, backlog_limit=100)
    stats.send_retries_total = 2
    stats.tick_lag_seconds = 0.25
    metrics, _ = _exercised(stats)
    s = _samples(asyncio.run(metrics.exposition()).decode())
    assert _value(s, "metald_vms", state="running", backend="qemu") == 1
    assert _value(s, "metald_vms", state="paused", backend="firecracker") == 1
    assert _value(s, "metald_vms", state="shutdown", backend="qemu") == 1
    assert _value(s, "metald_vms", state="running", backend="firecracker") == 0  # at zero
    assert _value(s, "metald_committed_vcpus") == 7
    assert _value(s, "metald_committed_memory_bytes") == 1792 * 2**20
    assert _value(s, "metald_host_ceiling_vcpus") == 8
    assert _value(s, "metald_host_ceiling_memory_bytes") == 4 * 2**30
    step = {"backend": "qemu"}
    assert _value(s, "metald_create_step_seconds_count", step="jailer", **step) == 1
    assert _value(s, "metald_create_step_seconds_sum", step="network", **step) == 0.003
    assert _value(s, "metald_create_step_seconds_count", step="total", **step) == 1
    assert _value(s, "metald_vm_boot_seconds_count", backend="qemu") == 2
    assert _value(s, "metald_vm_create_to_running_seconds_count", backend="qemu") == 1
    assert _value(s, "metald_vm_create_to_running_seconds_sum", backend="qemu") == 1.5
    assert _value(s, "metald_vm_boot_seconds_count", backend="firecracker") == 0  # at zero
    assert _value(s, "metald_vmm_adoptions_total", backend="qemu", result="adopted") == 1
    assert _value(s, "metald_vmm_adoptions_total", backend="firecracker", result="lost") == 1
    assert _value(s, "metald_vmm_unexpected_exits_total", backend="qemu") == 1
    assert _value(s, "metald_quota_refusals_total", scope="customer", resource="vms") == 1
    assert _value(s, "metald_quota_refusals_total", scope="host", resource="vcpus") == 0
    assert _value(s, "metald_rpc_requests_total", method="GetVmInfo", code="not_found") == 1
    assert _value(s, "metald_auth_refusals_total", reason="invalid") == 1
    assert _value(s, "metald_auth_refusals_total", reason="missing") == 0
    assert _value(s, "metald_access_refusals_total", method="GetVmInfo") == 1
    assert _value(s, "metald_metering_samples_total") == 7
    assert _value(s, "metald_metering_lag_seconds") == 0.25
    assert _value(s, "metald_billing_backlog_records") == 3
    assert _value(s, "metald_billing_backlog_limit_records") == 100
    assert _value(s, "metald_billing_send_retries_total") == 2
    assert _value(s, "metald_billing_send_failures_total") == 0
    assert _value(s, "metald_build_info", version="9.9.9") == 1
    assert ("process_resident_memory_bytes", frozenset()) in s


def test_metering_totals_are_read_at_scrape_time() -> None:
    stats = MeteringStats()
    metrics, _ = _exercised(stats)
    before = _samples(asyncio.run(metrics.exposition()).decode())
    stats.records_sent_total += 5
    stats.backlog_full_total += 1
    after = _samples(asyncio.run(metrics.exposition()).decode())
    assert _value(before, "metald_billing_records_sent_total") == 0
    assert _value(after, "metald_billing_records_sent_total") == 5
    assert _value(after, "metald_billing_backlog_full_total") == 1


def test_vm_counts_follow_the_store() -> None:
    store = asyncio.run(_store(_vm("vm-1", VmState.CREATED)))
    metrics = PrometheusMetrics(MetricSources(store, ["qemu"]))
    s = _samples(asyncio.run(metrics.exposition()).decode())
    assert _value(s, "metald_vms", state="created", backend="qemu") == 1
    vm = asyncio.run(store.get("vm-1"))
    assert vm is not None
    asyncio.run(store.update(replace(vm, state=VmState.RUNNING)))
    s = _samples(asyncio.run(metrics.exposition()).decode())
    assert _value(s, "metald_vms", state="created", backend="qemu") == 0
    assert _value(s, "metald_vms", state="running", backend="qemu") == 1


# --- naming rules ---------------------------------------------------------------------------

_TYPE = re.compile(r"^# TYPE (\S+) (\S+)$", re.M)
_HELP = re.compile(r"^# HELP (\S+) \S", re.M)
_UNIT_WORDS = ("seconds", "bytes", "records", "vcpus", "total", "info")
_WRONG_UNITS = re.compile(r"_(ms|milliseconds|us|microseconds|minutes|hours|kb|mb|mib|gib)(_|$)")
FORBIDDEN_LABELS = {"vm_id", "vm", "customer_id", "customer", "tenant", "tenant_id", "id"}


def test_naming_follows_prometheus_conventions() -> None:
    metrics, _ = _exercised()
    text = asyncio.run(metrics.exposition()).decode()
    types = dict(_TYPE.findall(text))
    ours = {name: kind for name, kind in types.items() if name.startswith("metald_")}
    assert len(ours) >= 25, sorted(ours)
    helped = set(_HELP.findall(text))
    for name, kind in ours.items():
        assert name in helped, f"{name} has no HELP"
        assert not _WRONG_UNITS.search(name), f"{name}: use base units (seconds, bytes)"
        if kind == "counter":
            assert name.endswith("_total"), f"counter {name} must end in _total"
        else:
            assert not name.endswith("_total"), f"{kind} {name} must not end in _total"
        if kind == "histogram":
            assert name.endswith("_seconds"), f"histogram {name} must be in seconds"
        if any(w in name for w in ("duration", "latency", "lag", "timestamp")):
            assert name.endswith("_seconds"), f"{name} is a time: _seconds"
    # A gauge that is not a count of things names what it counts or its unit.
    for name, kind in ours.items():
        if kind == "gauge" and name != "metald_vms":
            assert name.endswith(_UNIT_WORDS), f"gauge {name}: name its unit"


def test_no_vm_or_customer_ids_on_metrics() -> None:
    metrics, vms = _exercised()
    text = asyncio.run(metrics.exposition()).decode()
    labels = {
        label
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        for label in sample.labels
    }
    assert not labels & FORBIDDEN_LABELS, labels & FORBIDDEN_LABELS
    for vm in vms:
        assert vm.id not in text
        assert vm.customer_id not in text


# --- over HTTP: the API's refusals, counted where they happen --------------------------------


def test_refused_tokens_and_accesses_are_counted_on_metrics() -> None:
    service = "vmprovisioner.v1.VmService"
    with serve_fake_daemon() as daemon, httpx.Client(base_url=daemon.address) as http:

        def call(method: str, body: dict[str, object], token: str | None) -> int:
            headers = {"Content-Type": "application/json"}
            if token is not None:
                headers["Authorization"] = token
            return http.post(f"/{service}/{method}", json=body, headers=headers).status_code

        assert call("CreateVm", {"vm_id": "theirs"}, "Bearer dev_customer_bob") == 200
        assert call("ListVms", {}, None) == 401
        assert call("ListVms", {}, "Basic x") == 401
        assert call("ListVms", {}, "Bearer nope") == 401
        assert call("ListVms", {}, "Bearer nope") == 401
        # Another customer's VM answers as a missing one; it is an access refusal all the same.
        assert call("GetVmInfo", {"vm_id": "theirs"}, "Bearer dev_customer_acme") == 404
        assert call("GetVmInfo", {"vm_id": "nobodys"}, "Bearer dev_customer_acme") == 404
        assert call("CreateVm", {"customer_id": "bob"}, "Bearer dev_customer_acme") == 403
        answer = http.get("/metrics")
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("text/plain; version=0.0.4")
        s = _samples(answer.text)
    assert _value(s, "metald_auth_refusals_total", reason="missing") == 1
    assert _value(s, "metald_auth_refusals_total", reason="malformed") == 1
    assert _value(s, "metald_auth_refusals_total", reason="invalid") == 2
    assert _value(s, "metald_access_refusals_total", method="GetVmInfo") == 1
    assert _value(s, "metald_access_refusals_total", method="CreateVm") == 1
    assert _value(s, "metald_rpc_requests_total", method="GetVmInfo", code="not_found") == 2
    assert _value(s, "metald_vms", state="created", backend="qemu") == 1
