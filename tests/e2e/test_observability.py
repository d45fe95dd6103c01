"""GET /health and GET /metrics, read with curl: open (no token), and truthful."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from collections.abc import Callable
from pathlib import Path

from ._support import Caller, Daemon, curl_raw, wait_pid_gone

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def _get(url: str) -> tuple[int, str]:
    return curl_raw(url, None, {}, method="GET", timeout=20)


def _metrics(
    daemon: Daemon, url: str | None = None
) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    status, text = _get(url or daemon.url + "/metrics")
    assert status == 200, text
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        assert m, f"not a Prometheus sample line: {line!r}"
        labels = frozenset(_LABEL.findall(m.group(2) or ""))
        samples[(m.group(1), labels)] = float(m.group(3))
    return samples


def _value(samples: dict, name: str, **labels: str) -> float:  # type: ignore[type-arg]
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_health(daemon: Daemon) -> None:
    status, text = _get(daemon.url + "/health")
    assert status == 200, text
    body = json.loads(text)
    assert body["status"] == "ok"
    assert body["backend"] == "qemu"
    assert body["accelerator"] == "tcg"
    assert body["store"] == "ok"
    assert isinstance(body["version"], str) and body["version"]
    assert isinstance(body["uptime_seconds"], int | float) and body["uptime_seconds"] >= 0
    status, _ = curl_raw(daemon.url + "/health", b"{}", {"Content-Type": "application/json"})
    assert status == 405, "POST /health"


def test_health_fails_when_the_asset_store_is_gone(
    metald_factory: Callable[..., Daemon], private_store: Path
) -> None:
    daemon = metald_factory(UNKEY_METALD_ASSETMANAGER_CACHE_DIR=str(private_store))
    assert _get(daemon.url + "/health")[0] == 200
    moved = private_store.with_name("moved-away")
    shutil.move(private_store, moved)
    try:
        status, text = _get(daemon.url + "/health")
        assert status == 503, text
        assert json.loads(text)["status"] != "ok"
    finally:
        shutil.move(moved, private_store)
    status, text = _get(daemon.url + "/health")
    assert status == 200, text


def test_metrics_count_requests_and_vms(daemon: Daemon, callers: Callable[..., Caller]) -> None:
    c = callers("curl-connect-json", daemon.url)
    g = callers("grpcio", daemon.url)
    before = _metrics(daemon)

    for _ in range(3):
        c.must("ListVms", {})
    for _ in range(2):
        assert g("GetVmInfo", {"vm_id": "no-such-vm"}).code == "not_found"
    assert c("ListVms", {}, token=None).code == "unauthenticated"
    assert c("CreateVm", {"config": {"cpu": {"vcpu_count": 99}}}).code == "invalid_argument"
    vm_id = g.must("CreateVm", {"vm_id": "counted"}).body["vm_id"]

    after = _metrics(daemon)
    total = "metald_rpc_requests_total"
    expected = [
        ("ListVms", "ok", 3),
        ("GetVmInfo", "not_found", 2),
        ("ListVms", "unauthenticated", 1),
        ("CreateVm", "invalid_argument", 1),
        ("CreateVm", "ok", 1),
    ]
    for method, code, n in expected:
        delta = _value(after, total, method=method, code=code) - _value(
            before, total, method=method, code=code
        )
        assert delta == n, f"{total}{{method={method},code={code}}} grew by {delta}, not {n}"
    count = _value(after, "metald_rpc_duration_seconds_count", method="ListVms", code="ok")
    assert count >= 3
    assert (
        _value(after, "metald_rpc_duration_seconds_bucket", method="ListVms", code="ok", le="+Inf")
        == count
    )

    assert _value(after, "metald_vms", state="created", backend="qemu") == 1
    assert _value(after, "metald_vms", state="running", backend="qemu") == 0

    g.must("BootVm", {"vm_id": vm_id})
    g.must("PauseVm", {"vm_id": vm_id})
    now = _metrics(daemon)
    assert _value(now, "metald_vms", state="created", backend="qemu") == 0
    assert _value(now, "metald_vms", state="paused", backend="qemu") == 1
    assert _value(now, "metald_vm_boot_seconds_count", backend="qemu") == 1
    assert _value(now, "metald_vm_create_to_running_seconds_count", backend="qemu") == 1
    assert _value(now, "metald_committed_vcpus") >= 1

    g.must("DeleteVm", {"vm_id": vm_id, "force": True})
    now = _metrics(daemon)
    assert sum(v for (name, _), v in now.items() if name == "metald_vms") == 0
    assert _value(now, total, method="DeleteVm", code="ok") == 1


def test_the_dedicated_listener_serves_the_same_metrics(
    daemon: Daemon, callers: Callable[..., Caller]
) -> None:
    """UNKEY_METALD_OTEL_PROMETHEUS_INTERFACE:PORT (the fixture's free port): /metrics, open,
    the same metric names and counts as the API port's; nothing else is served there."""
    c = callers("curl-connect-json", daemon.url)
    c.must("ListVms", {})
    assert c("ListVms", {}, token="nope").code == "unauthenticated"
    api = _metrics(daemon)
    listener = _metrics(daemon, daemon.metrics_url)
    assert {name for name, _ in api} == {name for name, _ in listener}
    for key in (
        ("metald_rpc_requests_total", frozenset({("method", "ListVms"), ("code", "ok")})),
        ("metald_auth_refusals_total", frozenset({("reason", "invalid")})),
        ("metald_vms", frozenset({("state", "created"), ("backend", "qemu")})),
    ):
        assert api[key] == listener[key] > -1, key
    assert api["metald_auth_refusals_total", frozenset({("reason", "invalid")})] == 1
    base = daemon.metrics_url.removesuffix("/metrics")
    assert _get(base + "/health")[0] == 404
    assert _get(base + "/vmprovisioner.v1.VmService/ListVms")[0] == 404
    status, _ = curl_raw(daemon.metrics_url, b"{}", {"Content-Type": "text/plain"})
    assert status == 405


def test_adoptions_at_start_up_are_counted(daemon: Daemon, callers: Callable[..., Caller]) -> None:
    """A restart adopts the running VMM again (metald_vmm_adoptions_total{result="adopted"});
    one whose VMM was killed while metald was down is counted lost."""
    g = callers("grpcio", daemon.url)
    for vm_id in ("kept", "killed"):
        g.must("CreateVm", {"vm_id": vm_id})
        g.must("BootVm", {"vm_id": vm_id})
    fresh = _metrics(daemon, daemon.metrics_url)
    assert _value(fresh, "metald_vmm_adoptions_total", backend="qemu", result="adopted") == 0
    pid = int(g.info("killed").body["backend_info"]["pid"])
    assert daemon.stop() == 0
    os.kill(pid, signal.SIGKILL)
    wait_pid_gone(pid)
    daemon.start_again()
    g = callers("grpcio", daemon.url)
    now = _metrics(daemon, daemon.metrics_url)
    assert _value(now, "metald_vmm_adoptions_total", backend="qemu", result="adopted") == 1
    assert _value(now, "metald_vmm_adoptions_total", backend="qemu", result="lost") == 1
    assert _value(now, "metald_vms", state="running", backend="qemu") == 1
    assert _value(now, "metald_vms", state="shutdown", backend="qemu") == 1
    for vm_id in ("kept", "killed"):
        g.must("DeleteVm", {"vm_id": vm_id, "force": True})
