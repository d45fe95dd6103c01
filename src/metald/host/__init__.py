"""The stdlib-only floor: one copy of each low-level host mechanism metald needs.

process    process identity (pid + start time), pidfd watching, reaping and killing, spawn
libc       the Linux calls Python's os module lacks (setns, unshare, mount, pivot_root, ...)
netns      entering a network namespace from the calling thread
named_netns  names under /run/netns that outlive metald, whatever mount namespace it is in
mounts     the mount table (mountinfo) and its propagation
tap        creating a TAP device in the calling thread's network namespace
sockets    connecting to a socket a VMM owns without following what it may have planted
files      atomic file writes
cpu        the host CPU facts a guest needs (the TSC rate under TCG)
kvm        whether KVM really runs a guest here (a tiny firmware through the KVM API)

Everything here imports only the standard library and nothing else of metald, so the jailer
helper (which must start fast and trust nothing outside the standard library) and every
adapter can share it.
"""
