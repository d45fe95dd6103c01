"""A real Prometheus (Debian's `prometheus`, started here on loopback) scrapes a real daemon's
dedicated listener: PromQL over its HTTP API counts the VMs by state, and every query of the
Grafana dashboards (contrib/grafana) evaluates without error and returns data after a short
run that exercises what they show (creates, boots, a pause, refusals of each kind).

Prometheus runs with a config and a data directory this test writes in its own temp dir, on
a free port, and is ended by its pid."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from grafana_dashboards import queries

from ._support import Caller, Daemon, client_env, free_port, http_get, wait_until

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
EXAMPLE = Path(__file__).resolve().parents[2] / "contrib" / "grafana" / "prometheus.yml"


class Prometheus:
    def __init__(self, workdir: Path, targets: list[str]) -> None:
        self.port = free_port()
        self.workdir = workdir
        config = workdir / "prometheus.yml"
        # The operators' example (contrib/grafana/prometheus.yml), scraping every second the
        # targets given. JSON is YAML.
        example = yaml.safe_load(EXAMPLE.read_text())
        example["global"]["scrape_interval"] = "1s"
        (job,) = example["scrape_configs"]
        job["static_configs"] = [{"targets": targets}]
        config.write_text(json.dumps(example))
        self.log = workdir / "prometheus.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [
                    PROMETHEUS,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=workdir,
                env=client_env(),
            )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited with {self.proc.returncode}: {self.logs()}")
        try:
            return http_get(self.url + "/-/ready", timeout=2)[0] == 200
        except OSError:
            return False

    def query(self, promql: str) -> dict[str, Any]:
        """The API's answer to an instant query: {"status": ..., "data": ...} or an error."""
        url = self.url + "/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        status, body = http_get(url, timeout=10)
        answer: dict[str, Any] = json.loads(body)
        answer["http_status"] = status
        return answer

    def vector(self, promql: str) -> list[dict[str, Any]]:
        answer = self.query(promql)
        assert answer["status"] == "success", f"{promql}: {answer}"
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)

    def logs(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


@pytest.fixture
def prometheus_for(e2e_root: Path) -> Iterator[Callable[[list[str]], Prometheus]]:
    if not Path(PROMETHEUS).exists():
        pytest.fail("prometheus is not installed (make system-deps)", pytrace=False)
    started: list[Prometheus] = []

    def start(targets: list[str]) -> Prometheus:
        workdir = Path(tempfile.mkdtemp(prefix="prom", dir=e2e_root))
        prom = Prometheus(workdir, targets)
        started.append(prom)
        wait_until(prom.ready, 60, "prometheus to be ready", interval=0.2)
        return prom

    yield start
    for prom in started:
        prom.stop()
        shutil.rmtree(prom.workdir, ignore_errors=True)


def _by_state(prom: Prometheus) -> dict[str, float]:
    return {
        r["metric"]["state"]: float(r["value"][1])
        for r in prom.vector('sum by (state) (metald_vms{job="metald"})')
    }


def test_prometheus_counts_vms_by_state_and_runs_every_dashboard_query(
    metald_factory: Callable[..., Daemon],
    callers: Callable[..., Caller],
    prometheus_for: Callable[[list[str]], Prometheus],
) -> None:
    daemon = metald_factory(UNKEY_METALD_QUOTA_VMS="3")
    prom = prometheus_for([f"127.0.0.1:{daemon.metrics_port}"])
    wait_until(
        lambda: [r["value"][1] for r in prom.vector('up{job="metald"}')] == ["1"],
        60,
        "prometheus to scrape metald's listener",
        interval=0.2,
    )
    assert _by_state(prom) == {"created": 0, "running": 0, "paused": 0, "shutdown": 0}

    acme = callers("grpcio", daemon.url)
    bob = callers("curl-connect-json", daemon.url, "dev_customer_bob")
    for vm_id in ("prom-a", "prom-b", "prom-c"):
        acme.must("CreateVm", {"vm_id": vm_id})
    acme.must("BootVm", {"vm_id": "prom-a"})
    acme.must("BootVm", {"vm_id": "prom-b"})
    acme.must("PauseVm", {"vm_id": "prom-b"})
    # What the security and capacity dashboards show: a refusal of each kind.
    assert acme("CreateVm", {"vm_id": "prom-d"}).code == "resource_exhausted"  # quota vms=3
    assert acme("ListVms", {}, token=None).code == "unauthenticated"
    assert acme("ListVms", {}, token="not-a-dev-token").code == "unauthenticated"
    assert bob("GetVmInfo", {"vm_id": "prom-a"}).code == "not_found"  # acme's: refused
    assert bob("CreateVm", {"customer_id": "acme"}).code == "permission_denied"

    want = {"created": 1, "running": 1, "paused": 1, "shutdown": 0}
    wait_until(lambda: _by_state(prom) == want, 60, f"prometheus to count {want}", interval=0.2)
    running = prom.vector('metald_vms{state="running"} > 0')
    assert [r["metric"]["backend"] for r in running] == ["qemu"]

    # Every dashboard query: no error, and data once a few scrapes have seen the run above.
    found = queries()
    assert len(found) >= 40
    problems: dict[str, str] = {}

    def all_answer() -> bool:
        problems.clear()
        for q in found:
            answer = prom.query(q.promql)
            where = f"{q.dashboard} / {q.where}: {q.promql}"
            if answer["status"] != "success":
                problems[where] = f"error: {answer.get('error')}"
            elif not answer["data"]["result"]:
                problems[where] = "no data"
            elif q.label and not all(q.label in r["metric"] for r in answer["data"]["result"]):
                problems[where] = f"no {q.label} label"
        return not problems

    try:
        wait_until(all_answer, 90, "every dashboard query to return data", interval=1.0)
    except AssertionError:
        raise AssertionError(
            "dashboard queries that failed:\n"
            + "\n".join(f"  {k}\n    -> {v}" for k, v in sorted(problems.items()))
        ) from None
    # Errors are told apart from empty answers: a broken query is an error, not "no data".
    assert prom.query("sum(rate(metald_vms[5m]")["status"] == "error"

    for vm_id in ("prom-a", "prom-b", "prom-c"):
        acme.must("DeleteVm", {"vm_id": vm_id, "force": True})


def test_the_example_scrape_config_is_valid() -> None:
    out = subprocess.run(
        [PROMTOOL, "check", "config", str(EXAMPLE)], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stdout + out.stderr
    (job,) = yaml.safe_load(EXAMPLE.read_text())["scrape_configs"]
    assert job["static_configs"] == [{"targets": ["127.0.0.1:9464"]}]  # the default listener
