"""The one exception the SDK raises, and the mapping from connectrpc's errors to it."""

from __future__ import annotations

from connectrpc.code import Code
from connectrpc.errors import ConnectError

_TRANSPORT_MARKER = "client error (Connect): "
_MAX_DETAIL = 200


class MetaldClientError(Exception):
    """An RPC failed.

    `code` is the Connect code name (`not_found`, `failed_precondition`, `unauthenticated`,
    `unavailable`, ...); `message` is the server's message, or a description of the local
    failure (for example `cannot reach http://127.0.0.1:8080: ...`).
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    def __repr__(self) -> str:
        return f"MetaldClientError(code={self.code!r}, message={self.message!r})"


def _transport_detail(text: str) -> str:
    """Keep the useful tail of a pyqwest/reqwest transport error ("tcp connect error: ...")."""
    if _TRANSPORT_MARKER in text:
        text = text.split(_TRANSPORT_MARKER, 1)[1]
    if len(text) > _MAX_DETAIL:
        text = text[: _MAX_DETAIL - 3] + "..."
    return text


def from_connect_error(
    err: ConnectError, address: str, timeout: float | None = None
) -> MetaldClientError:
    """Translate a ConnectError raised by the generated client.

    connectrpc reports a failure that happened before any HTTP response (refused connection,
    DNS, bad URL) as `unavailable` with the transport exception as `__cause__`; an error the
    server sent has no non-Connect cause. Only the former is reworded as "cannot reach".
    """
    code = err.code.value
    cause = err.__cause__
    if err.code is Code.UNAVAILABLE and cause is not None and not isinstance(cause, ConnectError):
        return MetaldClientError(code, f"cannot reach {address}: {_transport_detail(str(cause))}")
    if err.code is Code.DEADLINE_EXCEEDED and isinstance(cause, TimeoutError) and timeout:
        return MetaldClientError(code, f"no answer from {address} within {timeout:g}s")
    return MetaldClientError(code, err.message)
