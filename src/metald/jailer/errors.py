"""The jailer's typed error."""

from __future__ import annotations

from metald.core.errors import BackendError


class JailerError(BackendError):
    """A jailer step failed; nothing the earlier steps made is left behind (unless
    `leftovers` says otherwise: what could not be removed)."""

    def __init__(self, step: str, message: str, *, leftovers: tuple[str, ...] = ()) -> None:
        text = f"jailer step {step} failed: {message}"
        if leftovers:
            text += f" (could not remove: {'; '.join(leftovers)})"
        super().__init__(text)
        self.step = step
        self.reason = message
        self.leftovers = leftovers
