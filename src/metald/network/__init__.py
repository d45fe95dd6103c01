"""Per-VM networking on netlink (pyroute2): namespaces, veth pairs, bridges, TAPs, addresses,
tenant isolation and rate limits.

Layout (three kinds of network namespace)::

    host namespace (metald's own; a test-made one in tests)
      br-vms            the host bridge: gateway 10.100.0.1/16 and fd00::1/64
        ub-<c12>        one uplink port per customer: ISOLATED, no learning, no flooding
      static FDB        each VM's MAC -> its customer's uplink port
      neighbours        each VM's IPv4/IPv6 -> its MAC, permanent (the host never ARPs/NDs)
      rules             iif lo to <subnet> -> main;  from <subnet> to <subnet> -> prohibit

    segments namespace ("metald-segments"): no addresses, no routes, nothing routed
      bc-<c12>          one bridge per customer (its tenants' L2 segment)
        uc-<c12>        peer of ub-<c12>
        vh-<v12>        host end of each of the customer's VMs' veth pairs

    VM namespace ("mvm-<vm_id>"), one per VM; the VMM runs in it
      vb-<v12>          a small bridge joining
        vg-<v12>        the VM end of the veth pair
        tap<v12>        the TAP the VMM opens (owned by the jail user)

``<v12>``/``<c12>`` are 12 hex characters of SHA-256 of the VM/customer id, so every name
fits Linux's 15 characters; a link's alias (``metald-vm:<id> mac=<mac>``,
``metald-customer:<id>``) records its owner, so a hash collision is detected, never shared.

Tenant isolation, and why it holds:
- One customer's VMs share a bridge (bc-) and reach each other directly at L2.
- A customer's segment reaches the host only through its uplink, whose host-bridge port has
  the bridge-port ``isolated`` flag (IFLA_BRPORT_ISOLATED): isolated ports never forward to
  one another, only to non-isolated ports — here only the bridge device itself, the host.
  So no frame from customer A's segment is ever forwarded into customer B's.
- The uplink ports also learn nothing and are never flooded to: the host bridge sends a
  frame to a customer only for a MAC in a static FDB entry pointing at that customer's
  uplink, and the host resolves guest addresses through permanent neighbour entries (it
  never broadcasts ARP or multicasts ND at guests). A guest cannot steal another's MAC in the
  host bridge (no learning), and host traffic to a VM that was deleted or never learnt is
  not flooded to other tenants.
- The customer bridges live in their own namespace, not the host's. On the host, a bridge
  without addresses still answers ARP for the host's addresses (Linux's weak host model:
  measured, the gateway address was answered with the customer bridge's MAC), which would
  give guests a second, unintended way into the host's IP stack. In the segments namespace
  there is no address to answer for and nothing routes.
- At L3 the host does not route between guests: metald never enables forwarding (a new
  namespace has it off), and in case an operator turns it on, a policy rule prohibits any
  route from a guest subnet address to a guest subnet address, whatever the ingress
  interface (the host's own traffic to guests is sent by an earlier ``iif lo`` rule).
  Guests of different customers share the subnet, so a guest that ARPs for another
  customer's address gets no answer, and one that sends via the gateway gets
  "administratively prohibited".
- What a guest may send is filtered on its own port (filters.py, nftables through
  libnftables): in the VM's namespace, a ``bridge`` table drops every frame from the TAP
  side whose source MAC is not the VM's, IPv4 not from its address, IPv6 not from its
  address or link-local, ARP/ND claiming another address or MAC, VLAN-tagged frames and
  other ether types, router advertisements and redirects, and DHCP/DHCPv6 server replies.
  So a guest cannot impersonate another (the permanent neighbours already kept replies
  from going to a spoofer; now the spoofed packet itself never leaves the VM's namespace).
- The host's own services: an ``inet`` table in the host namespace accepts from the host
  bridge only what the host asked for (conntrack established/related), neighbour discovery,
  ICMP errors, and the operator's allow list (UNKEY_METALD_NETWORK_HOST_ALLOW, default
  ``icmp``: pings to the gateway); the rest is refused (TCP reset, ICMP prohibited). The
  bridge's ``accept_ra`` is 0. Forwarding is not filtered here.
- Not covered: anything to outside networks (no NAT is set up; that is a separate decision).

Rate limits are token-bucket filters (tc tbf) on the veth pair: toward the guest on the host
end (vh-, in the segments namespace), from the guest on the VM end (vg-, in the VM
namespace). The veth is the guest's only path, so this is the same as shaping the TAP, but it
is set up with the rest of the network and survives the VMM re-creating its TAP (a reboot
under Firecracker, a boot after shutdown).

The TAP: the jailer, once inside the VM's namespace, makes it persistent and owned by the
jail user (``links.create_tap_here``) and joins it to the VM bridge (``links.attach_tap_here``);
the unprivileged VMM then opens it by name. ``NetworkManager.create_tap`` does the same from
outside, for VMMs started without the jailer. The TAP dies with the VM's namespace.

Addresses come from the configured subnets (lowest free; network, broadcast and gateway
excluded) and are recorded in the ``ip_allocations`` table before anything is built; a static
address is honoured if it is inside the subnet and free. The MAC is the caller's or derived
from the VM id (locally administered, stable across restarts). The guest learns everything
from its kernel command line (``VmNetwork.guest_args()``).

Failure: every set-up step registers its undo (metald.core.undo); a failure (or a
cancellation) at any step undoes it all and releases the new addresses. Teardown is
idempotent, and ``remove_orphans`` removes what no known VM owns (after a crash).

Restart: names under /run/netns are mounted where they outlive metald even when it runs in
a mount namespace of its own (metald.host.named_netns); a name lost anyway is stale, never
taken for a namespace, and at start-up each known VM's network is adopted
(``NetworkManager.adopt_vm``): its namespace taken back from its live VMM, or made anew,
and whatever is missing rebuilt with the same addresses and MAC.

Modules: manager.py (the thin NetworkManager), hostside.py, segments.py, vms.py,
reconcile.py (one concern each), models.py (requests, settings, VmNetwork), naming.py,
addressing.py, links.py (netlink), filters.py (what guests may send and reach) over
nft.py (libnftables), port.py (the service's port).

Every netlink request runs in a worker thread; a thread enters a namespace with setns(2) for
the moment it opens a socket (metald.host.named_netns), and never forks.
"""

from metald.network.manager import NetworkError, NetworkManager
from metald.network.models import (
    NetworkMode,
    NetworkRequest,
    NetworkSettings,
    RateLimit,
    VmNetwork,
)

__all__ = [
    "NetworkError",
    "NetworkManager",
    "NetworkMode",
    "NetworkRequest",
    "NetworkSettings",
    "RateLimit",
    "VmNetwork",
]
