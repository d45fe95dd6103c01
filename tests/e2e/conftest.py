"""Fixtures for the end-to-end suite: metald as a separate process, driven by clients nobody
here wrote (curl, grpcio, `buf curl`), with leak checks after every test and for the session.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import ssl
import subprocess
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ._support import (
    ASSETS,
    BUF,
    METALD,
    PROTO,
    TMP_PREFIX,
    Caller,
    CurlConnect,
    Daemon,
    make_caller,
    pid_alive,
    qemu_processes,
    reap,
    reap_zombie_children,
    wait_pid_gone,
)

PR_SET_CHILD_SUBREAPER = 36


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "e2e: runs metald as a process (tests/e2e)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.e2e)


def _become_subreaper() -> None:
    """A daemon killed with SIGKILL leaves its VMMs running (by design: they are adopted at
    the next start). PID 1 of these machines does not reap orphans, so become their reaper:
    then a VMM that exits later is collected here instead of staying a zombie."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        warnings.warn(
            f"prctl(PR_SET_CHILD_SUBREAPER) failed: errno {ctypes.get_errno()}", stacklevel=1
        )


def _missing_prerequisites() -> list[str]:
    missing = []
    if not METALD.exists():
        missing.append(f"{METALD} (make venv)")
    if not BUF.exists():
        missing.append(f"{BUF} (make buf, i.e. npm install)")
    if not PROTO.exists():
        missing.append(str(PROTO))
    if not (ASSETS / "default.json").exists():
        missing.append(f"the default guest in {ASSETS} (make guest)")
    if shutil.which("curl") is None:
        missing.append("curl (make system-deps)")
    if shutil.which("qemu-system-x86_64") is None:
        missing.append("qemu-system-x86_64 (make system-deps)")
    return missing


@pytest.fixture(scope="session", autouse=True)
def e2e_root() -> Iterator[Path]:
    """Prerequisites, a temp dir for everything this session makes, and the session-wide
    leak check: at the end no QEMU process that was not there at the start and that one of
    our daemons started remains, and nothing is left in our temp dir."""
    missing = _missing_prerequisites()
    if missing:
        # `make test` prepares all of these; running the suite without them is a set-up error,
        # not a reason to pass quietly.
        pytest.fail("e2e prerequisites missing:\n  " + "\n  ".join(missing), pytrace=False)
    _become_subreaper()
    before = set(qemu_processes(include_zombies=True))
    # Short: per-VM socket paths are made below it (a Unix socket path has 107 bytes).
    root = Path(tempfile.mkdtemp(prefix=TMP_PREFIX))
    yield root
    reap_zombie_children()
    problems = []
    foreign = []
    for pid, line in qemu_processes().items():
        if pid in before:
            continue
        if f"{root}/" in line:
            # Ours: started by a daemon of this session (its command line names our dir;
            # other sessions on this machine, even of this same suite, use other dirs).
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            reap(pid)
            problems.append(f"QEMU process left running: pid {pid}: {line[:200]}")
        else:
            foreign.append(pid)
    if foreign:
        # Not started by this session: someone else's test run. Reported, never killed.
        warnings.warn(
            f"QEMU processes appeared during the e2e session that are not ours: {foreign}",
            stacklevel=1,
        )
    problems += [f"temp dir left behind: {p}" for p in sorted(root.iterdir())]
    shutil.rmtree(root, ignore_errors=True)
    if problems:
        pytest.fail("e2e session leaks:\n" + "\n".join(problems), pytrace=False)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.when == "call":
        # An expected failure (xfail) stopped the test half-way just the same.
        item.stash[_CALL_FAILED] = report.failed or hasattr(report, "wasxfail")
    return report


_CALL_FAILED = pytest.StashKey[bool]()


def _delete_leftovers(daemon: Daemon) -> None:
    """After a failed test: delete (force) its remaining VMs through the API, as their owners,
    so the leak check below reports what metald could not clean up, not the test's
    unfinished business."""
    if not daemon.running or daemon.env.get("UNKEY_METALD_AUTH_DEV_TOKENS") != "true":
        return
    for vm_id, row in daemon.db_rows().items():
        if row["deleted_at"] is None:
            caller = CurlConnect(daemon.url, f"dev_customer_{row['customer_id']}")
            with contextlib.suppress(Exception):
                caller("DeleteVm", {"vm_id": vm_id, "force": True}, timeout=60)


def _check_and_clean(daemon: Daemon) -> list[str]:
    """Stop the daemon (SIGTERM by pid); then no QEMU it started may be alive."""
    problems = []
    if daemon.running:
        try:
            code = daemon.stop()
            if code != 0:
                problems.append(f"{daemon.name} exited with {code} after SIGTERM")
        except AssertionError as exc:
            problems.append(str(exc))
    leaked: dict[int, str] = {}
    for vm_id, (pid, start_time) in daemon.recorded_processes().items():
        if pid_alive(pid, start_time):
            leaked[pid] = f"vm {vm_id} (from its process.json)"
    for pid, line in qemu_processes(str(daemon.workdir)).items():
        leaked.setdefault(pid, line[:200])
    for pid in leaked:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for pid in leaked:
        with contextlib.suppress(AssertionError):
            wait_pid_gone(pid, timeout=10)
    problems += [
        f"QEMU left alive after the test: pid {pid}: {what}" for pid, what in leaked.items()
    ]
    reap_zombie_children()
    problems += daemon.remove_namespaces()
    return problems


@pytest.fixture
def metald_factory(
    request: pytest.FixtureRequest, e2e_root: Path
) -> Iterator[Callable[..., Daemon]]:
    """start(name, command_prefix, **env) -> a running Daemon with its own temp dir, free
    port and data dir (started under command_prefix, if given).

    Teardown: SIGTERM each daemon by pid; any QEMU still alive that it started is killed (by
    pid) and the test FAILS as a leak; the temp dir is removed. The daemon's log is printed
    (pytest shows it when the test failed)."""
    daemons: list[Daemon] = []

    def start(
        name: str = "metald",
        command_prefix: tuple[str, ...] = (),
        client_tls: ssl.SSLContext | None = None,
        **env: str,
    ) -> Daemon:
        workdir = Path(tempfile.mkdtemp(prefix="d", dir=e2e_root))
        daemon = Daemon(
            workdir, env, name=name, command_prefix=command_prefix, client_tls=client_tls
        )
        daemons.append(daemon)
        daemon.start()
        return daemon

    yield start

    problems: list[str] = []
    for daemon in daemons:
        if request.node.stash.get(_CALL_FAILED, False):
            _delete_leftovers(daemon)
        problems += _check_and_clean(daemon)
        print(f"\n----- {daemon.name} log (port {daemon.port}) -----\n{daemon.log_tail(200)}")
        shutil.rmtree(daemon.workdir, ignore_errors=True)
    if problems:
        pytest.fail("after the test:\n" + "\n".join(problems), pytrace=False)


@pytest.fixture
def daemon(metald_factory: Callable[..., Daemon]) -> Daemon:
    return metald_factory()


@pytest.fixture
def callers() -> Iterator[Callable[..., Caller]]:
    """make(name, url, token) -> a caller, closed at teardown."""
    made: list[Caller] = []

    def make(name: str, url: str, token: str | None = "dev_customer_acme") -> Caller:
        c = make_caller(name, url, token)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


@pytest.fixture
def private_store(e2e_root: Path) -> Iterator[Path]:
    """A copy of the asset store with traps in it: symlinks that point out of the store. The
    shared store is never written to. Copied, not hard-linked: the store refuses a file with
    hard links it does not account for (a second store's names are such links)."""
    root = Path(tempfile.mkdtemp(prefix="store-", dir=e2e_root))
    store = root / "assets"
    store.mkdir()
    for name in ("blobs", "assets"):
        subprocess.run(
            ["cp", "-a", "--reflink=auto", str(ASSETS / name), str(store / name)], check=True
        )
    shutil.copy2(ASSETS / "default.json", store / "default.json")
    (store / "escape").symlink_to("/etc/shadow")
    (store / "etc-link").symlink_to("/etc")
    (store / "blobs" / "up").symlink_to("../../..")
    yield store
    shutil.rmtree(root, ignore_errors=True)
