"""Names of everything the network manager creates, derived from VM and customer ids.

Pure functions. Linux interface names are at most 15 characters (IFNAMSIZ 16 with the NUL);
ours are a 3-character kind prefix and 12 hex characters of a SHA-256 of the id (48 bits), so
two ids colliding is negligible, and a collision is still detected: every link we create
carries an alias (``IFLA_IFALIAS``) naming its owner, and an existing link with another
owner's alias is never reused.

Network namespace names are file names under /run/netns and have no such limit: they are
``<prefix><vm_id>`` (default prefix ``mvm-``), readable and collision-free.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from metald.core.validation import normalise_mac as normalise_mac  # re-exported (one rule)

IFNAMSIZ = 15
HASH_CHARS = 12

# Kind prefixes (3 characters each, so that names are exactly 15 characters).
HOST_VETH = "vh-"  # host end of a VM's veth pair, a port of its customer's bridge
VM_VETH = "vg-"  # the other end, inside the VM's namespace
VM_BRIDGE = "vb-"  # the bridge inside the VM's namespace joining the veth and the TAP
TAP = "tap"  # the TAP inside the VM's namespace (the VMM opens it)
CUSTOMER_BRIDGE = "bc-"  # one per customer in the host namespace
UPLINK_HOST = "ub-"  # uplink veth end on the host bridge (an isolated port)
UPLINK_CUSTOMER = "uc-"  # uplink veth end on the customer's bridge

DEFAULT_NETNS_PREFIX = "mvm-"

_HASH_NAME = re.compile(r"(vh-|vg-|vb-|tap|bc-|ub-|uc-)[0-9a-f]{12}")
_NETNS_PREFIX = re.compile(r"[A-Za-z0-9_.-]{1,32}")
VM_ALIAS = "metald-vm:"
CUSTOMER_ALIAS = "metald-customer:"


def short_hash(kind: str, ident: str) -> str:
    """12 hex characters of SHA-256 over the kind and the id."""
    return hashlib.sha256(f"{kind}\0{ident}".encode()).hexdigest()[:HASH_CHARS]


def is_our_link_name(name: str) -> bool:
    return _HASH_NAME.fullmatch(name) is not None


def check_netns_prefix(prefix: str) -> str:
    if not _NETNS_PREFIX.fullmatch(prefix):
        raise ValueError("netns prefix must be 1-32 characters of A-Z, a-z, 0-9, _ . -")
    return prefix


@dataclass(frozen=True)
class VmNames:
    """The names of one VM's namespace and links."""

    vm_id: str
    netns: str
    host_veth: str
    vm_veth: str
    vm_bridge: str
    tap: str

    @property
    def alias(self) -> str:
        return VM_ALIAS + self.vm_id

    @classmethod
    def for_vm(cls, vm_id: str, netns_prefix: str = DEFAULT_NETNS_PREFIX) -> VmNames:
        h = short_hash("vm", vm_id)
        return cls(
            vm_id=vm_id,
            netns=netns_prefix + vm_id,
            host_veth=HOST_VETH + h,
            vm_veth=VM_VETH + h,
            vm_bridge=VM_BRIDGE + h,
            tap=TAP + h,
        )


@dataclass(frozen=True)
class CustomerNames:
    """The names of one customer's segment in the host namespace."""

    customer_id: str
    bridge: str
    uplink_host: str
    uplink_customer: str

    @property
    def alias(self) -> str:
        return CUSTOMER_ALIAS + self.customer_id

    @classmethod
    def for_customer(cls, customer_id: str) -> CustomerNames:
        h = short_hash("customer", customer_id)
        return cls(
            customer_id=customer_id,
            bridge=CUSTOMER_BRIDGE + h,
            uplink_host=UPLINK_HOST + h,
            uplink_customer=UPLINK_CUSTOMER + h,
        )


def vm_id_from_netns(name: str, netns_prefix: str) -> str | None:
    """The VM id a namespace name belongs to, or None if it is not one of ours."""
    if not name.startswith(netns_prefix) or len(name) == len(netns_prefix):
        return None
    return name[len(netns_prefix) :]


def generated_mac(vm_id: str) -> str:
    """A locally administered unicast MAC derived from the VM id (stable across restarts).

    The first octet has the locally-administered bit (0x02) set and the multicast bit
    (0x01) clear; the other 46 bits come from SHA-256 of the id.
    """
    raw = bytearray(hashlib.sha256(f"mac\0{vm_id}".encode()).digest()[:6])
    raw[0] = (raw[0] & 0xFC) | 0x02
    return ":".join(f"{b:02x}" for b in raw)


def vm_alias(vm_id: str, mac: str) -> str:
    """The alias of a VM's host-side veth end: its owner and its MAC (read back after a
    restart)."""
    return f"{VM_ALIAS}{vm_id} mac={mac}"


def parse_vm_alias(alias: str) -> tuple[str, str] | None:
    """(vm_id, mac) from a vm_alias(), None for any other alias."""
    if not alias.startswith(VM_ALIAS):
        return None
    rest = alias[len(VM_ALIAS) :]
    vm_id, _, mac = rest.partition(" mac=")
    return vm_id, mac
