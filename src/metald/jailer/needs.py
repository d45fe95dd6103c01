"""The capabilities the jailer helper uses, and why: what "root" means for it.

The helper is started by metald and inherits its capabilities. metald may be root, or its
own user holding these as ambient capabilities (contrib/systemd/metald.service, whose list
is this one plus what metald itself needs). The checks at start-up ask for these names, so a
unit that lacks one fails with the name instead of half-way through a VM's jail.

Standard library only (the helper imports it).
"""

from __future__ import annotations

JAILER_CAPABILITIES: dict[str, str] = {
    "CAP_SYS_ADMIN": "new namespaces (mount, network, pid), mounts, pivot_root, setns",
    "CAP_SYS_CHROOT": "chroot into the jail after pivot_root",
    "CAP_SETUID": "become the VM's own uid",
    "CAP_SETGID": "become the VM's own gid, drop supplementary groups",
    "CAP_SETPCAP": "empty the bounding set before the VMM runs",
    "CAP_CHOWN": "give the jail's /run, the TAP and the disk copies to the VM's uid",
    "CAP_DAC_OVERRIDE": "write the cgroup tree, /run/netns and the root-owned jail base",
    "CAP_FOWNER": "set modes on files that the VM's uid owns",
    "CAP_MKNOD": "the jail's /dev nodes (kvm, net/tun, urandom)",
    "CAP_NET_ADMIN": "make the TAP inside the VM's network namespace",
}
