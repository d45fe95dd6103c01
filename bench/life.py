"""Benchmarks 2 and 3 of issue 8: a VM's start through metald against the same VMM started
bare (bench/bare.py: the very argv metald ran, without jail, daemon or RPC).

- create: CreateVm's latency (client side, through the API) against a bare QEMU start to its
  QMP greeting, and to its first answer (QEMU greets before its machine is set up, and
  answers once it is: CreateVm checks the VM is ready to boot, so it cannot answer earlier);
  metald's own time is the difference (target <= 20 ms without a NIC, <= 40 ms with one,
  quoted against both), and metald's timers (metald_create_step_seconds on /metrics, core/timing.py)
  say where it went, step by step. The customer keeps a VM with a NIC throughout, so its
  network segment exists (a customer's first VM with a NIC also builds that);
- ready: CreateVm + BootVm until the guest's `METALD-GUEST READY` console line (followed
  through GetVmConsole) against the bare command line without -S until the same line in its
  console file (target <= 1.05), without and with a NIC;
- parallel: N VMs created and booted at once until every one is READY against N bare
  launches at once (target within 1.2x; no NIC).

Each pair alternates metald and bare (which goes first alternates too) and repeats; the
tables show medians with their range. `--tiny`: one repetition of each create, one boot
without a NIC, nothing in parallel (seconds, for `make test`).

    .venv/bin/python -m bench.life [--repeats 5] [--parallel 20] [--tiny] [--out DIR]

This replaces bench/vm_lifecycle.py (which timed every verb of a VM's life without a floor).
"""

from __future__ import annotations

import argparse
import re
import secrets
import statistics
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from metald.client import MetaldClient

from .bare import BareCommand, BareNetns, BareVmm
from .daemon import TOKEN, BenchDaemon
from .harness import Report, Spread, arguments

READY = b"METALD-GUEST READY"
READY_TIMEOUT = 300.0
_SUM = re.compile(r'^metald_create_step_seconds_sum\{backend="[^"]*",step="([^"]+)"\} (\S+)$', re.M)


def step_sums(url: str) -> dict[str, float]:
    """Every create step's running sum (seconds) on metald's /metrics."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"{url}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {m.group(1): float(m.group(2)) for m in _SUM.finditer(text)}


def wait_for_ready(
    client: MetaldClient, vm_id: str, every: float = 0.02, timeout: float = READY_TIMEOUT
) -> None:
    """Follow the console through GetVmConsole until the READY line, a call every `every`
    seconds (each one is work for metald, on the cores the guests boot on)."""
    seen, offset = b"", 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        chunk = client.get_vm_console(vm_id, offset=offset, max_bytes=1024 * 1024)
        seen = (b"" if chunk.offset < offset else seen) + chunk.data
        offset = chunk.next_offset
        if READY in seen:
            return
        time.sleep(every)
    raise TimeoutError(f"{vm_id}: no READY line within {timeout} s")


@dataclass
class Life:
    daemon: BenchDaemon
    client: MetaldClient
    netns: BareNetns
    memory_mib: int

    def create(self, nic: bool) -> str:
        network = "dual-stack" if nic else None
        return self.client.create_vm(vcpus=1, memory_mib=self.memory_mib, network=network).vm_id

    def delete(self, vm_id: str) -> None:
        self.client.delete_vm(vm_id, force=True)

    def template(self, nic: bool) -> BareCommand:
        """The argv metald runs for such a VM (from a VM made for it, then deleted)."""
        vm_id = self.create(nic)
        try:
            command = BareCommand.of_vm(self.daemon.workdir / "data" / "vms" / vm_id)
        finally:
            self.delete(vm_id)
        if command.tap is not None:
            self.netns.make_tap(command.tap)
        return command

    # -- one measurement each --

    def metald_create(self, nic: bool) -> tuple[float, dict[str, float]]:
        before = step_sums(self.daemon.url)
        t0 = time.perf_counter()
        vm_id = self.create(nic)
        elapsed = time.perf_counter() - t0
        after = step_sums(self.daemon.url)
        self.delete(vm_id)
        return elapsed, {k: v - before.get(k, 0.0) for k, v in after.items()}

    def bare_start(self, command: BareCommand) -> tuple[float, float]:
        """(to the QMP greeting, to its first answer)."""
        bare = BareVmm(command, netns=self.netns.name)
        try:
            t0 = time.perf_counter()
            bare.start(start_vcpus=False)
            return bare.wait_for_control(t0)
        finally:
            bare.stop()

    def metald_ready(self, nic: bool) -> float:
        t0 = time.perf_counter()
        vm_id = self.create(nic)
        try:
            self.client.boot_vm(vm_id)
            wait_for_ready(self.client, vm_id)
            return time.perf_counter() - t0
        finally:
            self.delete(vm_id)

    def bare_ready(self, command: BareCommand) -> float:
        bare = BareVmm(command, netns=self.netns.name)
        try:
            t0 = time.perf_counter()
            bare.start(start_vcpus=True)
            _wait_all([bare])
            return time.perf_counter() - t0
        finally:
            bare.stop()

    def metald_parallel(self, count: int) -> float:
        made: list[str] = []

        def one(_: int) -> float:
            vm_id = self.create(False)
            made.append(vm_id)
            self.client.boot_vm(vm_id)
            # 50 calls a second in all, as for one VM: N pollers at 20 ms would be a load
            # of their own (the error is at most `every` on a total of tens of seconds).
            wait_for_ready(self.client, vm_id, every=0.02 * count)
            return time.perf_counter()

        t0 = time.perf_counter()
        try:
            with ThreadPoolExecutor(count) as pool:
                ends = list(pool.map(one, range(count)))
            return max(ends) - t0
        finally:
            with ThreadPoolExecutor(min(count, 8)) as pool:
                list(pool.map(self.delete, made))

    def bare_parallel(self, command: BareCommand, count: int) -> float:
        vmms = [BareVmm(command) for _ in range(count)]
        try:
            t0 = time.perf_counter()
            for bare in vmms:
                bare.start(start_vcpus=True)
            _wait_all(vmms)
            return time.perf_counter() - t0
        finally:
            for bare in vmms:
                bare.stop()


def _wait_all(vmms: list[BareVmm], timeout: float = READY_TIMEOUT) -> None:
    """Until every bare guest's console file has the READY line (read every 20 ms)."""
    deadline = time.monotonic() + timeout
    waiting = list(vmms)
    while waiting:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(waiting)} bare guest(s) not READY within {timeout} s")
        waiting = [b for b in waiting if not b.console_has(READY)]
        if waiting:
            time.sleep(0.02)


def alternate(
    repeats: int, metald: Callable[[], Any], bare: Callable[[], Any]
) -> tuple[list[Any], list[Any]]:
    """Pairs of runs, metald first in even pairs and bare first in odd ones."""
    ours: list[Any] = []
    floor: list[Any] = []
    for r in range(repeats):
        if r % 2 == 0:
            ours.append(metald())
            floor.append(bare())
        else:
            floor.append(bare())
            ours.append(metald())
    return ours, floor


def ms(values: list[float]) -> Spread:
    return Spread.of([v * 1000 for v in values])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5, help="pairs of runs per figure")
    parser.add_argument("--parallel", type=int, default=20, help="VMs at once (0: skip)")
    parser.add_argument("--memory-mib", type=int, default=256)
    parser.add_argument("--parts", default="create,ready,parallel", help="which figures")
    parser.add_argument(
        "--daemon-env", action="append", default=[], metavar="NAME=VALUE",
        help="a setting for the daemon (e.g. UNKEY_METALD_JAILER_SPARE_HELPERS=0)",
    )  # fmt: skip
    args = arguments(__doc__ or "", parser)
    parts = set(args.parts.split(","))
    repeats = 1 if args.tiny else args.repeats
    parallel = 0 if args.tiny else args.parallel
    report = Report(
        "life",
        args.tiny,
        parameters={
            "repeats": repeats,
            "parallel": parallel,
            "memory_mib": args.memory_mib,
            "daemon_env": args.daemon_env,
        },
    )
    env = dict(item.split("=", 1) for item in args.daemon_env)
    netns = BareNetns(f"mbb{secrets.token_hex(3)}")
    try:
        with BenchDaemon(**env) as daemon, MetaldClient(daemon.url, TOKEN) as client:
            life = Life(daemon, client, netns, args.memory_mib)
            measure(life, report, repeats, parallel if "parallel" in parts else 0, parts)
    finally:
        netns.close()
    show(report)
    report.save(args.out)


def measure(life: Life, report: Report, repeats: int, parallel: int, parts: set[str]) -> None:
    # The customer keeps one VM with a NIC throughout: a customer's first such VM also
    # builds its network segment (and its last one's delete removes it), which is not the
    # cost of a create in the common case.
    anchor = life.create(True)
    try:
        _measure(life, report, repeats, parallel, parts)
    finally:
        life.delete(anchor)


def _measure(life: Life, report: Report, repeats: int, parallel: int, parts: set[str]) -> None:
    templates = {nic: life.template(nic) for nic in (False, True)}  # also warms metald up
    steps: dict[bool, list[dict[str, float]]] = {}
    for nic in (False, True) if "create" in parts else ():
        runs, floor = alternate(
            repeats,
            lambda: life.metald_create(nic),  # noqa: B023 - called within the iteration
            lambda: life.bare_start(templates[nic]),  # noqa: B023
        )
        latency = [r[0] for r in runs]
        steps[nic] = [r[1] for r in runs]
        api = [a - r[1].get("total", 0.0) for a, r in zip(latency, runs, strict=True)]
        greeting = [b[0] for b in floor]
        answer = [b[1] for b in floor]
        report.add(
            "create",
            {
                "nic": "yes" if nic else "no",
                "create_ms": ms(latency),
                "bare_greeting_ms": ms(greeting),
                "bare_answer_ms": ms(answer),
                "own_vs_greeting_ms": ms([a - b for a, b in zip(latency, greeting, strict=True)]),
                "own_vs_answer_ms": ms([a - b for a, b in zip(latency, answer, strict=True)]),
                "ratio_vs_answer": Spread.of([a / b for a, b in zip(latency, answer, strict=True)]),
                "target_own_ms": 40 if nic else 20,
                # The API around the use case: transport, Connect, auth, the handler.
                "api_ms": ms(api),
            },
        )
    for nic in steps:  # what no timer covers: the RPC, admission, locks, the event loop
        for run in steps[nic]:
            top = sum(v for k, v in run.items() if "." not in k and k != "total")
            run["other"] = run.get("total", 0.0) - top
    names = list(dict.fromkeys(k for nic in steps for run in steps[nic] for k in run))
    for name in names:
        row: dict[str, Any] = {"step": name}
        for nic in (False, True):
            values = [run.get(name, 0.0) for run in steps[nic]]
            row["nic" if nic else "no_nic"] = ms(values)
        report.add("steps", row)
    for nic in () if "ready" not in parts else (False,) if report.tiny else (False, True):
        ours, floor = alternate(
            repeats,
            lambda: life.metald_ready(nic),  # noqa: B023 - called within the iteration
            lambda: life.bare_ready(templates[nic]),  # noqa: B023
        )
        report.add(
            "ready",
            {
                "nic": "yes" if nic else "no",
                "metald_s": Spread.of(ours),
                "bare_s": Spread.of(floor),
                "ratio": Spread.of([a / b for a, b in zip(ours, floor, strict=True)]),
                "target": 1.05,
            },
        )
    if parallel > 0:
        ours_p, floor_p = alternate(
            1,
            lambda: life.metald_parallel(parallel),
            lambda: life.bare_parallel(templates[False], parallel),
        )
        report.add(
            "parallel",
            {
                "vms": parallel,
                "metald_s": Spread.of(ours_p),
                "bare_s": Spread.of(floor_p),
                "ratio": statistics.median(ours_p) / statistics.median(floor_p),
                "target": 1.2,
            },
        )


def show(report: Report) -> None:
    report.table(
        "create",
        [
            ("nic", "NIC"),
            ("create_ms", "CreateVm ms"),
            ("bare_greeting_ms", "bare: QMP greeting ms"),
            ("bare_answer_ms", "bare: first answer ms"),
            ("own_vs_greeting_ms", "metald's own (vs greeting) ms"),
            ("own_vs_answer_ms", "metald's own (vs answer) ms"),
            ("target_own_ms", "target ms"),
            ("ratio_vs_answer", "ratio (vs answer)"),
            ("api_ms", "API around it ms"),
        ],
        title="life: CreateVm against a bare QEMU start (same argv), median (range)",
    )
    report.table(
        "steps",
        [("step", "step"), ("no_nic", "no NIC ms"), ("nic", "NIC ms")],
        title="life: CreateVm by metald's own timers (x.* are inside x; other: total minus "
        "the top-level steps)",
    )
    report.table(
        "ready",
        [
            ("nic", "NIC"),
            ("metald_s", "CreateVm+BootVm to READY s"),
            ("bare_s", "bare qemu to READY s"),
            ("ratio", "ratio"),
            ("target", "target"),
        ],
        title="life: to the guest's READY line",
    )
    report.table(
        "parallel",
        [
            ("vms", "VMs"),
            ("metald_s", "metald, all READY s"),
            ("bare_s", "bare, all READY s"),
            ("ratio", "ratio"),
            ("target", "target"),
        ],
        title="life: VMs started at once",
    )


if __name__ == "__main__":
    main()
