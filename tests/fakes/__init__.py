"""In-memory fakes of every port in metald.core.ports, for service unit tests (and, in
firecracker/, a stand-in for the Firecracker binary, which cannot run on the test machines).

Each fake implements its Protocol exactly (tests/unit/test_fakes.py checks every method and
parameter, since mypy does not check tests), records what it was asked, and can be told to
fail at any method (`fake.faults.fail("create", BackendError(...))`) or to hold a call open
(`fake.faults.gate("create")`) so a test can cancel it half-way.
"""

from .assets import FakeAssets
from .backend import Call, FakeBackend, FakeVmm
from .faults import Faults, Gate
from .network import FakeNetwork
from .quotas import MemoryQuotas
from .store import MemoryStore

__all__ = [
    "Call",
    "FakeAssets",
    "FakeBackend",
    "FakeNetwork",
    "FakeVmm",
    "Faults",
    "Gate",
    "MemoryQuotas",
    "MemoryStore",
]
