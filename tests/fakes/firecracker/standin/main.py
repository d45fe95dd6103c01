"""The `firecracker` command line (v1.16.1), as far as an API-driven VMM needs it.

Firecracker exits with status 1 on a bad command line (unknown flags too). The flags that
configure a VM without the API (--no-api, --config-file) are refused: the stand-in exists to
exercise the API. --log-path and --metrics-path configure the logger and metrics at start-up,
as the matching PUT requests would (and then those PUTs fail: configured once).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any, NoReturn

from .server import serve
from .spec import DEFAULT_SPEC, Spec
from .vmm import VERSION, Vmm

_ID = re.compile(r"^[A-Za-z0-9-]{1,64}$")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(1, f"firecracker: {message}\n")


def parse(argv: list[str]) -> argparse.Namespace:
    p = _Parser(prog="firecracker", allow_abbrev=False, add_help=False)
    p.add_argument("--api-sock", default="/run/firecracker.socket")
    p.add_argument("--id", default="anonymous-instance")
    p.add_argument("--level")
    p.add_argument("--module")
    p.add_argument("--log-path")
    p.add_argument("--show-level", action="store_true")
    p.add_argument("--show-log-origin", action="store_true")
    p.add_argument("--metrics-path")
    p.add_argument("--no-seccomp", action="store_true")
    p.add_argument("--seccomp-filter")
    p.add_argument("--boot-timer", action="store_true")
    p.add_argument("--http-api-max-payload-size", type=int, default=51200)
    p.add_argument("--mmds-size-limit", type=int)
    p.add_argument("--no-api", action="store_true")
    p.add_argument("--config-file")
    p.add_argument("--version", action="store_true")
    # Passed by Firecracker's own jailer; accepted and ignored.
    for flag in ("--start-time-us", "--start-time-cpu-us", "--parent-cpu-time-us"):
        p.add_argument(flag, type=int)
    args = p.parse_args(argv)
    if args.no_seccomp and args.seccomp_filter:
        p.error("--no-seccomp and --seccomp-filter cannot be used together")
    return args


def main(argv: list[str], spec_path: Path = DEFAULT_SPEC) -> int:
    args = parse(argv)
    if args.version:
        print(f"Firecracker v{VERSION}")
        return 0
    if args.no_api or args.config_file:
        print("firecracker: --no-api and --config-file are not supported by the stand-in "
              "(it serves the API only)", file=sys.stderr)  # fmt: skip
        return 1
    if not _ID.match(args.id):
        print(f"firecracker: invalid --id {args.id!r}: alphanumeric and '-', 1-64 characters",
              file=sys.stderr)  # fmt: skip
        return 1
    if args.no_seccomp:
        seccomp = "off (--no-seccomp)"
    else:
        seccomp = f"on ({args.seccomp_filter or 'the default filter'})"
    print(
        f"firecracker-api-standin: a stand-in for Firecracker v{VERSION} (the guest runs under "
        f"QEMU); seccomp would be {seccomp}",
        file=sys.stderr,
        flush=True,
    )
    spec = Spec(spec_path)
    api_sock = Path(args.api_sock).absolute()

    def make_vmm(private_dir: Path, on_started: Any) -> Vmm:
        limit = args.mmds_size_limit or args.http_api_max_payload_size
        vmm = Vmm(spec, args.id, private_dir, on_started, mmds_size_limit=limit)
        startup: list[tuple[str, dict[str, Any]]] = []
        if args.log_path:
            logger = {"log_path": args.log_path, "show_level": args.show_level,
                      "show_log_origin": args.show_log_origin}  # fmt: skip
            startup.append(("/logger", logger | ({"level": args.level} if args.level else {})))
        if args.metrics_path:
            startup.append(("/metrics", {"metrics_path": args.metrics_path}))
        for path, body in startup:
            status, reply = vmm.handle("PUT", path, body)
            if status != 204:
                raise SystemExit(f"firecracker: {path[1:]}: {reply['fault_message']}")
        return vmm

    return serve(make_vmm, api_sock, args.http_api_max_payload_size)
