"""The trivial VmService: metald's ASGI stack with a GetVmInfo that returns a constant, the
ceiling any real handler is measured against, and a way to serve it on each ASGI server.

"Trivial" includes everything of metald's request path but the handler's own work: the
generated VmService ASGI application (connectrpc: routing, protocol negotiation, decoding
the request, encoding the answer), metald's interceptor chain as app.py wires it (metrics,
bearer-token auth before the body, error mapping), and MetaldASGI (the /health and /metrics
routes and GuardedRequest's body deadline and drain). The answer is a constant
GetVmInfoResponse shaped like a running VM's (config, state, metrics, backend info,
network). `BENCH_CHAIN=bare` serves the connectrpc app alone (no interceptors, no
MetaldASGI), to show what metald's wrappers cost.

`python -m bench.servers_app SERVER PORT` serves it on SERVER (see SERVERS) until SIGTERM; the
servers that take an app by its import path (granian, pyvoy) import `bench.servers_app:app`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from collections.abc import Callable, Coroutine
from typing import Any

from connectrpc.request import RequestContext

from metald.api import server
from metald.api.auth import TokenAuthenticator
from metald.api.health import Health
from metald.api.http import MetaldASGI
from metald.app import connect_application
from metald.core.states import VmState
from metald.gen.vmprovisioner.v1 import vm_pb2 as pb
from metald.gen.vmprovisioner.v1.vm_connect import VmService, VmServiceASGIApplication
from metald.observability.prometheus import MetricSources, PrometheusMetrics

MIB = 1024 * 1024

ANSWER = pb.GetVmInfoResponse(
    vm_id="vm-bench",
    state=pb.VM_STATE_RUNNING,
    config=pb.VmConfig(
        cpu=pb.CpuConfig(vcpu_count=1, max_vcpu_count=1),
        memory=pb.MemoryConfig(size_bytes=128 * MIB, max_size_bytes=128 * MIB),
        boot=pb.BootConfig(
            kernel_path="/assets/vmlinuz", initrd_path="/assets/initrd", kernel_args="console=ttyS0"
        ),
        storage=[pb.StorageDevice(id="rootfs", path="/assets/rootfs.ext4", is_root_device=True)],
        network=[pb.NetworkInterface(id="eth0", mac_address="02:00:00:00:00:01")],
        metadata={"team": "bench"},
    ),
    metrics=pb.VmMetrics(cpu_usage_percent=1.5, memory_usage_bytes=64 * MIB, uptime_seconds=60),
    backend_info={"backend": "qemu", "accelerator": "tcg"},
    network_info=pb.VmNetworkInfo(
        ip_address="10.100.0.2", mac_address="02:00:00:00:00:01", tap_device="tap0"
    ),
)


class TrivialHandlers(VmService):  # type: ignore[misc]
    """GetVmInfo answers the constant; every other method is the generated `unimplemented`."""

    async def get_vm_info(
        self, request: pb.GetVmInfoRequest, ctx: RequestContext[Any, Any], /
    ) -> pb.GetVmInfoResponse:
        return ANSWER


class _NoStore:
    async def count_by_state_and_backend(self) -> dict[tuple[VmState, str], int]:
        return {}

    async def ping(self) -> None:
        return None


def build(chain: str = "metald") -> Any:
    """The ASGI app: `metald` (interceptors and MetaldASGI, as app.py) or `bare`."""
    if chain == "bare":
        return VmServiceASGIApplication(TrivialHandlers(), read_max_bytes=MIB)
    store = _NoStore()
    metrics = PrometheusMetrics(MetricSources(store, ["trivial"]))  # type: ignore[arg-type]
    connect = connect_application(
        TrivialHandlers(), TokenAuthenticator(dev_tokens=True), metrics, MIB
    )
    health = Health(backend="trivial", accelerator=lambda: "none", checks={"store": store.ping})
    return MetaldASGI(connect, health, metrics)


app = build(os.environ.get("BENCH_CHAIN", "metald"))


async def _serve_metald(port: int, name: str = "hypercorn", tuned: bool = True) -> None:
    """metald's own server start-up (api/server.py), as `metald serve` runs it."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    options = server.ServerOptions(address="127.0.0.1", port=port, tuned=tuned, server=name)
    await server.serve(app, options, stop.wait)


async def _serve_untuned(port: int) -> None:
    """hypercorn without api/hypercorn_tuning.py (its "before")."""
    await _serve_metald(port, tuned=False)


async def _serve_uvicorn(port: int) -> None:
    await _serve_metald(port, "uvicorn")


def _run_uvloop(main: Coroutine[Any, Any, None]) -> None:
    import uvloop

    uvloop.run(main)


# In-process servers: name -> (runner of a coroutine, the coroutine's factory)
RUNNERS: dict[str, tuple[Callable[[Coroutine[Any, Any, None]], None], Any]] = {
    "hypercorn": (asyncio.run, _serve_metald),
    "hypercorn-untuned": (asyncio.run, _serve_untuned),
    "hypercorn-uvloop": (_run_uvloop, _serve_metald),
    "uvicorn-zttp": (asyncio.run, _serve_uvicorn),
    "uvicorn-zttp-uvloop": (_run_uvloop, _serve_uvicorn),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("server", choices=sorted(RUNNERS))
    parser.add_argument("port", type=int)
    args = parser.parse_args()
    runner, serve = RUNNERS[args.server]
    runner(serve(args.port))


if __name__ == "__main__":
    main()
