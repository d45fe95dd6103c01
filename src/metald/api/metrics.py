"""The API's Prometheus metrics (RPCs by method and code, latency, VMs by state), in a
registry of our own (tests can run several apps in one process). Transport concerns, so they
live with the transport; the metering and observability of issue 9 is an adapter of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from metald.core.states import VmState
from metald.core.timing import StepTimes

# metald's own steps of a create are milliseconds; the VMM's start can be seconds.
_STEP_BUCKETS = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30,
)  # fmt: skip
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class ApiMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._requests = Counter(
            "metald_rpc_requests",
            "RPCs served, by method and Connect code",
            ["method", "code"],
            registry=self.registry,
        )
        self._latency = Histogram(
            "metald_rpc_duration_seconds",
            "RPC latency, by method and Connect code",
            ["method", "code"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._create_steps = Histogram(
            "metald_create_step_seconds",
            "Where the time of a successful CreateVm went, by step (core/timing.py; "
            "step=total is the whole use case, jailer.* are the helper's own steps inside "
            "jailer)",
            ["step", "backend"],
            buckets=_STEP_BUCKETS,
            registry=self.registry,
        )
        self._vms = Gauge(
            "metald_vms", "VMs not deleted, by state", ["state"], registry=self.registry
        )

    def observe_request(self, method: str, code: str, seconds: float) -> None:
        self._requests.labels(method, code).inc()
        self._latency.labels(method, code).observe(seconds)

    def observe_create_steps(self, backend: str, times: StepTimes) -> None:
        for step, seconds in times.steps.items():
            self._create_steps.labels(step, backend).observe(seconds)
        if times.total is not None:
            self._create_steps.labels("total", backend).observe(times.total)

    def render(self, vms_by_state: dict[VmState, int]) -> bytes:
        for state, count in vms_by_state.items():
            self._vms.labels(state.value.lower()).set(count)
        return generate_latest(self.registry)
