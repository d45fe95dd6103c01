"""The API's meaning: Firecracker's configuration state, its ordering rules, the guest's life.

Every request is first checked against the spec (spec.py); what the spec cannot say is checked
here as Firecracker checks it: pre-boot-only and post-boot-only calls (FlushMetrics is one of
the latter), InstanceStart once and only with a boot source, metrics configured once (the
logger may be configured again), files that must exist, ids that must match, one root drive,
TAPs that must open. Metrics lines are written as Firecracker 1.16.1 writes them: one at
InstanceStart, then on FlushMetrics and every 60 s (never before the start). All of it runs
on one thread (the caller's), one request at a time, as Firecracker's VMM thread does; QEMU is
started from that thread.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import struct
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .metrics import Logger, Metrics, Sink
from .qemu import Qmp, QmpError, build_argv, launch, qemu_binary, tcg_timer_args
from .spec import Operation, Spec, SpecError

VERSION = "1.16.1"
# Firecracker's kernel command line when boot-source has no boot_args.
DEFAULT_BOOT_ARGS = (
    "reboot=k panic=1 pci=off nomodule 8250.nr_uarts=0 i8042.noaux i8042.nomux "
    "i8042.dumbkbd swiotlb=noforce"
)
NOT_AFTER_START = "The requested operation is not supported after starting the microVM."
NOT_BEFORE_START = "The requested operation is not supported before starting the microVM."
PRE_BOOT = {
    "putGuestBootSource", "putCpuConfiguration", "putGuestDriveByID", "putGuestPmemByID",
    "putLogger", "putMachineConfiguration", "patchMachineConfiguration", "putMetrics",
    "putMmdsConfig", "putEntropyDevice", "putSerialDevice", "putMemoryHotplug",
    "putGuestNetworkInterfaceByID", "loadSnapshot", "putGuestVsock", "putBalloon",
}  # fmt: skip
POST_BOOT = {
    "patchGuestDriveByID", "patchGuestPmemByID", "patchGuestNetworkInterfaceByID",
    "createSnapshot", "patchVm", "patchMemoryHotplug",
}  # fmt: skip
# operationId -> the stem of its <stem>_count / <stem>_fails counter in the metrics.
COUNTED = {
    "describeInstance": "instance_info", "getMachineConfiguration": "machine_cfg",
    "getMmds": "mmds", "getFirecrackerVersion": "vmm_version", "createSyncAction": "actions",
    "putGuestBootSource": "boot_source", "putGuestDriveByID": "drive", "putLogger": "logger",
    "putMachineConfiguration": "machine_cfg", "putCpuConfiguration": "cpu_cfg",
    "putMetrics": "metrics", "putGuestNetworkInterfaceByID": "network", "putMmds": "mmds",
    "putMmdsConfig": "mmds", "putGuestVsock": "vsock", "putBalloon": "balloon",
    "putSerialDevice": "serial", "putEntropyDevice": "entropy", "putGuestPmemByID": "pmem",
    "putMemoryHotplug": "hotplug_memory", "patchGuestDriveByID": "drive",
    "patchGuestNetworkInterfaceByID": "network", "patchMachineConfiguration": "machine_cfg",
    "patchMmds": "mmds", "patchBalloon": "balloon", "patchBalloonStatsInterval": "balloon",
}  # fmt: skip
DEFAULT_MACHINE = {"vcpu_count": 1, "mem_size_mib": 128, "smt": False,
                   "track_dirty_pages": False, "huge_pages": "None"}  # fmt: skip
_MAC = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
_TUNSETIFF, _IFF_TAP, _IFF_NO_PI, _IFF_VNET_HDR = 0x400454CA, 0x0002, 0x1000, 0x4000
Reply = tuple[int, Any]  # (status, JSON body or None for 204)


class ApiError(Exception):
    pass


def _check_file(path: str, what: str, *, write: bool = False) -> None:
    try:
        os.close(os.open(path, (os.O_RDWR if write else os.O_RDONLY) | os.O_CLOEXEC))
    except OSError as e:
        raise ApiError(f"Unable to open the {what} {path!r}: {e.strerror}") from e


def _check_tap(name: str) -> None:
    """Open the TAP as Firecracker does when the interface is configured, then let it go."""
    if not 0 < len(name.encode()) < 16:
        raise ApiError(f"Open tap device failed: invalid interface name {name!r}")
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        try:
            flags = _IFF_TAP | _IFF_NO_PI | _IFF_VNET_HDR
            fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH22x", name.encode(), flags))
        finally:
            os.close(fd)
    except OSError as e:
        raise ApiError(f"Open tap device failed: {name}: {e.strerror}") from e


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396 JSON merge patch (PATCH /mmds)."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _merge_patch(out.get(key), value)
    return out


class Vmm:
    def __init__(
        self,
        spec: Spec,
        instance_id: str,
        private_dir: Path,
        on_started: Callable[[subprocess.Popen[bytes]], None],
        mmds_size_limit: int = 51200,
    ) -> None:
        self.spec, self.instance_id, self.private_dir = spec, instance_id, private_dir
        self.on_started, self.mmds_size_limit = on_started, mmds_size_limit
        self.state = "Not started"
        self.machine: dict[str, Any] = dict(DEFAULT_MACHINE)
        self.boot: dict[str, Any] | None = None
        self.drives: dict[str, dict[str, Any]] = {}
        self.nets: dict[str, dict[str, Any]] = {}
        self.devices: dict[str, dict[str, Any]] = {}  # vm/config name -> body (single devices)
        self.pmem: dict[str, dict[str, Any]] = {}
        self.mmds: Any = {}
        self.metrics = Metrics()
        self.next_flush: float | None = None
        self.logger: Logger | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.qmp: Qmp | None = None
        self._started_drives: list[str] = []

    # --- dispatch -------------------------------------------------------------------------

    def handle(self, method: str, path: str, body: Any) -> Reply:
        """One request (body already parsed from JSON, None if empty)."""
        self.log("Info", f'The API server received a {method} request on "{path}".')
        op: Operation | None = None
        try:
            op = self.spec.match(method, path)
            if op.operation_id == "putLogger" and isinstance(body, dict):
                level = body.get("level")  # "The possible values are case-insensitive."
                if isinstance(level, str) and level.capitalize() in Logger.LEVELS:
                    body = body | {"level": level.capitalize()}
            body = self.spec.check_body(op, body)
            if op.operation_id in PRE_BOOT and self.state != "Not started":
                raise ApiError(NOT_AFTER_START)
            if op.operation_id in POST_BOOT and self.state == "Not started":
                raise ApiError(NOT_BEFORE_START)
            reply: Reply = getattr(self, f"op_{op.operation_id}")(op, body)
            self._count(op, "count")
            return reply
        except (SpecError, ApiError) as e:
            if op is not None:
                self._count(op, "fails")
            self.log("Error", f"Received Error. Status code: 400 Bad Request. Message: {e}")
            return 400, {"fault_message": str(e)}

    def _count(self, op: Operation, kind: str) -> None:
        stem = COUNTED.get(op.operation_id)
        group = {"GET": "get_api_requests", "PUT": "put_api_requests"}.get(
            op.method, "patch_api_requests"
        )
        if stem is not None and (kind == "count" or group != "get_api_requests"):
            self.metrics.bump(group, f"{stem}_{kind}")

    def log(self, level: str, message: str) -> None:
        if self.logger is not None:
            self.logger.log(level, message)

    # --- information ----------------------------------------------------------------------

    def op_describeInstance(self, op: Operation, body: Any) -> Reply:
        return 200, {"app_name": "Firecracker", "id": self.instance_id, "state": self.state,
                     "vmm_version": VERSION}  # fmt: skip

    def op_getFirecrackerVersion(self, op: Operation, body: Any) -> Reply:
        return 200, {"firecracker_version": VERSION}

    def op_getMachineConfiguration(self, op: Operation, body: Any) -> Reply:
        return 200, dict(self.machine)

    def op_getExportVmConfig(self, op: Operation, body: Any) -> Reply:
        out: dict[str, Any] = {"machine-config": dict(self.machine)}
        if self.boot is not None:
            out["boot-source"] = dict(self.boot)
        out["drives"] = list(self.drives.values())
        out["network-interfaces"] = list(self.nets.values())
        out["pmem"] = list(self.pmem.values())
        return 200, out | {k: v for k, v in self.devices.items() if k != "serial"}

    # --- pre-boot configuration ------------------------------------------------------------

    def op_putGuestBootSource(self, op: Operation, body: dict[str, Any]) -> Reply:
        _check_file(body["kernel_image_path"], "kernel file")
        if body.get("initrd_path"):
            _check_file(body["initrd_path"], "initrd file")
        self.boot = body
        return 204, None

    def _machine(self, cfg: dict[str, Any]) -> Reply:
        self.spec.validate("MachineConfiguration", cfg)
        if cfg["mem_size_mib"] < 1:
            raise ApiError("The memory size (MiB) is invalid.")
        if cfg.get("smt") and cfg["vcpu_count"] > 1 and cfg["vcpu_count"] % 2:
            raise ApiError("The vCPU number is invalid! The vCPU number can only be 1 or an even "
                           "number when SMT is enabled.")  # fmt: skip
        if cfg.get("huge_pages") == "2M" and cfg["mem_size_mib"] % 2:
            raise ApiError("The memory size (MiB) must be a multiple of 2 with 2M huge pages.")
        self.machine = cfg
        return 204, None

    def op_putMachineConfiguration(self, op: Operation, body: dict[str, Any]) -> Reply:
        return self._machine(DEFAULT_MACHINE | body)

    def op_patchMachineConfiguration(self, op: Operation, body: dict[str, Any]) -> Reply:
        return self._machine(self.machine | body)

    def op_putGuestDriveByID(self, op: Operation, body: dict[str, Any]) -> Reply:
        if "socket" in body:
            raise ApiError("vhost-user-block drives are not supported by the stand-in.")
        if "path_on_host" not in body:
            raise ApiError("Unable to create the virtio block device: path_on_host is missing.")
        if body["is_root_device"] and any(
            d["is_root_device"] for i, d in self.drives.items() if i != body["drive_id"]
        ):
            raise ApiError("A root block device already exists!")
        drive: dict[str, Any] = {"is_read_only": False, "cache_type": "Unsafe",
                                 "io_engine": "Sync"} | body  # fmt: skip
        _check_file(drive["path_on_host"], "block device file", write=not drive["is_read_only"])
        self.drives[drive["drive_id"]] = drive
        return 204, None

    def op_putGuestNetworkInterfaceByID(self, op: Operation, body: dict[str, Any]) -> Reply:
        others = [n for i, n in self.nets.items() if i != body["iface_id"]]
        mac = body.get("guest_mac")
        if mac is not None and not _MAC.match(mac):
            raise ApiError(f"Invalid MAC address {mac!r}.")
        if any(n["host_dev_name"] == body["host_dev_name"] for n in others):
            raise ApiError(f"The host device name {body['host_dev_name']} is already in use.")
        if mac is not None and any(
            str(n.get("guest_mac", "")).lower() == mac.lower() for n in others
        ):
            raise ApiError(f"The MAC address {mac} is already in use.")
        _check_tap(body["host_dev_name"])
        self.nets[body["iface_id"]] = body
        return 204, None

    def op_putLogger(self, op: Operation, body: dict[str, Any]) -> Reply:
        # Firecracker takes the logger again (a second PUT answers 204): what the new body
        # names replaces what was set, the rest stays.
        cfg = self.devices.get("logger", {}) | body
        sink = self.logger.sink if self.logger is not None else None
        if "log_path" in body:
            try:
                new_sink = Sink(Path(body["log_path"]))
            except OSError as e:
                raise ApiError(f"Cannot initialize the logger: {e}") from e
            if sink is not None:
                sink.close()
            sink = new_sink
        if sink is not None:
            self.logger = Logger(sink, self.instance_id, cfg)
        self.devices["logger"] = cfg
        return 204, None

    def op_putMetrics(self, op: Operation, body: dict[str, Any]) -> Reply:
        if self.metrics.sink is not None:
            raise ApiError("Reinitialization of metrics not allowed.")
        try:
            self.metrics.sink = Sink(Path(body["metrics_path"]))
        except OSError as e:
            raise ApiError(f"Cannot initialize the metrics: {e}") from e
        self.devices["metrics"] = body
        return 204, None  # nothing is written before InstanceStart

    def op_putSerialDevice(self, op: Operation, body: dict[str, Any]) -> Reply:
        if "serial_out_path" in body:
            flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NONBLOCK | os.O_CLOEXEC
            try:
                os.close(os.open(body["serial_out_path"], flags, 0o600))
            except OSError as e:
                if e.errno != errno.ENXIO:  # a FIFO nobody reads yet is fine
                    raise ApiError(f"Unable to open the serial output: {e}") from e
        self.devices["serial"] = body
        return 204, None

    def _store(self, name: str, body: dict[str, Any]) -> Reply:
        self.devices[name] = body
        return 204, None

    def op_putCpuConfiguration(self, op: Operation, body: dict[str, Any]) -> Reply:
        return self._store("cpu-config", body)

    def op_putEntropyDevice(self, op: Operation, body: dict[str, Any]) -> Reply:
        return self._store("entropy", body)

    def op_putGuestVsock(self, op: Operation, body: dict[str, Any]) -> Reply:
        return self._store("vsock", body)

    def op_putBalloon(self, op: Operation, body: dict[str, Any]) -> Reply:
        return self._store("balloon", {"stats_polling_interval_s": 0} | body)

    def op_putMemoryHotplug(self, op: Operation, body: dict[str, Any]) -> Reply:
        return self._store("memory-hotplug", {"slot_size_mib": 128, "block_size_mib": 2} | body)

    def op_putMmdsConfig(self, op: Operation, body: dict[str, Any]) -> Reply:
        unknown = [i for i in body["network_interfaces"] if i not in self.nets]
        if unknown or not body["network_interfaces"]:
            raise ApiError(f"The MMDS could not be configured: invalid interfaces {unknown}.")
        return self._store("mmds-config", body)

    def op_putGuestPmemByID(self, op: Operation, body: dict[str, Any]) -> Reply:
        _check_file(body["path_on_host"], "pmem backing file", write=not body.get("read_only"))
        self.pmem[body["id"]] = body
        return 204, None

    def op_loadSnapshot(self, op: Operation, body: dict[str, Any]) -> Reply:
        raise ApiError("Loading snapshots is not supported by the stand-in.")

    # --- any time -------------------------------------------------------------------------

    def _set_mmds(self, data: Any) -> Reply:
        if len(json.dumps(data, separators=(",", ":"))) > self.mmds_size_limit:
            raise ApiError("The MMDS data store is too large (--mmds-size-limit).")
        self.mmds = data
        return 204, None

    def op_putMmds(self, op: Operation, body: Any) -> Reply:
        return self._set_mmds(body)

    def op_patchMmds(self, op: Operation, body: Any) -> Reply:
        return self._set_mmds(_merge_patch(self.mmds, body))

    def op_getMmds(self, op: Operation, body: Any) -> Reply:
        return 200, self.mmds

    def _balloon(self, feature: str = "") -> dict[str, Any]:
        balloon = self.devices.get("balloon")
        if balloon is None:
            raise ApiError("No balloon device configured.")
        if feature and not balloon.get(feature):
            raise ApiError(f"The balloon device was configured without {feature}.")
        return balloon

    def op_describeBalloonConfig(self, op: Operation, body: Any) -> Reply:
        return 200, self._balloon()

    def op_patchBalloon(self, op: Operation, body: dict[str, Any]) -> Reply:
        self._balloon()["amount_mib"] = body["amount_mib"]
        return 204, None

    def op_describeBalloonStats(self, op: Operation, body: Any) -> Reply:
        mib = self._balloon("stats_polling_interval_s")["amount_mib"]
        return 200, {"target_pages": mib * 256, "actual_pages": 0, "target_mib": mib,
                     "actual_mib": 0}  # fmt: skip

    def op_patchBalloonStatsInterval(self, op: Operation, body: dict[str, Any]) -> Reply:
        balloon = self._balloon()
        now_on, was_on = (
            body["stats_polling_interval_s"] > 0,
            balloon["stats_polling_interval_s"] > 0,
        )
        if self.state != "Not started" and now_on != was_on:
            raise ApiError("Balloon statistics cannot be turned on or off after boot.")
        balloon["stats_polling_interval_s"] = body["stats_polling_interval_s"]
        return 204, None

    def op_startBalloonHinting(self, op: Operation, body: Any) -> Reply:
        self._balloon("free_page_hinting")
        return 204, None

    def op_stopBalloonHinting(self, op: Operation, body: Any) -> Reply:
        self._balloon("free_page_hinting")
        return 204, None

    def op_describeBalloonHinting(self, op: Operation, body: Any) -> Reply:
        self._balloon("free_page_hinting")
        return 200, {"host_cmd": 0}

    def op_getMemoryHotplug(self, op: Operation, body: Any) -> Reply:
        cfg = self.devices.get("memory-hotplug")
        if cfg is None:
            raise ApiError("No hotpluggable memory configured.")
        return 200, {"plugged_size_mib": 0, "requested_size_mib": 0} | cfg

    # --- post-boot ------------------------------------------------------------------------

    def op_patchMemoryHotplug(self, op: Operation, body: dict[str, Any]) -> Reply:
        cfg = self.devices.get("memory-hotplug")
        if cfg is None or body.get("requested_size_mib", 0) > cfg.get("total_size_mib", 0):
            raise ApiError("The hotpluggable memory cannot be resized to that size.")
        cfg["requested_size_mib"] = body.get("requested_size_mib", 0)
        return 204, None

    def op_patchGuestDriveByID(self, op: Operation, body: dict[str, Any]) -> Reply:
        drive = self.drives.get(body["drive_id"])
        if drive is None:
            raise ApiError(f"Invalid block device ID: {body['drive_id']}.")
        if "path_on_host" in body:
            _check_file(body["path_on_host"], "block device file", write=not drive["is_read_only"])
        drive.update(body)  # stored (GET /vm/config); QEMU keeps its device as it is
        return 204, None

    def op_patchGuestNetworkInterfaceByID(self, op: Operation, body: dict[str, Any]) -> Reply:
        net = self.nets.get(body["iface_id"])
        if net is None:
            raise ApiError(f"Invalid network interface ID: {body['iface_id']}.")
        net.update(body)
        return 204, None

    def op_patchGuestPmemByID(self, op: Operation, body: dict[str, Any]) -> Reply:
        if body["id"] not in self.pmem:
            raise ApiError(f"Invalid pmem device ID: {body['id']}.")
        self.pmem[body["id"]].update(body)
        return 204, None

    def op_createSnapshot(self, op: Operation, body: dict[str, Any]) -> Reply:
        if self.state != "Paused":
            raise ApiError("The microVM must be paused to create a snapshot.")
        raise ApiError("Creating snapshots is not supported by the stand-in.")

    def op_patchVm(self, op: Operation, body: dict[str, Any]) -> Reply:
        pause = body["state"] == "Paused"
        started = time.monotonic()
        self._qmp("stop" if pause else "cont")
        self.metrics.bump("latencies_us", "pause_vm" if pause else "resume_vm",
                          int((time.monotonic() - started) * 1e6))  # fmt: skip
        self.state = "Paused" if pause else "Running"
        return 204, None

    # --- actions --------------------------------------------------------------------------

    def op_createSyncAction(self, op: Operation, body: dict[str, Any]) -> Reply:
        action = body["action_type"]
        if action == "FlushMetrics":
            if self.state == "Not started":
                raise ApiError(NOT_BEFORE_START)
            if not self.flush_metrics():
                raise ApiError("The metrics system is not initialized." if self.metrics.sink
                               is None else "The metrics could not be written.")  # fmt: skip
        elif action == "SendCtrlAltDel":
            if self.state == "Not started":
                raise ApiError(NOT_BEFORE_START)
            keys = [{"type": "qcode", "data": k} for k in ("ctrl", "alt", "delete")]
            self._qmp("send-key", {"keys": keys})
        else:
            if self.state != "Not started":
                raise ApiError(NOT_AFTER_START)
            self.start()
        return 204, None

    def _qmp(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        assert self.qmp is not None
        try:
            return self.qmp.execute(command, arguments)
        except QmpError as e:
            raise ApiError(f"The VMM could not carry out the request: {e}") from e

    def flush_metrics(self) -> bool:
        """Write one metrics line (at InstanceStart, on FlushMetrics, and every 60 s after
        the start); False if not written."""
        if self.metrics.sink is None:
            return False
        self.next_flush = time.monotonic() + 60
        stats: dict[str, dict[str, int] | None] = dict.fromkeys(self._started_drives)
        if self.qmp is not None:
            with contextlib.suppress(QmpError):
                for entry in self.qmp.execute("query-blockstats"):
                    index = int(str(entry.get("device", "")).removeprefix("drive") or -1)
                    if 0 <= index < len(self._started_drives):
                        stats[self._started_drives[index]] = entry["stats"]
        taps = {i: n["host_dev_name"] for i, n in self.nets.items()} if self.qmp else {}
        return self.metrics.flush(stats, taps)

    def start(self) -> None:
        if self.boot is None:
            raise ApiError("Cannot start microvm without kernel configuration.")
        with open(self.boot["kernel_image_path"], "rb") as f:
            if f.read(4) != b"\x7fELF":
                raise ApiError("Cannot load kernel: the kernel image is not an ELF vmlinux.")
        drives = sorted(self.drives.values(), key=lambda d: not d["is_root_device"])
        args = [self.boot.get("boot_args", DEFAULT_BOOT_ARGS)]
        root = next((d for d in drives if d["is_root_device"]), None)
        if root is not None:
            where = f"PARTUUID={root['partuuid']}" if root.get("partuuid") else "/dev/vda"
            args.append(f"root={where} {'ro' if root['is_read_only'] else 'rw'}")
        args.append(tcg_timer_args())
        serial = self.devices.get("serial")
        serial_path = None if serial is None else serial.get("serial_out_path")
        try:
            argv = build_argv(
                binary=qemu_binary(), machine=self.machine, boot=self.boot,
                cmdline=" ".join(a for a in args if a), drives=drives,
                nets=list(self.nets.values()), serial_path=serial_path,
                qmp_path=self.private_dir / "qmp.sock", entropy="entropy" in self.devices,
            )  # fmt: skip
            self.proc = launch(argv, serial_stdio=serial_path is None)
        except OSError as e:
            raise ApiError(f"Cannot start microvm: {e}") from e
        try:
            self.qmp = Qmp(self.private_dir / "qmp.sock", self.proc)
            self.qmp.execute("cont")
            if self.qmp.execute("query-status").get("status") != "running":
                raise QmpError("the vCPUs did not start")
        except QmpError as e:
            self.stop_guest()
            raise ApiError(f"Cannot start microvm: {e}") from e
        self._started_drives = [d["drive_id"] for d in drives]
        self.state = "Running"
        self.flush_metrics()  # Firecracker writes the metrics straight away, then every 60 s
        self.on_started(self.proc)

    def stop_guest(self) -> None:
        """Kill QEMU (if running) and reap it."""
        if self.qmp is not None:
            self.qmp.close()
            self.qmp = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
