"""Metering end to end: `metald serve` with billing on, to a real `metald billing-sink`
(tests/integration/_billing_sink.py), a real guest.

- An outage: the sink stops for a while, then starts again. Every record metald stored
  arrives, each once in the sink's usage, in the order stored; the VM's notices frame them
  (started first, stopped last).
- kill -9 of metald while it meters (records stored, some not delivered): started again on
  the same data dir, nothing is lost, the counters carry on from where they were, and a
  possible-gap notice arrives for the VM.
- Network: a guest with a NIC receives N MiB over TCP from the daemon's host namespace; the
  sink's usage shows at least N MiB received (and about what the guest's own rx_bytes
  counted), as received, not sent.
- A full backlog (billing unreachable, a small bound) shows in /metrics (the backlog at its
  bound, the full counter growing) and as a loud log line.

What metald stored is read from its own database (vm_metrics: samples are pruned only a
day after delivery); what arrived, from the sink's.
"""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import sys
import tempfile
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from metald.assets.guest_agent import GuestAgent
from tests.integration._billing_sink import SinkProcess

from ._support import MIB, ApiConsole, Caller, Daemon, free_port, state_name, wait_until

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


# -- network: a guest that receives N MiB is billed at least N MiB received ---------------

NIC = {"id": "eth0", "mode": "NETWORK_MODE_IPV4_ONLY"}
RECEIVE_MIB = 8
# Sent from the daemon's host namespace (this test's own) to the guest's listener, over TCP:
# every byte arrives, so the guest has received at least this much when the sender is done.
SENDER = """
import socket, sys, time
address, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for _ in range(100):
    try:
        s = socket.create_connection((address, port), timeout=5)
        break
    except OSError:
        time.sleep(0.2)
else:
    raise SystemExit("no listener in the guest")
chunk = b"\\0" * 65536
for _ in range(size // len(chunk)):
    s.sendall(chunk)
s.shutdown(socket.SHUT_WR)
s.settimeout(60)
while s.recv(65536):  # until the guest's listener closes: all was read
    pass
"""


def billed_traffic(sink: SinkProcess, vm_id: str) -> tuple[int, int]:
    """The VM's latest cumulative (rx, tx) at the sink (0, 0 before any sample)."""
    store = sink.store()
    try:
        records = [r for r in store.samples() if r.vm_id == vm_id]
    finally:
        store.close()
    if not records:
        return 0, 0
    newest = max(records, key=lambda r: r.timestamp_ns)
    return newest.network_rx_bytes, newest.network_tx_bytes


def test_a_guest_receiving_n_mib_is_billed_at_least_n_mib_received(
    metald_factory: Callable[..., Daemon], callers: Callable[..., Caller], sink: SinkProcess
) -> None:
    daemon = metald_factory(
        UNKEY_METALD_BILLING_ENDPOINT=sink.url, UNKEY_METALD_GUEST_AGENT="true", **FAST
    )
    call = callers("curl-connect-json", daemon.url)
    vm_id = "meter-net"
    call.must("CreateVm", {"vm_id": vm_id, "config": {**SMALL, "network": [NIC]}})
    info = call.info(vm_id).body
    address = info["network_info"]["ip_address"]
    call.must("BootVm", {"vm_id": vm_id})
    console = ApiConsole(call, vm_id)
    wait_until(lambda: console.ready_count() >= 1, 90, "READY on the console")

    async def receive(agent: GuestAgent) -> int:
        """RECEIVE_MIB sent to a listener in the guest over TCP; what the listener read."""
        # busybox nc: one connection, its bytes counted by wc, then it closes
        rc, out = await agent.run("(nc -l -p 5001 | wc -c > /tmp/received 2>&1 &)")
        assert rc == 0, out
        sender = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", daemon.host_netns, sys.executable, "-c", SENDER,
            address, "5001", str(RECEIVE_MIB * MIB),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        try:
            out_bytes, _ = await asyncio.wait_for(sender.communicate(), 120)
        finally:
            if sender.returncode is None:
                sender.kill()
                await sender.wait()
        assert sender.returncode == 0, out_bytes.decode()
        for _ in range(20):  # wc writes once nc has closed
            rc, got = await agent.run("cat /tmp/received")
            if rc == 0 and got.strip():
                return int(got.strip())
            await asyncio.sleep(0.5)
        raise AssertionError("the guest's listener did not report")

    async def guest_rx_bytes(agent: GuestAgent) -> int:
        """The guest's own count of the bytes its NIC received since boot."""
        rc, out = await agent.run("cat /sys/class/net/eth0/statistics/rx_bytes")
        assert rc == 0, out
        return int(out.strip())

    async def scenario() -> tuple[int, int, tuple[int, int]]:
        agent = await GuestAgent.connect(Path(info["backend_info"]["agent_socket"]))
        try:
            payload = await receive(agent)
            wait = RECEIVE_MIB * MIB
            # the collector reads the network's counters every second; the sink has them soon
            for _ in range(60):
                billed = billed_traffic(sink, vm_id)
                if billed[0] - rx0 >= wait:
                    break
                await asyncio.sleep(0.5)
            await asyncio.sleep(1.0)  # the guest's own counters settle (read after, lag)
            return payload, await guest_rx_bytes(agent), billed_traffic(sink, vm_id)
        finally:
            await agent.close()

    try:
        wait_until(lambda: billed_traffic(sink, vm_id) != (0, 0), 60, "a first billed sample")
        rx0, tx0 = billed_traffic(sink, vm_id)
        payload, guest_rx, (rx1, tx1) = asyncio.run(scenario())
        print(
            f"\nguest read {payload / MIB:.2f} MiB; billed {(rx1 - rx0) / MIB:.3f} MiB "
            f"received and {(tx1 - tx0) / MIB:.3f} MiB sent over the span; billed {rx1} bytes "
            f"received in all, the guest's rx_bytes {guest_rx} (ratio {rx1 / guest_rx:.4f})"
        )
        assert payload == RECEIVE_MIB * MIB  # the guest received N MiB (TCP: all of it)
        assert rx1 - rx0 >= payload  # billed at least that many bytes received
        # the same frames, counted on the host's side of the guest's link: within a little
        # of what the guest's NIC counted since boot
        assert 0.97 * guest_rx <= rx1 <= 1.03 * guest_rx
        assert tx1 - tx0 < (rx1 - rx0) / 4  # and counted as received, not as sent
    finally:
        call.must("DeleteVm", {"vm_id": vm_id, "force": True})


# -- a full backlog: loud in the metrics and the log --------------------------------------


def scrape(daemon: Daemon) -> dict[str, float]:
    """The daemon's Prometheus listener, read with prometheus_client's own parser."""
    with urllib.request.urlopen(daemon.metrics_url, timeout=10) as answer:
        text = answer.read().decode()
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if not sample.labels
    }


def test_a_full_backlog_shows_in_the_metrics_and_the_log(
    metald_factory: Callable[..., Daemon], callers: Callable[..., Caller]
) -> None:
    limit = 10
    daemon = metald_factory(
        UNKEY_METALD_BILLING_ENDPOINT=f"http://127.0.0.1:{free_port()}",  # nobody listens
        UNKEY_METALD_BILLING_BACKLOG_MAX=str(limit),
        **FAST,
    )
    call = callers("curl-connect-json", daemon.url)
    boot(call, "meter-full")
    try:
        wait_until(
            lambda: scrape(daemon).get("metald_billing_backlog_full_total", 0) > 0,
            60,
            "the backlog to fill",
        )
        metrics = scrape(daemon)
        assert metrics["metald_billing_backlog_limit_records"] == limit
        # at its bound it stays there: each new record replaces the VM's newest undelivered
        assert metrics["metald_billing_backlog_records"] == limit
        assert undelivered(daemon) == limit
        assert metrics["metald_billing_send_failures_total"] > 0
        assert "METERING BACKLOG FULL" in daemon.log_tail(100_000)
    finally:
        call.must("DeleteVm", {"vm_id": "meter-full", "force": True})
