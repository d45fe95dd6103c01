"""The plots of docs/performance.md, drawn from the benchmarks' JSON records.

`make bench` ends with `python -m bench.plots`: for each benchmark it takes the newest
record in the results directory (a full run's, or a tiny one's when that is all there is)
and draws one PNG beside it, under `<results>/plots/`. The figures in docs/performance.md
are copies of one serial run's plots (`--out docs/img`), so a plot in the docs can be
traced to the record it was drawn from: its title names the record's file.

Every bar is a median, its whisker the range of the runs (what the tables show as
"median (min-max)"): on these shared machines the spread is part of the result.

    .venv/bin/python -m bench.plots [--results bench/results] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt
from matplotlib.axes import Axes

from .harness import RESULTS

Record = dict[str, Any]


def newest_records(results: Path) -> dict[str, tuple[Path, Record]]:
    """The newest record of each benchmark: a full run's if there is one, else a tiny's."""
    found: dict[str, tuple[tuple[bool, float], Path, Record]] = {}
    for path in sorted(results.glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        name = record.get("benchmark")
        if not isinstance(name, str) or not record.get("sections"):
            continue
        rank = (not record.get("tiny", False), float(record.get("started", 0.0)))
        if name not in found or rank > found[name][0]:
            found[name] = (rank, path, record)
    return {name: (path, record) for name, (_, path, record) in found.items()}


def _median(cell: Any) -> float:
    if isinstance(cell, dict):
        return float(cell.get("median", 0.0))
    return float(cell or 0.0)


def _whiskers(cells: Sequence[Any]) -> list[list[float]]:
    """matplotlib's yerr: distances from each median down to its min and up to its max."""
    low, high = [], []
    for cell in cells:
        m = _median(cell)
        if isinstance(cell, dict):
            low.append(max(0.0, m - float(cell.get("min", m))))
            high.append(max(0.0, float(cell.get("max", m)) - m))
        else:
            low.append(0.0)
            high.append(0.0)
    return [low, high]


def _bars(
    ax: Axes, labels: Sequence[str], series: Mapping[str, Sequence[Any]], ylabel: str
) -> None:
    """Grouped bars: one group per label, one bar per series, whiskers from the ranges."""
    width = 0.8 / max(1, len(series))
    for i, (name, cells) in enumerate(series.items()):
        xs = [x + (i - (len(series) - 1) / 2) * width for x in range(len(labels))]
        ax.bar(xs, [_median(c) for c in cells], width, yerr=_whiskers(cells), capsize=3, label=name)
    ax.set_xticks(range(len(labels)), labels, rotation=15, ha="right")
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)


def plot_servers(record: Record, ax: Axes) -> None:
    rows = record["sections"]["servers"]
    labels = sorted({r["server"] for r in rows}, key=lambda s: [r["server"] for r in rows].index(s))
    series: dict[str, list[Any]] = {}
    for protocol in ("connect", "grpc"):
        # A server that cannot serve a protocol (granian: no gRPC) has a row without runs.
        by_server = {
            r["server"]: r["rps"] for r in rows if r["protocol"] == protocol and "rps" in r
        }
        if by_server:
            series[protocol] = [by_server.get(s, 0.0) for s in labels]
    _bars(ax, labels, series, "trivial GetVmInfo, req/s (16 connections)")


def plot_api(record: Record, ax: Axes) -> None:
    rows = record["sections"]["calls"]
    labels = [f"{r['case']}\n{r['protocol']}" for r in rows]
    _bars(
        ax,
        labels,
        {"metald": [r["real_rps"] for r in rows], "trivial": [r["trivial_rps"] for r in rows]},
        "req/s (16 connections)",
    )
    for x, row in enumerate(rows):
        ax.annotate(
            f"{_median(row['ratio']):.2f}x",
            (x, _median(row["trivial_rps"])),
            ha="center", va="bottom", fontsize=8,
        )  # fmt: skip


def plot_scale(record: Record, ax: Axes) -> None:
    rows = [r for r in record["sections"]["reads"] if isinstance(r.get("p50"), dict)]
    labels = [f"{r['call']}\n{r['store']}" for r in rows]
    _bars(ax, labels, {"p50": [r["p50"] for r in rows], "p99": [r["p99"] for r in rows]}, "ms")


def plot_life(record: Record, ax: Axes) -> None:
    """CreateVm: metald's own steps stacked, beside the bare QEMU's first answer."""
    steps = record["sections"].get("steps", [])
    vmm_steps = ("vmm_start", "control", "configure")
    top = [r for r in steps if "." not in r["step"] and r["step"] not in ("total", *vmm_steps)]
    columns = (("no_nic", "no NIC"), ("nic", "NIC"))
    bottoms = [0.0, 0.0]
    for row in top:
        heights = [_median(row.get(key)) for key, _ in columns]
        if max(heights) < 0.5:
            continue
        ax.bar([0, 2], heights, 0.8, bottom=bottoms, label=row["step"])
        bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
    vmm = [sum(_median(r.get(key)) for r in steps if r["step"] in vmm_steps) for key, _ in columns]
    ax.bar([0, 2], vmm, 0.8, bottom=bottoms, color="lightgrey", hatch="//",
           label="the VMM's own start (vmm_start, control, configure)")  # fmt: skip
    creates = {r["nic"]: r for r in record["sections"].get("create", [])}
    bare = [_median(creates.get(n, {}).get("bare_answer_ms")) for n in ("no", "yes")]
    ax.bar([1, 3], bare, 0.8, color="black", alpha=0.6, label="bare QEMU to its first answer")
    ax.set_xticks([0, 1, 2, 3], ["metald\nno NIC", "bare\nno NIC", "metald\nNIC", "bare\nNIC"])
    ax.set_ylabel("CreateVm, ms (medians)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def plot_density(record: Record, ax: Axes) -> None:
    rows = record["sections"]["memory"]
    vms = [r["vms"] for r in rows]
    ax.plot(vms, [r["metald_rss_mib"] for r in rows], marker="o", label="metald RSS")
    vmm = [r.get("vmm_rss_mib_per_vm") for r in rows]
    if any(v is not None for v in vmm):
        ax2 = ax.twinx()
        ax2.plot(
            [v for v, m in zip(vms, vmm, strict=True) if m is not None],
            [m for m in vmm if m is not None],
            marker="s", color="tab:orange", label="VMM RSS per VM",
        )  # fmt: skip
        ax2.set_ylabel("VMM RSS per VM, MiB", color="tab:orange")
    ax.set_xlabel("managed VMs")
    ax.set_ylabel("metald RSS, MiB")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)


PLOTS: dict[str, tuple[str, Callable[[Record, Axes], None]]] = {
    "servers": ("The server's trivial ceiling, by ASGI server", plot_servers),
    "api": ("GetVmInfo and ListVms against a trivial answer on the same server", plot_api),
    "scale": ("Reads with 100,000 rows against a small store", plot_scale),
    "life": ("Where CreateVm's time goes", plot_life),
    "density": ("Memory with managed VMs", plot_density),
}


def draw(results: Path, out: Path) -> list[Path]:
    """One PNG per benchmark with a record in `results`; the files written."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (path, record) in sorted(newest_records(results).items()):
        if name not in PLOTS:
            continue
        title, plot = PLOTS[name]
        fig, ax = plt.subplots(figsize=(10, 5))
        try:
            plot(record, ax)
            tiny = " (tiny run: figures mean nothing)" if record.get("tiny") else ""
            fig.suptitle(f"{title}{tiny}", fontsize=11)
            ax.set_title(f"{path.name}, commit {record['machine'].get('commit', '?')}", fontsize=8)
            fig.tight_layout()
            target = out / f"{name}.png"
            fig.savefig(target, dpi=100)
            written.append(target)
        finally:
            plt.close(fig)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--out", type=Path, default=None, help="default: <results>/plots")
    args = parser.parse_args()
    for path in draw(args.results, args.out or args.results / "plots"):
        print(f"plot: {path}")


if __name__ == "__main__":
    main()
