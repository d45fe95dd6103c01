"""The create step histogram on /metrics (api/metrics.py): one series per step and backend,
plus step=total, in the exposition format the benchmark reads."""

from __future__ import annotations

from metald.api.metrics import ApiMetrics
from metald.core.timing import StepTimes


def test_create_steps_are_published_by_step_and_backend() -> None:
    metrics = ApiMetrics()
    times = StepTimes(steps={"store": 0.002, "jailer": 0.004, "jailer.mount": 0.001})
    times.total = 0.010
    metrics.observe_create_steps("qemu", times)
    metrics.observe_create_steps("qemu", times)
    text = metrics.render({}).decode()
    for step, total in (("store", 0.004), ("jailer", 0.008), ("jailer.mount", 0.002)):
        labels = f'backend="qemu",step="{step}"'
        assert f"metald_create_step_seconds_count{{{labels}}} 2.0" in text
        assert f"metald_create_step_seconds_sum{{{labels}}} {total}" in text
    assert 'metald_create_step_seconds_count{backend="qemu",step="total"} 2.0' in text
