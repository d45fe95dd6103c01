"""Session-wide leak check: every test's temp files live under one base directory; at the
end no QEMU process may mention it and no per-VM directory may remain in it."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# No per-example deadline: hypothesis' default (200 ms) fails an example that merely ran while
# the machine was busy (guests under TCG on 2 cores), which made unit tests flaky under load.
settings.register_profile("metald", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("metald")

_BASE = Path(tempfile.gettempdir()) / f"metald-test-{os.getpid()}"


def pytest_configure(config: pytest.Config) -> None:
    if not config.option.basetemp:
        # pytest empties its basetemp when a test first asks for tmp_path, so tempfile's
        # directory is a sibling inside our base, not a child of pytest's.
        config.option.basetemp = str(_BASE / "pytest")
        (_BASE / "tmp").mkdir(parents=True, exist_ok=True)
        tempfile.tempdir = str(_BASE / "tmp")


def _vmm_processes_under(base: Path) -> dict[int, str]:
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm = (entry / "comm").read_text().strip()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        try:
            stderr = os.readlink(entry / "fd" / "2")
        except OSError:
            stderr = ""
        # A jailed VMM names only in-jail paths; its stderr file is in its VM directory.
        under = f"{base}/" in cmdline or stderr.startswith(f"{base}/")
        if comm.startswith(("qemu-system", "firecracker")) and under:
            found[int(entry.name)] = cmdline[:200]
    return found


def _vm_dirs_under(base: Path) -> list[Path]:
    if not base.exists():
        return []
    return sorted({p.parent for p in base.rglob("process.json")})


@pytest.fixture(scope="session", autouse=True)
def no_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    base = (
        _BASE
        if Path(request.config.option.basetemp).parent == _BASE
        else Path(request.config.option.basetemp)
    )
    yield
    processes = _vmm_processes_under(base)
    for pid in processes:
        # Only processes whose command line names this session's temp dir: ours.
        os.kill(pid, signal.SIGKILL)
    vm_dirs = _vm_dirs_under(base)
    shutil.rmtree(base, ignore_errors=True)
    problems = [f"VMM process left running: pid {pid}: {cmd}" for pid, cmd in processes.items()]
    problems += [f"per-VM directory left behind: {d}" for d in vm_dirs]
    if problems:
        pytest.fail("leaks found after the test session:\n" + "\n".join(problems))


def _reap_orphaned_qemu_zombies() -> None:
    """The e2e suite makes this process a child subreaper, so a QEMU whose parent died (the
    Firecracker stand-in's guest, ended by PR_SET_PDEATHSIG when the stand-in is killed) is
    re-parented here and stays a zombie, which later tests' leftover checks then see. Reap
    exactly those: our children, exited, named qemu-system*."""
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        name = text[text.index("(") + 1 : text.rindex(")")]
        rest = text[text.rindex(")") + 2 :].split()
        if rest[0] == "Z" and int(rest[1]) == me and name.startswith("qemu-system"):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(int(entry.name), os.WNOHANG)


@pytest.fixture(autouse=True)
def reap_orphaned_qemu() -> Iterator[None]:
    yield
    _reap_orphaned_qemu_zombies()
