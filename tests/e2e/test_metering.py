"""Metering end to end: `metald serve` with billing on, to a real `metald billing-sink`
(tests/integration/_billing_sink.py), a real guest.

- An outage: the sink stops for a while, then starts again. Every record metald stored
  arrives, each once in the sink's usage, in the order stored; the VM's notices frame them
  (started first, stopped last).
- kill -9 of metald while it meters (records stored, some not delivered): started again on
  the same data dir, nothing is lost, the counters carry on from where they were, and a
  possible-gap notice arrives for the VM.

What metald stored is read from its own database (vm_metrics: samples are pruned only a
day after delivery); what arrived, from the sink's.
"""

from __future__ import annotations

import shutil
import sqlite3
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration._billing_sink import SinkProcess

from ._support import MIB, Caller, Daemon, state_name, wait_until

pytestmark = pytest.mark.guest

SMALL = {"memory": {"size_bytes": 128 * MIB}}
FAST = {
    "UNKEY_METALD_BILLING_ENABLED": "true",
    "UNKEY_METALD_BILLING_FLUSH_INTERVAL_MS": "200",
    "UNKEY_METALD_BILLING_RETRY_INITIAL_MS": "100",
    "UNKEY_METALD_BILLING_RETRY_MAX_MS": "500",
    "UNKEY_METALD_BILLING_TIMEOUT_SECONDS": "2",
}


@pytest.fixture
def sink(e2e_root: Path) -> Iterator[SinkProcess]:
    workdir = Path(tempfile.mkdtemp(prefix="s", dir=e2e_root))
    process = SinkProcess(workdir)
    process.start()
    try:
        yield process
    finally:
        process.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def stored(daemon: Daemon, vm_id: str) -> list[tuple[int, int | None]]:
    """metald's samples of the VM: (timestamp, delivered_at or None), in the order stored."""
    con = sqlite3.connect(f"file:{daemon.db_path}?mode=ro", uri=True, timeout=10)
    try:
        return list(
            con.execute(
                "SELECT timestamp_ns, delivered_at FROM vm_metrics "
                "WHERE vm_id = ? AND kind = 'sample' ORDER BY seq",
                (vm_id,),
            )
        )
    finally:
        con.close()


def undelivered(daemon: Daemon) -> int:
    con = sqlite3.connect(f"file:{daemon.db_path}?mode=ro", uri=True, timeout=10)
    try:
        (count,) = con.execute(
            "SELECT count(*) FROM vm_metrics WHERE delivered_at IS NULL"
        ).fetchone()
        return int(count)
    finally:
        con.close()


def arrived(sink: SinkProcess, vm_id: str) -> list[tuple[int, int]]:
    """The sink's samples of the VM: (timestamp, cpu), in the order they arrived."""
    con = sqlite3.connect(f"file:{sink.db}?mode=ro", uri=True, timeout=10)
    try:
        return list(
            con.execute(
                "SELECT timestamp_ns, cpu_time_ns FROM samples WHERE vm_id = ? "
                "ORDER BY received_ns, timestamp_ns",
                (vm_id,),
            )
        )
    finally:
        con.close()


def kinds(sink: SinkProcess, vm_id: str) -> list[str]:
    store = sink.store()
    try:
        return [n.kind for n in store.notices(vm_id=vm_id)]
    finally:
        store.close()


def boot(call: Caller, vm_id: str) -> None:
    call.must("CreateVm", {"vm_id": vm_id, "config": SMALL})
    assert state_name(call.must("BootVm", {"vm_id": vm_id}).body["state"]) == "RUNNING"


def check_all_arrived_once_in_order(daemon: Daemon, sink: SinkProcess, vm_id: str) -> None:
    mine = stored(daemon, vm_id)
    assert mine and all(delivered is not None for _, delivered in mine)
    theirs = arrived(sink, vm_id)
    # the sink keeps one of each (vm, timestamp): the same set means all arrived, none extra
    assert sorted(t for t, _ in theirs) == [t for t, _ in mine]
    # and in order: each arrived after the one before it
    assert [t for t, _ in theirs] == sorted(t for t, _ in theirs)
    cpu = [c for _, c in theirs]
    assert cpu == sorted(cpu) and cpu[-1] > 0


def test_an_outage_loses_nothing_and_everything_arrives_in_order_once(
    metald_factory: Callable[..., Daemon], callers: Callable[..., Caller], sink: SinkProcess
) -> None:
    daemon = metald_factory(UNKEY_METALD_BILLING_ENDPOINT=sink.url, **FAST)
    call = callers("curl-connect-json", daemon.url)
    boot(call, "meter-out")
    wait_until(lambda: len(arrived(sink, "meter-out")) >= 5, 60, "records at the sink")
    sink.stop()
    before = len(stored(daemon, "meter-out"))
    wait_until(
        lambda: len(stored(daemon, "meter-out")) >= before + 20 and undelivered(daemon) >= 20,
        60,
        "records to pile up in metald's database while the sink is down",
    )
    sink.start()
    call.must("ShutdownVm", {"vm_id": "meter-out", "force": True})
    wait_until(lambda: undelivered(daemon) == 0, 60, "the backlog to drain")
    check_all_arrived_once_in_order(daemon, sink, "meter-out")
    notices = kinds(sink, "meter-out")
    assert notices[0] == "started" and notices[-1] == "stopped", notices
    call.must("DeleteVm", {"vm_id": "meter-out"})


def test_kill9_of_metald_loses_nothing_and_reports_a_possible_gap(
    metald_factory: Callable[..., Daemon], callers: Callable[..., Caller], sink: SinkProcess
) -> None:
    daemon = metald_factory(UNKEY_METALD_BILLING_ENDPOINT=sink.url, **FAST)
    call = callers("curl-connect-json", daemon.url)
    boot(call, "meter-k9")
    wait_until(lambda: len(arrived(sink, "meter-k9")) >= 5, 60, "records at the sink")
    daemon.kill9()
    cpu_before = max(c for _, c in arrived(sink, "meter-k9"))
    daemon.start_again()
    call = callers("curl-connect-json", daemon.url)
    wait_until(lambda: "gap" in kinds(sink, "meter-k9"), 60, "a possible-gap notice")
    wait_until(
        lambda: max(c for _, c in arrived(sink, "meter-k9")) > cpu_before,
        60,
        "the counters to carry on after the restart",
    )
    call.must("ShutdownVm", {"vm_id": "meter-k9", "force": True})
    wait_until(lambda: undelivered(daemon) == 0, 60, "the backlog to drain")
    check_all_arrived_once_in_order(daemon, sink, "meter-k9")
    notices = kinds(sink, "meter-k9")
    assert notices[0] == "started" and notices[-1] == "stopped", notices
    call.must("DeleteVm", {"vm_id": "meter-k9"})
