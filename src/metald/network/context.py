"""What the parts of the network manager share: the namespaces they work in, the lock over
what VMs share, the test hook, and the one error type.

The manager is split by concern (host side, customer segments, per-VM networks,
reconciliation); each part is small and takes this context instead of reaching into the
others' state.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from metald.core import timing
from metald.core.errors import MetaldError
from metald.network.models import NetworkSettings

log = logging.getLogger("metald.network")

# Test hook: called with each step's name; raising there simulates a failure at that step.
StepHook = Callable[[str], None]


class NetworkError(MetaldError):
    """A netlink or namespace operation failed (reported as internal)."""

    code = "internal"


@dataclass
class NetContext:
    """``host_netns`` names the namespace holding the host bridge (None: metald's own, the
    production case; tests always pass a namespace they made)."""

    settings: NetworkSettings
    host_netns: str | None
    segments_netns: str
    hook: StepHook | None = None
    # Guards what VMs share: the host bridge's FDB and neighbours, customer segments.
    lock: threading.RLock = field(default_factory=threading.RLock)

    def step(self, name: str) -> None:
        timing.lap(f"network.{name}")  # metald's timers of a create (core/timing.py)
        if self.hook is not None:
            self.hook(name)
