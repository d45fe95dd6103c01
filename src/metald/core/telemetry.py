"""Telemetry ports: what the use cases and the transport report for /metrics.

The counters and histograms live in an adapter (observability/prometheus.py); the service
and the API only say what happened, through these protocols, so neither imports Prometheus
and a service unit test needs no registry. What is reported carries backends, states,
methods, codes and reasons, never a VM or customer id: /metrics is open (no token) and a
label per VM would also grow without bound.
"""

from __future__ import annotations

from typing import Protocol

from metald.core.timing import StepTimes


class VmTelemetry(Protocol):
    """What VmService reports."""

    def create_steps(self, backend: str, times: StepTimes) -> None:
        """A CreateVm succeeded; where its time went (core/timing.py)."""

    def booted(self, backend: str, seconds: float, since_create: float | None) -> None:
        """A BootVm succeeded in `seconds` (the use case, VMM relaunch included);
        `since_create`: for a VM's first boot, the seconds from its CreateVm to RUNNING."""

    def adoption(self, backend: str, adopted: bool) -> None:
        """At start-up, a live VM's VMM was adopted again (True) or found gone (False)."""

    def vmm_exited(self, backend: str) -> None:
        """A VMM exited without metald asking (the VM became SHUTDOWN)."""

    def quota_refused(self, scope: str, resource: str) -> None:
        """An admission was refused: scope "customer" (a quota) or "host" (the ceiling)."""


class ApiTelemetry(Protocol):
    """What the transport reports, and the exposition it serves on /metrics."""

    def rpc_served(self, method: str, code: str, seconds: float) -> None: ...

    def auth_refused(self, reason: str) -> None:
        """A call was refused for its credentials: a token missing, malformed, invalid,
        expired or revoked, or its client certificate (reason "certificate", api/mtls.py)."""

    def access_refused(self, method: str) -> None:
        """An authenticated call was refused for touching what is not the caller's."""

    def rate_limited(self, reason: str) -> None:
        """A call was refused by a rate limit: "customer" (its customer's bucket) or
        "auth_failures" (its source failed authentication too often)."""

    async def exposition(self) -> bytes:
        """The Prometheus text exposition, read at this instant."""


class NoTelemetry:
    """Reports nothing (service unit tests, tools that run the service without /metrics)."""

    def create_steps(self, backend: str, times: StepTimes) -> None:
        pass

    def booted(self, backend: str, seconds: float, since_create: float | None) -> None:
        pass

    def adoption(self, backend: str, adopted: bool) -> None:
        pass

    def vmm_exited(self, backend: str) -> None:
        pass

    def quota_refused(self, scope: str, resource: str) -> None:
        pass


EXPOSITION_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
