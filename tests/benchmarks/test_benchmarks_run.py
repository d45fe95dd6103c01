"""Every benchmark of `make bench` still runs: once, in its tiny configuration, writing its
JSON record, and its plot (bench/plots.py) is drawn from that record. No figure is checked
(figures are for docs/performance.md, not assertions)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.harness import ROOT, SUITE
from bench.plots import PLOTS, draw


@pytest.mark.parametrize("name", SUITE)
def test_the_benchmark_runs_and_writes_its_record(name: str, tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", f"bench.{name}", "--tiny", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert out.returncode == 0, f"{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    records = list(tmp_path.glob(f"{name}-*.json"))
    assert len(records) == 1, (records, out.stderr[-2000:])
    record = json.loads(records[0].read_text())
    assert record["tiny"] is True and record["machine"]["cores"], record
    assert record["sections"] and all(record["sections"].values()), record["sections"]
    if name in PLOTS:
        drawn = draw(tmp_path, tmp_path / "plots")
        assert drawn == [tmp_path / "plots" / f"{name}.png"], drawn
        assert drawn[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
