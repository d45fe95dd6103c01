"""Choosing a VM's addresses from the configured subnets, recorded in an AddressBook.

The lowest free address is taken (network address, IPv4 broadcast and the gateway are never
given out). A static address asked for is honoured if it is inside the subnet and free. Two
allocations racing for one address cannot both win: the book's claim is atomic (a unique key
in the database), and the loser moves on to the next address.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator

from metald.core.errors import InvalidArgument, ResourceExhausted
from metald.core.ports import AddressBook
from metald.network.models import IPv4, IPv6, reserved_addresses

Subnet = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = IPv4 | IPv6


def _candidates(subnet: Subnet, skip: set[Address]) -> Iterator[Address]:
    # hosts() would exclude the IPv6 subnet-router anycast already, but explicit is clearer;
    # iterate arithmetically so a /64 costs nothing.
    first = int(subnet.network_address)
    last = int(subnet.broadcast_address)
    for value in range(first, last + 1):
        addr = ipaddress.ip_address(value)
        if addr not in skip:
            yield addr


async def allocate(
    book: AddressBook,
    vm_id: str,
    subnet: Subnet,
    gateway: Address,
    requested: Address | None = None,
    field: str = "address",
) -> Address:
    """Claim an address of subnet for vm_id (requested if given) and return it.

    Raises InvalidArgument if requested is outside the subnet or reserved, ResourceExhausted
    if it is held by someone else or if the subnet has no free address. A VM that already
    holds an address of this family gets it back (set-up is idempotent).
    """
    family = subnet.version
    reserved = reserved_addresses(subnet, gateway)
    for held in await book.for_vm(vm_id):
        if held.family == family:
            address = ipaddress.ip_address(held.address)
            if requested is None or requested == address:
                return address
            raise InvalidArgument(field, f"the VM already holds {address}, not {requested}")

    if requested is not None:
        if requested.version != family or requested not in subnet:
            raise InvalidArgument(field, f"{requested} is outside the VM subnet {subnet}")
        if requested in reserved:
            raise InvalidArgument(field, f"{requested} is reserved (network, broadcast or gateway)")
        if not await book.claim(vm_id, family, str(requested)):
            raise ResourceExhausted(f"{field}: {requested} is in use by another VM")
        return requested

    used = {ipaddress.ip_address(a) for a in await book.used(family)}
    for candidate in _candidates(subnet, reserved | used):
        if await book.claim(vm_id, family, str(candidate)):
            return candidate
    raise ResourceExhausted(f"no free IPv{family} address in the VM subnet {subnet}")
