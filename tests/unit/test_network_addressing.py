"""Address allocation: the in-memory book for the logic, SQLite for persistence and the
unique constraint."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from metald.core.errors import InvalidArgument, ResourceExhausted
from metald.network.addressing import allocate
from metald.store.addresses import AddressBook, MemoryAddressBook, SqlAddressBook
from metald.store.database import Database

NET4 = ipaddress.IPv4Network("10.100.0.0/16")
GW4 = ipaddress.IPv4Address("10.100.0.1")
NET6 = ipaddress.IPv6Network("fd00::/64")
GW6 = ipaddress.IPv6Address("fd00::1")
TINY = ipaddress.IPv4Network("192.168.7.0/29")  # 8 addresses, 5 for VMs
TINY_GW = ipaddress.IPv4Address("192.168.7.1")


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


@pytest.fixture(params=["memory", "sqlite"])
async def book(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AddressBook]:
    if request.param == "memory":
        yield MemoryAddressBook()
        return
    database = Database(f"sqlite+aiosqlite:///{tmp_path / 'metald.db'}")
    await database.migrate()
    yield SqlAddressBook(database)
    await database.close()


async def test_lowest_free_address_skips_network_and_gateway(book: AddressBook) -> None:
    assert await allocate(book, "a", NET4, GW4) == ip("10.100.0.2")
    assert await allocate(book, "b", NET4, GW4) == ip("10.100.0.3")
    assert await allocate(book, "a", NET6, GW6) == ip("fd00::2")
    assert await allocate(book, "b", NET6, GW6) == ip("fd00::3")
    assert {(a.vm_id, a.family, a.address) for a in await book.all()} == {
        ("a", 4, "10.100.0.2"),
        ("b", 4, "10.100.0.3"),
        ("a", 6, "fd00::2"),
        ("b", 6, "fd00::3"),
    }


async def test_allocation_is_idempotent_per_vm_and_family(book: AddressBook) -> None:
    first = await allocate(book, "a", NET4, GW4)
    assert await allocate(book, "a", NET4, GW4) == first
    assert await allocate(book, "a", NET4, GW4, first) == first
    with pytest.raises(InvalidArgument):
        await allocate(book, "a", NET4, GW4, ip("10.100.0.9"))
    assert len(await book.for_vm("a")) == 1


async def test_a_released_address_is_given_out_again(book: AddressBook) -> None:
    await allocate(book, "a", NET4, GW4)
    await allocate(book, "b", NET4, GW4)
    assert await book.release("a") == 1
    assert await book.release("a") == 0
    assert await allocate(book, "c", NET4, GW4) == ip("10.100.0.2")


async def test_static_address_is_honoured_when_free(book: AddressBook) -> None:
    assert await allocate(book, "a", NET4, GW4, ip("10.100.7.7")) == ip("10.100.7.7")
    assert await allocate(book, "b", NET6, GW6, ip("fd00::beef")) == ip("fd00::beef")
    # Dynamic allocation does not take it.
    assert await allocate(book, "c", NET4, GW4) == ip("10.100.0.2")


async def test_static_address_in_use_is_resource_exhausted(book: AddressBook) -> None:
    await allocate(book, "a", NET4, GW4, ip("10.100.7.7"))
    with pytest.raises(ResourceExhausted, match="in use"):
        await allocate(book, "b", NET4, GW4, ip("10.100.7.7"))
    assert await book.for_vm("b") == []


@pytest.mark.parametrize("bad", ["10.101.0.5", "10.100.0.0", "10.100.0.1", "10.100.255.255"])
async def test_static_address_outside_or_reserved_is_invalid(book: AddressBook, bad: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        await allocate(book, "a", NET4, GW4, ip(bad), "config.network[0].ipv4_config.address")
    assert info.value.field == "config.network[0].ipv4_config.address"
    assert await book.all() == []


async def test_a_full_subnet_is_resource_exhausted(book: AddressBook) -> None:
    got = [await allocate(book, f"vm{i}", TINY, TINY_GW) for i in range(5)]
    assert [str(a) for a in got] == [f"192.168.7.{n}" for n in (2, 3, 4, 5, 6)]
    with pytest.raises(ResourceExhausted, match="no free IPv4 address"):
        await allocate(book, "vm5", TINY, TINY_GW)
    with pytest.raises(ResourceExhausted):
        await allocate(book, "vm6", TINY, TINY_GW, ip("192.168.7.4"))
    await book.release("vm2")
    assert await allocate(book, "vm5", TINY, TINY_GW) == ip("192.168.7.4")


async def test_concurrent_allocations_never_share_an_address(book: AddressBook) -> None:
    got = await asyncio.gather(*(allocate(book, f"vm{i}", NET4, GW4) for i in range(20)))
    assert len(set(got)) == 20
    assert len(await book.all()) == 20


async def test_the_book_claims_an_address_once(book: AddressBook) -> None:
    assert await book.claim("a", 4, "10.100.0.9")
    assert not await book.claim("b", 4, "10.100.0.9")
    assert not await book.claim("a", 4, "10.100.0.9")
    await book.release_address("b", "10.100.0.9")  # not b's: nothing happens
    assert [a.vm_id for a in await book.all()] == ["a"]
    await book.release_address("a", "10.100.0.9")
    assert await book.all() == []


async def test_allocations_persist_across_a_restart(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'metald.db'}"
    database = Database(url)
    await database.migrate()
    try:
        assert await allocate(SqlAddressBook(database), "a", NET4, GW4) == ip("10.100.0.2")
    finally:
        await database.close()
    database = Database(url)  # a restarted metald: a new engine, migrating again is harmless
    await database.migrate()
    again = SqlAddressBook(database)
    try:
        assert await allocate(again, "b", NET4, GW4) == ip("10.100.0.3")
        assert [(a.vm_id, a.address) for a in await again.for_vm("a")] == [("a", "10.100.0.2")]
    finally:
        await database.close()
