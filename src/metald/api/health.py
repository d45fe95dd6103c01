"""GET /health: what is running and whether its parts answer."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from metald import __version__

Check = Callable[[], Awaitable[None]]


@dataclass
class HealthReport:
    ok: bool
    body: dict[str, Any] = field(default_factory=dict)


class Health:
    def __init__(self, *, backend: str, accelerator: Callable[[], str], checks: dict[str, Check]):
        self._backend = backend
        self._accelerator = accelerator
        self._checks = checks
        self._started = time.monotonic()

    async def report(self) -> HealthReport:
        results: dict[str, str] = {}
        for name, check in self._checks.items():
            try:
                await asyncio.wait_for(check(), timeout=2.0)
                results[name] = "ok"
            except Exception as exc:
                results[name] = f"failing: {type(exc).__name__}"
        ok = all(v == "ok" for v in results.values())
        return HealthReport(
            ok=ok,
            body={
                "status": "ok" if ok else "failing",
                "version": __version__,
                "backend": self._backend,
                "accelerator": self._accelerator(),
                "store": results.get("store", "unknown"),
                "checks": results,
                "uptime_seconds": round(time.monotonic() - self._started, 1),
            },
        )
