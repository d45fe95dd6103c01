"""Token buckets with a hand-stepped clock: burst, refill, weights, per-customer overrides,
customers independent of each other, failed-authentication sources in a bounded LRU, the
overrides file, and the source an address is throttled as."""

from __future__ import annotations

from pathlib import Path

import pytest

from metald.core.ratelimit import (
    Bucket,
    CustomerLimits,
    FailedAuthLimits,
    Limit,
    parse_overrides,
    source_key,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_bucket_allows_its_burst_then_refills_at_its_rate() -> None:
    bucket = Bucket(Limit(rate=2, burst=3), now=0)
    assert [bucket.take(0) for _ in range(3)] == [0, 0, 0]
    assert bucket.take(0) == pytest.approx(0.5)  # one token comes back in 1/rate s
    assert bucket.take(0.25) == pytest.approx(0.25)  # refused calls take nothing
    assert bucket.take(0.5) == 0
    assert bucket.take(0.5) > 0
    assert [bucket.take(100) for _ in range(3)] == [0, 0, 0]  # never more than the burst
    assert bucket.take(100) > 0


def test_weights_take_more_and_a_cost_above_the_burst_is_the_burst() -> None:
    bucket = Bucket(Limit(rate=1, burst=10), now=0)
    assert bucket.take(0, cost=5) == 0
    assert bucket.take(0, cost=5) == 0
    assert bucket.take(0, cost=5) == pytest.approx(5)
    big = Bucket(Limit(rate=1, burst=4), now=0)
    assert big.take(0, cost=100) == 0  # charged as 4, else it could never pass
    assert big.take(0, cost=1) == pytest.approx(1)


def test_customers_are_independent_mutating_calls_weigh_and_overrides_apply() -> None:
    clock = Clock()
    limits = CustomerLimits(Limit(1, 10), 5, {"big": Limit(100, 100)}, clock)
    assert limits.take("acme", mutating=True) == 0
    assert limits.take("acme", mutating=True) == 0
    assert limits.take("acme", mutating=False) == pytest.approx(1)
    assert limits.take("eve", mutating=False) == 0  # acme's bucket is not eve's
    assert all(limits.take("big", mutating=True) == 0 for _ in range(20))
    assert limits.take("big", mutating=True) > 0
    clock.now += 1
    assert limits.take("acme", mutating=False) == 0


def test_failed_auth_blocks_a_source_until_it_refills() -> None:
    clock = Clock()
    limits = FailedAuthLimits(Limit(rate=0.5, burst=3), clock)
    for last in (False, False, True):  # failed() says when the source became blocked
        assert limits.blocked("192.0.2.1") == 0
        assert limits.failed("192.0.2.1") is last
    assert limits.blocked("192.0.2.1") == pytest.approx(2)
    assert limits.blocked("192.0.2.2") == 0  # another source
    assert "192.0.2.2" not in limits  # asking does not make a bucket
    clock.now += 2
    assert limits.blocked("192.0.2.1") == 0


def test_the_source_lru_is_bounded_and_forgets_the_least_recent() -> None:
    clock = Clock()
    limits = FailedAuthLimits(Limit(rate=0.001, burst=1), clock, max_sources=3)
    for source in ("a", "b", "c"):
        limits.failed(source)
    limits.failed("a")  # a used again: b is now the least recent
    limits.failed("d")
    assert len(limits) == 3
    assert "b" not in limits and {"a", "c", "d"} <= {s for s in "acd" if s in limits}
    assert limits.blocked("b") == 0  # forgotten: a full bucket again
    assert limits.blocked("a") > 0
    for i in range(1000):
        limits.failed(f"10.0.{i // 256}.{i % 256}")
    assert len(limits) == 3


@pytest.mark.parametrize(
    ("address", "key"),
    [
        ("127.0.0.1:54321", "127.0.0.1"),
        ("[2001:db8::1]:443", "2001:db8::/64"),
        ("2001:db8::abcd:1:5000", "2001:db8::/64"),
        ("a::b:c:d:e:443", "a::/64"),  # not a::b:c:d:e:443 (whose /64 is a:0:0:b)
        ("::1:54321", "::/64"),
        ("[::ffff:192.0.2.7]:80", "192.0.2.7"),
        (None, "unknown"),
        ("not an address", "not an address"),
        ("192.0.2.1", "192.0.2.1"),
    ],
)
def test_sources_are_ipv4_addresses_and_ipv6_slash_64s(address: str | None, key: str) -> None:
    assert source_key(address) == key


def test_the_overrides_file() -> None:
    text = "# customer rate burst\nacme 50 100\n\neve 0.5 2  # slow\n"
    assert parse_overrides(text, "limits") == {"acme": Limit(50, 100), "eve": Limit(0.5, 2)}
    for bad in ("acme 5", "acme x 2", "acme 0 2", "acme 1 0.5", "a/b 1 1", "acme 1 1\nacme 2 2"):
        with pytest.raises(ValueError, match=r"^limits:[12]: "):
            parse_overrides(bad + "\n", "limits")


def test_the_daemon_reads_the_limits_or_refuses_to_start(tmp_path: Path) -> None:
    from metald.app import StartupError, build_guard
    from metald.config import load_settings

    assert build_guard(load_settings(), None).customers is None  # off by default
    path = tmp_path / "limits"
    path.write_text("acme 1 2\n")
    on = build_guard(load_settings(rate_limit_enabled=True, rate_limit_file=path), None)
    assert on.customers is not None and on.failed_auth is not None
    path.write_text("acme fast\n")
    with pytest.raises(StartupError, match=r"UNKEY_METALD_RATE_LIMIT_FILE: .*limits:1"):
        build_guard(load_settings(rate_limit_enabled=True, rate_limit_file=path), None)
    with pytest.raises(StartupError, match="UNKEY_METALD_RATE_LIMIT_FILE"):
        build_guard(load_settings(rate_limit_enabled=True, rate_limit_file=tmp_path / "no"), None)
