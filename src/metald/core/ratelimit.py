"""Token buckets: per-customer call rates and per-source failed-authentication rates.

A bucket holds up to `burst` tokens and gains `rate` per second; a call takes `cost` tokens
(a mutating call may weigh more), and a call that finds too few is refused with the seconds
until enough are back (the retry hint). Time comes from a clock passed in (monotonic
seconds), so tests step it by hand.

The buckets live in this process: limits hold across every connection of one daemon, not
across daemons (several metald nodes would each allow the full rate; sharing needs the
buckets in the database or a shared cache). Memory is bounded: buckets are kept in an LRU
of `max_keys`; the least recently used key is forgotten first, which only ever hands it a
full bucket again.
"""

from __future__ import annotations

import ipaddress
import math
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from metald.core.validation import CUSTOMER_ID

Clock = Callable[[], float]


@dataclass(frozen=True)
class Limit:
    rate: float  # tokens per second
    burst: float  # the most tokens a bucket holds (and starts with)

    def __post_init__(self) -> None:
        if not (self.rate > 0 and math.isfinite(self.rate)):
            raise ValueError(f"rate {self.rate} must be a positive number")
        if not (self.burst >= 1 and math.isfinite(self.burst)):
            raise ValueError(f"burst {self.burst} must be at least 1")


class Bucket:
    __slots__ = ("at", "limit", "tokens")

    def __init__(self, limit: Limit, now: float) -> None:
        self.limit = limit
        self.tokens = limit.burst
        self.at = now

    def _refill(self, now: float) -> None:
        if now > self.at:
            self.tokens = min(self.limit.burst, self.tokens + (now - self.at) * self.limit.rate)
            self.at = now

    def wait(self, now: float, cost: float = 1.0) -> float:
        """Seconds until `cost` tokens are there (0: now); takes nothing."""
        self._refill(now)
        missing = min(cost, self.limit.burst) - self.tokens
        return 0.0 if missing <= 0 else missing / self.limit.rate

    def take(self, now: float, cost: float = 1.0) -> float:
        """Take `cost` tokens and return 0, or take nothing and return the seconds to wait.
        A cost above the burst is charged as the whole burst (it could never pass)."""
        waiting = self.wait(now, cost)
        if waiting == 0.0:
            self.tokens -= min(cost, self.limit.burst)
        return waiting


class Buckets:
    """One bucket per key, in an LRU of at most `max_keys`."""

    def __init__(self, limit_of: Callable[[str], Limit], clock: Clock, max_keys: int) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self._limit_of = limit_of
        self._clock = clock
        self._max = max_keys
        self._buckets: OrderedDict[str, Bucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def __contains__(self, key: str) -> bool:
        return key in self._buckets

    def _bucket(self, key: str, now: float) -> Bucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = Bucket(self._limit_of(key), now)
            if len(self._buckets) > self._max:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        return bucket

    def take(self, key: str, cost: float = 1.0) -> float:
        now = self._clock()
        return self._bucket(key, now).take(now, cost)

    def wait(self, key: str, cost: float = 1.0) -> float:
        """Seconds until `key` has `cost` tokens; takes nothing (an unknown key: 0)."""
        bucket = self._buckets.get(key)
        return 0.0 if bucket is None else bucket.wait(self._clock(), cost)


class CustomerLimits:
    """Per-customer call buckets: the default limit, or a customer's override; a mutating
    call costs `mutating_cost` tokens, any other 1."""

    def __init__(
        self,
        default: Limit,
        mutating_cost: float,
        overrides: Mapping[str, Limit],
        clock: Clock,
        max_customers: int = 100_000,
    ) -> None:
        self._overrides = dict(overrides)
        self.mutating_cost = mutating_cost
        self._buckets = Buckets(lambda c: self._overrides.get(c, default), clock, max_customers)

    def take(self, customer: str, mutating: bool) -> float:
        """0 when the call may go ahead (its tokens taken), else the seconds to wait."""
        return self._buckets.take(customer, self.mutating_cost if mutating else 1.0)


class FailedAuthLimits:
    """Failed authentications per source address: each failure takes a token; a source
    without one left is refused before its token is even checked."""

    def __init__(self, limit: Limit, clock: Clock, max_sources: int = 10_000) -> None:
        self._buckets = Buckets(lambda _: limit, clock, max_sources)

    def __len__(self) -> int:
        return len(self._buckets)

    def __contains__(self, source: str) -> bool:
        return source in self._buckets

    def blocked(self, source: str) -> float:
        """Seconds until `source` may try again (0: it may now)."""
        return self._buckets.wait(source)

    def failed(self, source: str) -> bool:
        """Count a failure; whether it used the source's last token (it is blocked now)."""
        self._buckets.take(source)
        return self._buckets.wait(source) > 0


def source_key(address: str | None) -> str:
    """The source a peer address is throttled as: its IPv4 address, or its IPv6 /64 (one
    host often holds a whole /64). ASGI servers give `host:port`, IPv6 hosts unbracketed,
    so the port is what follows the last colon."""
    if not address:
        return "unknown"
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
    for host in (address.rpartition(":")[0].strip("[]"), address.strip("[]")):
        try:
            ip = ipaddress.ip_address(host)
            break
        except ValueError:
            continue
    if ip is None:
        return address[:64]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def parse_overrides(text: str, origin: str) -> dict[str, Limit]:
    """The overrides file's text (`origin`: its name, for messages): one `<customer_id>
    <rate per second> <burst>` per line; `#` starts a comment. ValueError naming the line for
    anything else."""
    overrides: dict[str, Limit] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        where = f"{origin}:{number}"
        if len(parts) != 3 or not CUSTOMER_ID.fullmatch(parts[0]):
            raise ValueError(f"{where}: expected '<customer_id> <rate> <burst>'")
        try:
            limit = Limit(float(parts[1]), float(parts[2]))
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        if parts[0] in overrides:
            raise ValueError(f"{where}: customer {parts[0]} given twice")
        overrides[parts[0]] = limit
    return overrides
