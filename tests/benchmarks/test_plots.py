"""bench/plots.py draws from records as the benchmarks write them, including rows without
runs (a server that cannot serve a protocol), and picks each benchmark's newest full record
over a tiny one."""

from __future__ import annotations

import json
from pathlib import Path

from bench.plots import draw, newest_records


def _record(path: Path, started: float, tiny: bool, rps: float) -> None:
    runs = {"median": rps, "min": rps * 0.9, "max": rps * 1.1, "runs": 3}
    rows = [
        {"server": "hypercorn", "protocol": "connect", "rps": runs},
        {"server": "hypercorn", "protocol": "grpc", "rps": runs},
        {"server": "granian", "protocol": "connect", "rps": runs},
        {"server": "granian", "protocol": "grpc", "note": "no gRPC (no trailers)"},
    ]
    record = {
        "benchmark": "servers", "tiny": tiny, "started": started, "machine": {"commit": "x"},
        "sections": {"servers": rows},
    }  # fmt: skip
    path.write_text(json.dumps(record))


def test_a_row_without_runs_is_left_out_and_full_runs_win(tmp_path: Path) -> None:
    _record(tmp_path / "servers-1.json", started=1.0, tiny=False, rps=100.0)
    _record(tmp_path / "servers-2.json", started=2.0, tiny=True, rps=5.0)
    assert newest_records(tmp_path)["servers"][0].name == "servers-1.json"
    drawn = draw(tmp_path, tmp_path / "plots")
    assert drawn == [tmp_path / "plots" / "servers.png"]
    assert drawn[0].read_bytes()[:4] == b"\x89PNG"
