"""The admission settings as app.py reads them: the host ceiling's defaults (memory minus a
reserve; cores minus a reserve times the overcommit), per-VM maxima that default to the
ceiling, the rate-limit cap as the default when no default is set, per-customer defaults
from UNKEY_METALD_QUOTA_*, and start-up refusals of settings that leave nothing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from metald import config
from metald.app import StartupError, build_admission, default_rate_limit_mbps
from metald.config import ConfigError, load_settings
from metald.core.quotas import Resource
from metald.store.database import Database

GIB = 1024**3


def test_the_host_ceiling_defaults_to_what_the_host_has_minus_the_reserve() -> None:
    s = load_settings(host_memory_reserve_bytes=2 * GIB, host_vcpu_reserve=0)
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert s.host_memory_ceiling == physical - 2 * GIB
    assert s.host_vcpu_ceiling == int((os.cpu_count() or 1) * 4.0)
    assert s.memory_limit == s.host_memory_ceiling  # per VM: no more than the host takes
    assert s.vcpu_limit == (os.cpu_count() or 1)
    set_ = load_settings(host_memory_bytes=3 * GIB, host_vcpus=5, max_memory_bytes=GIB)
    assert (set_.host_memory_ceiling, set_.host_vcpu_ceiling, set_.memory_limit) == (
        3 * GIB,
        5,
        GIB,
    )


def test_quota_defaults_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNKEY_METALD_QUOTA_RUNNING_VMS", "2")
    monkeypatch.setenv("UNKEY_METALD_QUOTA_MEMORY_BYTES", str(4 * GIB))
    s = load_settings()
    assert (s.quota_running_vms, s.quota_memory_bytes, s.quota_vms) == (2, 4 * GIB, None)
    monkeypatch.setenv("UNKEY_METALD_QUOTA_VMS", "-1")
    with pytest.raises(ConfigError, match="UNKEY_METALD_QUOTA_VMS"):
        load_settings()


def test_the_old_env_names_still_set_the_per_vm_maxima(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNKEY_METALD_MAX_VCPUS", "3")
    monkeypatch.setenv("UNKEY_METALD_MAX_MEMORY_BYTES", str(2 * GIB))
    s = load_settings()
    assert (s.vcpu_limit, s.memory_limit) == (3, 2 * GIB)


@pytest.mark.parametrize(
    ("settings", "rate"),
    [
        ({}, 0),  # no default, no cap: unlimited
        ({"network_rate_limit": True, "network_rate_limit_mbps": 200}, 200),
        ({"network_rate_limit_max_mbps": 500}, 500),  # the cap is the default
        (
            {
                "network_rate_limit": True,
                "network_rate_limit_mbps": 200,
                "network_rate_limit_max_mbps": 500,
            },
            200,
        ),
    ],
)
def test_the_default_rate_limit(settings: dict[str, object], rate: int) -> None:
    assert default_rate_limit_mbps(load_settings(**settings)) == rate


def test_a_default_rate_above_the_cap_is_refused_at_start_up() -> None:
    s = load_settings(
        network_rate_limit=True, network_rate_limit_mbps=1000, network_rate_limit_max_mbps=100
    )
    with pytest.raises(StartupError, match="UNKEY_METALD_NETWORK_RATE_LIMIT_MAX_MBPS"):
        default_rate_limit_mbps(s)


async def test_a_reserve_that_leaves_nothing_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    database = Database(f"sqlite+aiosqlite:///{tmp_path / 'metald.db'}")
    try:
        monkeypatch.setattr(config, "_host_memory_bytes", lambda: 4 * GIB)
        with pytest.raises(StartupError, match="HOST_MEMORY_RESERVE_BYTES"):
            build_admission(load_settings(host_memory_reserve_bytes=4 * GIB), database)
        with pytest.raises(StartupError, match="HOST_VCPU_RESERVE"):
            build_admission(load_settings(host_vcpu_reserve=(os.cpu_count() or 1)), database)
        admission = build_admission(
            load_settings(quota_vms=7, network_rate_limit_max_mbps=8), database
        )
        assert admission._defaults.limits[Resource.VMS] == 7
        assert admission._maxima.rate_limit_bandwidth == 1_000_000  # 8 Mbit/s in bytes/s
        assert admission._host.memory_bytes == 3 * GIB
    finally:
        await database.close()
