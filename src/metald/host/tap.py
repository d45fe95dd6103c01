"""Creating a TAP device: the ioctls `ip tuntap add` (and pyroute2) issue, without either.

The jailer creates each VMM's TAP inside the VM's network namespace, owned by the VMM's user,
so the unprivileged VMM can open it by name and nothing else can. It is persistent (it
outlives the descriptor that made it); metald removes it when the VMM has gone.
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct

# linux/if_tun.h, linux/sockios.h, net/if.h
TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
TUNSETOWNER = 0x400454CC
TUNSETGROUP = 0x400454CE
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_UP = 0x1
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
_IFREQ_SIZE = 40


class TapError(OSError):
    """A TAP step failed; `stage` says which ("create", "owner", "up") and whether the
    device exists (it does from "owner" on)."""

    def __init__(self, stage: str, errno_: int, message: str) -> None:
        super().__init__(errno_, message)
        self.stage = stage


def _ifreq(name: bytes, flags: int) -> bytes:
    return struct.pack("16sH", name, flags).ljust(_IFREQ_SIZE, b"\0")


def device_exists(name: str) -> bool:
    try:
        socket.if_nametoindex(name)
    except OSError:
        return False
    return True


def create_tap(name: str, uid: int, gid: int, *, up: bool = True) -> None:
    """A persistent TAP named `name` in the calling thread's network namespace, owned by
    uid/gid, brought up when `up`. Raises TapError: stage "create" (nothing was made), else
    the device exists and the caller removes it."""
    ifname = name.encode()
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise TapError("create", e.errno or 0, f"cannot open /dev/net/tun: {e.strerror}") from None
    try:
        try:
            fcntl.ioctl(fd, TUNSETIFF, _ifreq(ifname, IFF_TAP | IFF_NO_PI))
            fcntl.ioctl(fd, TUNSETPERSIST, 1)
        except OSError as e:
            raise TapError(
                "create", e.errno or 0, f"cannot create TAP {name}: {e.strerror}"
            ) from None
        try:
            fcntl.ioctl(fd, TUNSETOWNER, uid)
            fcntl.ioctl(fd, TUNSETGROUP, gid)
        except OSError as e:
            raise TapError(
                "owner", e.errno or 0, f"cannot give TAP {name} to uid {uid}: {e.strerror}"
            ) from None
    finally:
        os.close(fd)
    if not up:
        return
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            flags = struct.unpack_from("16sH", fcntl.ioctl(s, SIOCGIFFLAGS, _ifreq(ifname, 0)))[1]
            fcntl.ioctl(s, SIOCSIFFLAGS, _ifreq(ifname, flags | IFF_UP))
        except OSError as e:
            raise TapError(
                "up", e.errno or 0, f"cannot bring TAP {name} up: {e.strerror}"
            ) from None


def bring_up(name: str) -> None:
    """Set a network device up in the calling thread's namespace (loopback of a new one)."""
    ifname = name.encode()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        flags = struct.unpack_from("16sH", fcntl.ioctl(s, SIOCGIFFLAGS, _ifreq(ifname, 0)))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, _ifreq(ifname, flags | IFF_UP))
