"""Running a command in the default guest over its agent port (``metald.agent=ttyS1``).

The guest's init reads shell command lines from that serial port and writes their output
back; the host side is a Unix socket QEMU listens on (see the guest contract in
guest-init.sh). Each command is followed by an ``echo <tag>=$?`` so the end of its output and
its exit status can be told apart from the output itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
from pathlib import Path


class GuestAgent:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    async def connect(cls, socket_path: Path, timeout: float = 60.0) -> GuestAgent:
        """Connect, and wait until the guest's shell answers (it starts late in the boot)."""
        reader, writer = await asyncio.open_unix_connection(str(socket_path))
        agent = cls(reader, writer)
        async with asyncio.timeout(timeout):
            while True:
                try:
                    await agent.run("true", timeout=2.0)
                    return agent
                except TimeoutError:
                    continue

    async def run(self, command: str, timeout: float = 60.0) -> tuple[int, str]:
        """One shell command line in the guest: (exit status, output)."""
        if "\n" in command:
            raise ValueError("one command line at a time")
        tag = "END" + secrets.token_hex(4)
        self._writer.write(f"{command}\necho {tag}=$?\n".encode())
        await self._writer.drain()
        pattern = re.compile(rf"{tag}=(\d+)\r?\n".encode())
        buffer = b""
        async with asyncio.timeout(timeout):
            while (match := pattern.search(buffer)) is None:
                chunk = await self._reader.read(65536)
                if not chunk:
                    raise EOFError("the guest agent closed the connection")
                buffer += chunk
        return int(match.group(1)), buffer[: match.start()].decode(errors="replace")

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()
