"""Connecting to a VMM's control socket, at launch and when adopting: safely, and within a
deadline.

The socket is opened without following symlinks and must be a socket owned by the VMM's user
(host/sockets.py); the driver connects through /proc/self/fd to that very inode, held open
(VmmProcess.socket_fd) until the connection is dropped. A VMM still creating its socket is
waited for: the file appears at bind(), connections are refused until listen(); it is
looked for again after 1, 2, 4, 8, then every 10 ms.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time

from metald.backends.vmm.context import VmmContext
from metald.backends.vmm.driver import LaunchContext
from metald.backends.vmm.process import StartFailed, VmmProcess
from metald.core import timing
from metald.host.sockets import UnsafeSocket, fd_path, open_socket_path

# Looking for the socket: 1 ms after the start, then twice as long each time up to 10 ms (a
# VMM listens some tens of ms after its exec; a fixed 10 ms added 5 ms to a create on
# average, 1 ms throughout would wake metald 1000 times a second per starting VM).
_FIRST_POLL = 0.001
_LAST_POLL = 0.01


async def connect_control(
    ctx: VmmContext, vm: VmmProcess, deadline: float, launch: LaunchContext | None
) -> None:
    """Set `vm.control` (and `vm.socket_fd`): StartFailed if the socket is not a genuine
    one, the VMM exits, or it is not ready by `deadline` (event-loop time); the driver's
    BackendError if the VMM does not answer. `launch` is None when adopting."""
    loop = asyncio.get_running_loop()
    waiting = time.perf_counter()
    pause = _FIRST_POLL
    while True:
        try:
            fd: int | None = open_socket_path(vm.control_socket, vm.owner_uid)
        except FileNotFoundError:
            fd = None
        except UnsafeSocket as e:
            raise StartFailed(f"cannot connect to its control socket: {e.strerror}") from None
        except OSError as e:
            raise StartFailed(f"cannot connect to its control socket: {e.strerror or e}") from None
        if fd is not None:
            if await _accepts(fd_path(fd), max(0.1, deadline - loop.time())):
                break
            os.close(fd)
        if vm.watch is None or vm.watch.exited:
            raise StartFailed(f"{ctx.name} exited while starting")
        if loop.time() > deadline:
            raise StartFailed(f"its control socket was not ready after {ctx.start_timeout:g} s")
        await asyncio.sleep(pause)
        pause = min(pause * 2, _LAST_POLL)
    timing.record("vmm_start", time.perf_counter() - waiting)
    vm.socket_fd = fd
    try:
        with timing.step("control"):
            vm.control = await ctx.driver.connect(
                vm.vm_id,
                fd_path(fd),
                host_run_dir=vm.host_run_dir,
                uid=vm.owner_uid,
                launch=launch,
                timeout=max(0.1, deadline - loop.time()),
            )
    except BaseException:
        # A VMM that died meanwhile had its exit handled during the await: that closed the
        # fd already (and set socket_fd None). Closing it again could close whatever fd
        # has taken the number since (a pidfd, the event loop's): seen as EBADF later on.
        if vm.socket_fd == fd:
            os.close(fd)
            vm.socket_fd = None
        raise


async def _accepts(path: str, timeout: float) -> bool:
    """Whether a Unix socket at `path` accepts a connection now (False while the VMM has
    bound it but not yet listens)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.setblocking(False)
    try:
        await asyncio.wait_for(loop.sock_connect(sock, path), timeout)
    except (FileNotFoundError, ConnectionRefusedError, TimeoutError):
        return False
    except OSError as e:
        raise StartFailed(f"cannot connect to its control socket: {e}") from e
    finally:
        sock.close()
    return True
