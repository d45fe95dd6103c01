"""An async client of one Firecracker process's HTTP API, over its Unix socket.

One method per call metald makes, named after it, so a failure always says which call it
was: Firecracker answers a bad request with 400 and a ``fault_message``, which becomes a
`FirecrackerApiError` reading like "PUT /drives/rootfs: <fault_message>"; a broken socket or a
timeout becomes a `BackendError` naming the call too. The bodies come from `config.py`; this
module only moves them.

The socket is reached through the path the runtime hands over (a /proc/self/fd/N path to the
socket it checked), used as is: the client never opens a socket path of its own choosing.
"""

from __future__ import annotations

from typing import Any, Literal

import httpx

from metald.backends.firecracker.config import Body
from metald.core.errors import BackendError

# Firecracker's InstanceInfo.state values.
STATE_NOT_STARTED = "Not started"
STATE_RUNNING = "Running"
STATE_PAUSED = "Paused"
_MAX_DETAIL = 300  # characters of a body without fault_message kept in an error


class FirecrackerApiError(BackendError):
    """Firecracker refused a call (a non-2xx answer)."""

    def __init__(self, call: str, status: int, fault_message: str) -> None:
        super().__init__(f"{call}: {fault_message}")
        self.call = call
        self.status = status
        self.fault_message = fault_message


class FirecrackerApi:
    """The calls metald makes to one Firecracker. Close it with `aclose`."""

    def __init__(self, socket_path: str, *, timeout: float = 10.0) -> None:
        self.socket_path = socket_path
        self._client = httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=socket_path),
            base_url="http://localhost",
            timeout=timeout,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    # ------------------------------------------------------------ pre-boot configuration

    async def put_logger(self, body: Body) -> None:
        await self._call("PUT", "/logger", body)

    async def put_metrics(self, body: Body) -> None:
        await self._call("PUT", "/metrics", body)

    async def put_serial(self, body: Body) -> None:
        await self._call("PUT", "/serial", body)

    async def put_machine_config(self, body: Body) -> None:
        await self._call("PUT", "/machine-config", body)

    async def put_boot_source(self, body: Body) -> None:
        await self._call("PUT", "/boot-source", body)

    async def put_drive(self, drive_id: str, body: Body) -> None:
        await self._call("PUT", f"/drives/{drive_id}", body)

    async def put_network_interface(self, iface_id: str, body: Body) -> None:
        await self._call("PUT", f"/network-interfaces/{iface_id}", body)

    async def put_entropy(self, body: Body) -> None:
        await self._call("PUT", "/entropy", body)

    # ------------------------------------------------------------------------ actions

    async def instance_start(self) -> None:
        await self._action("InstanceStart")

    async def flush_metrics(self) -> None:
        await self._action("FlushMetrics")

    async def send_ctrl_alt_del(self) -> None:
        await self._action("SendCtrlAltDel")

    async def patch_vm(self, state: Literal["Paused", "Resumed"]) -> None:
        await self._call("PATCH", "/vm", {"state": state})

    async def get_instance_info(self) -> dict[str, Any]:
        """GET /: InstanceInfo {app_name, id, state, vmm_version}."""
        info = await self._call("GET", "/", None)
        if not isinstance(info, dict) or not isinstance(info.get("state"), str):
            raise BackendError(f"GET /: an answer without a state: {_short(repr(info))}")
        return info

    # ---------------------------------------------------------------------- machinery

    async def _action(self, action_type: str) -> None:
        await self._call("PUT", "/actions", {"action_type": action_type}, name=action_type)

    async def _call(
        self, method: str, path: str, body: Body | None, *, name: str | None = None
    ) -> Any:
        call = f"{method} {path}" + (f" ({name})" if name else "")
        try:
            response = await self._client.request(method, path, json=body)
        except httpx.TimeoutException as e:
            raise BackendError(f"{call}: Firecracker did not answer in time") from e
        except httpx.HTTPError as e:
            raise BackendError(f"{call}: {type(e).__name__}: {e or 'connection failed'}") from e
        if response.is_success:
            if not response.content:
                return None
            try:
                return response.json()
            except ValueError as e:
                raise BackendError(f"{call}: an answer that is not JSON") from e
        raise FirecrackerApiError(call, response.status_code, _fault(response))


def _fault(response: httpx.Response) -> str:
    try:
        data = response.json()
    except ValueError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("fault_message"), str):
        return str(data["fault_message"])
    text = response.text.strip()
    detail = f": {_short(text)}" if text else ""
    return f"HTTP {response.status_code}{detail}"


def _short(text: str) -> str:
    return text if len(text) <= _MAX_DETAIL else text[:_MAX_DETAIL] + "..."
