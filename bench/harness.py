"""What every benchmark shares: the machine's description, statistics, a printed table and
the JSON record under bench/results/.

These machines are shared and noisy, so a benchmark compares by ratios measured in the same
run (metald against a floor taken minutes apart is meaningless) and repeats what it times:
every figure is kept with its runs, and the table shows the median with its spread
(min-max). A result file holds the machine it was measured on, the parameters and every
run, so a number in docs/performance.md can be traced to the file that produced it.

`--tiny` runs a benchmark once in the smallest configuration, only to prove it still runs
(`make test` does this); its figures mean nothing and it writes to the directory it is given.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Self

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
# The benchmarks `make bench` runs, in order (modules of this package, each with `main()`).
SUITE: tuple[str, ...] = ("servers", "api", "scale", "life", "density", "metering")
PACKAGES = ("metald", "hypercorn", "h2", "connectrpc", "sqlalchemy", "aiosqlite", "grpcio")


def arguments(
    description: str, parser: argparse.ArgumentParser | None = None
) -> argparse.Namespace:
    """The options every benchmark takes, plus the ones `parser` already has."""
    parser = parser or argparse.ArgumentParser(description=description)
    parser.add_argument("--tiny", action="store_true", help="one small run, only to prove it runs")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the JSON result goes")
    return parser.parse_args()


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kib = int(line.split()[1])
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return {
        "hostname": platform.node(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg": os.getloadavg(),
        "packages": versions,
        "commit": _commit(),
    }


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
            capture_output=True, text=True, timeout=10, check=False,
        )  # fmt: skip
    except OSError:
        return ""
    return out.stdout.strip()


@dataclass(frozen=True)
class Spread:
    """The median of repeated runs with their range."""

    median: float
    low: float
    high: float
    runs: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Self:
        if not values:
            raise ValueError("no runs to summarise")
        return cls(statistics.median(values), min(values), max(values), len(values))

    def show(self, digits: int = 1, unit: str = "") -> str:
        if self.runs == 1:
            return f"{self.median:.{digits}f}{unit}"
        return f"{self.median:.{digits}f}{unit} ({self.low:.{digits}f}-{self.high:.{digits}f})"

    def as_json(self) -> dict[str, float]:
        return {"median": self.median, "min": self.low, "max": self.high, "runs": self.runs}


def percentile(values: Sequence[float], fraction: float) -> float:
    """The `fraction` quantile (0..1) of `values`, nearest-rank."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(fraction * len(ordered) + 0.5) - 1))
    return ordered[rank]


@dataclass
class Report:
    """One benchmark's rows: printed as a table and saved as JSON with the machine."""

    name: str
    tiny: bool
    parameters: dict[str, Any] = field(default_factory=dict)
    sections: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    started: float = field(default_factory=time.time)

    def add(self, section: str, row: dict[str, Any]) -> None:
        self.sections.setdefault(section, []).append(row)

    def table(self, section: str, columns: Sequence[tuple[str, str]], title: str = "") -> None:
        """Print `section` with (key, header) columns; Spread cells show median (range)."""
        table = Table(title=title or f"{self.name}: {section}", title_justify="left")
        for _, header in columns:
            table.add_column(header, justify="right" if header else "left")
        for row in self.sections.get(section, []):
            table.add_row(*(_cell(row.get(key)) for key, _ in columns))
        Console(width=160).print(table)

    def save(self, out: Path) -> Path:
        out.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(self.started))
        path = out / f"{self.name}-{stamp}.json"
        record = {
            "benchmark": self.name,
            "tiny": self.tiny,
            "started": self.started,
            "seconds": round(time.time() - self.started, 1),
            "machine": machine(),
            "parameters": self.parameters,
            "sections": _jsonable(self.sections),
        }
        path.write_text(json.dumps(record, indent=2) + "\n")
        print(f"results: {path}", file=sys.stderr)
        return path


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, Spread):
        return value.show()
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Spread):
        return value.as_json()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value
