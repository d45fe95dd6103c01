"""`make bench` (python -m bench [--tiny] [--out DIR]): every benchmark of SUITE in turn,
each in its own process (one benchmark's daemon and VMs never overlap another's), then the
plots of the newest records (bench/plots.py, into <out>/plots)."""

from __future__ import annotations

import argparse
import subprocess
import sys

from .harness import RESULTS, SUITE


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("only", nargs="*", help=f"some of: {', '.join(SUITE)}")
    args = parser.parse_args()
    failed = []
    for name in args.only or SUITE:
        command = [sys.executable, "-m", f"bench.{name}", "--out", args.out]
        if args.tiny:
            command.append("--tiny")
        print(f"== {' '.join(command[1:])}", flush=True)
        if subprocess.run(command, check=False).returncode != 0:
            failed.append(name)
    plots = [sys.executable, "-m", "bench.plots", "--results", args.out]
    if subprocess.run(plots, check=False).returncode != 0:
        failed.append("plots")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
