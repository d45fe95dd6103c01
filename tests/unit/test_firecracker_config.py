"""The Firecracker request bodies: every one is validated against the schema in the spec file
(reference/firecracker-api.yaml), strictly: a key the spec does not declare fails too."""

from __future__ import annotations

import copy
import re
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from metald.backends.firecracker import config
from metald.backends.vmm.driver import Drive, LaunchContext, VmmFiles
from metald.core.errors import InvalidArgument
from metald.core.models import LaunchSpec, NicSpec, RateLimit, ResolvedDisk

# The spec kept beside the project (as the stand-in under tests/fakes/firecracker finds it).
SPEC_FILE = Path(__file__).resolve().parents[2].parent / "shared/reference/firecracker-api.yaml"
RUN = Path("/run")


@cache
def _definitions() -> dict[str, Any]:
    with open(SPEC_FILE, encoding="utf-8") as f:
        definitions = yaml.safe_load(f)["definitions"]
    strict = copy.deepcopy(definitions)
    for schema in strict.values():
        _forbid_extra_keys(schema)
    return dict(strict)


def _forbid_extra_keys(schema: Any) -> None:
    if isinstance(schema, dict):
        if schema.get("type") == "object" and "properties" in schema:
            schema.setdefault("additionalProperties", False)
        for value in schema.values():
            _forbid_extra_keys(value)
    elif isinstance(schema, list):
        for value in schema:
            _forbid_extra_keys(value)


def check(definition: str, body: Any) -> None:
    """Fails the test if `body` is not a valid `definition` of the spec."""
    schema = {"$ref": f"#/definitions/{definition}", "definitions": _definitions()}
    jsonschema.Draft4Validator(schema).validate(body)


def drive(disk_id: str, index: int, *, root: bool = False, read_only: bool = False) -> Drive:
    return Drive(
        drive_id=disk_id,
        node_id=f"disk{index}",
        path=RUN / f"disk{index}.img",
        read_only=read_only,
        source=Path(f"/srv/vms/vm-1/disk{index}.img"),
        is_root_device=root,
    )


def launch(
    *,
    vcpus: int = 2,
    memory: int = 256 * 1024 * 1024,
    initrd: bool = True,
    drives: tuple[Drive, ...] = (),
    nic: NicSpec | None = None,
) -> LaunchContext:
    spec = LaunchSpec(
        vm_id="vm-0123456789abcdef",
        vcpu_count=vcpus,
        memory_bytes=memory,
        kernel=Path("/srv/assets/vmlinux"),
        initrd=Path("/srv/assets/initrd.gz") if initrd else None,
        kernel_args="quiet",
        disks=tuple(
            ResolvedDisk(d.drive_id, d.source, d.read_only, d.is_root_device) for d in drives
        ),
        nic=nic,
    )
    files = VmmFiles(
        run_dir=RUN,
        control_socket=RUN / "firecracker.sock",
        console_log=RUN / "console.log",
        kernel=Path("/vmlinux"),
        initrd=Path("/initrd.gz") if initrd else None,
        drives=drives,
    )
    return LaunchContext(
        spec=spec,
        files=files,
        host_run_dir=Path("/srv/jail/vm-1/run"),
        uid=1000,
        gid=1000,
        kernel_cmdline="console=ttyS0 reboot=k panic=-1 quiet",
    )


def nic(rx: RateLimit | None = None, tx: RateLimit | None = None) -> NicSpec:
    return NicSpec(
        netns="vm-1-ns",
        tap="tap-vm1",
        mac="02:00:0a:7b:00:02",
        guest_args="metald.ip4=10.123.0.2/24",
        rx_rate_limit=rx,
        tx_rate_limit=tx,
    )


def test_the_strict_check_rejects_what_the_spec_does_not_allow() -> None:
    # The check itself can fail: unknown keys, wrong types, missing required keys.
    with pytest.raises(jsonschema.ValidationError):
        check("MachineConfiguration", {"vcpu_count": 1, "mem_size_mib": 128, "smt_off": True})
    with pytest.raises(jsonschema.ValidationError):
        check("MachineConfiguration", {"vcpu_count": "1", "mem_size_mib": 128})
    with pytest.raises(jsonschema.ValidationError):
        check("Drive", {"drive_id": "rootfs"})
    with pytest.raises(jsonschema.ValidationError):
        check("TokenBucket", {"size": 1, "refill_time": 1000, "burst": 5})


def test_machine_config_rounds_memory_up_and_turns_smt_off() -> None:
    body = config.machine_config(launch(vcpus=2, memory=256 * 1024 * 1024 + 1))
    assert body == {"vcpu_count": 2, "mem_size_mib": 257, "smt": False}
    check("MachineConfiguration", body)
    check("MachineConfiguration", config.machine_config(launch(vcpus=1)))


@pytest.mark.parametrize("vcpus", [3, 7, 31, 32])
def test_machine_config_takes_odd_counts_with_smt_off(vcpus: int) -> None:
    # The spec's "1 or an even number" is for SMT on only: a real Firecracker 1.16.1 answers
    # 204 to vcpu_count 3 with smt false (and 400 with smt true).
    body = config.machine_config(launch(vcpus=vcpus))
    assert body["vcpu_count"] == vcpus and body["smt"] is False
    check("MachineConfiguration", body)


@pytest.mark.parametrize("vcpus", [0, 33, 64])
def test_machine_config_refuses_counts_firecracker_cannot_run(vcpus: int) -> None:
    with pytest.raises(InvalidArgument, match="vcpu_count"):
        config.machine_config(launch(vcpus=vcpus))


def test_boot_source_is_the_jails_kernel_initrd_and_the_whole_command_line() -> None:
    ctx = launch()
    body = config.boot_source(ctx)
    assert body == {
        "kernel_image_path": "/vmlinux",
        "initrd_path": "/initrd.gz",
        "boot_args": ctx.kernel_cmdline,
    }
    check("BootSource", body)
    without = config.boot_source(launch(initrd=False))
    assert "initrd_path" not in without
    check("BootSource", without)


def test_drives_put_the_root_device_first_with_firecracker_ids() -> None:
    drives = (
        drive("data-1", 1, read_only=True),
        drive("root-fs", 0, root=True),
        drive("scratch", 2),
    )
    bodies = config.drives(launch(drives=drives).files)
    assert [drive_id for drive_id, _ in bodies] == ["root_fs", "data_1", "scratch"]
    _, root = bodies[0]
    assert root == {
        "drive_id": "root_fs",
        "path_on_host": "/run/disk0.img",
        "is_root_device": True,
        "is_read_only": False,
    }
    assert bodies[1][1]["is_read_only"] is True
    assert bodies[1][1]["is_root_device"] is False
    for drive_id, body in bodies:
        assert body["drive_id"] == drive_id
        assert re.fullmatch(r"[A-Za-z0-9_]{1,64}", drive_id)
        check("Drive", body)


def test_drive_ids_stay_unique_when_made_safe() -> None:
    ids = config.drive_ids((drive("a-b", 0, root=True), drive("a_b", 1), drive("a-b_", 2)))
    assert ids["a-b"] == "a_b"
    assert len(set(ids.values())) == 3
    assert all(re.fullmatch(r"[A-Za-z0-9_]{1,64}", v) for v in ids.values())


def test_network_interface_without_limits() -> None:
    iface_id, body = config.network_interface(nic())
    assert iface_id == "eth0"
    assert body == {
        "iface_id": "eth0",
        "host_dev_name": "tap-vm1",
        "guest_mac": "02:00:0a:7b:00:02",
    }
    check("NetworkInterface", body)


def test_network_interface_maps_rate_limits_to_token_buckets() -> None:
    rx = RateLimit(bandwidth=12_500_000)  # 100 Mbit/s, refilled over the default second
    tx = RateLimit(bandwidth=1_000_000, refill_time_ms=100, burst=64 * 1024)
    _, body = config.network_interface(nic(rx=rx, tx=tx))
    assert body["rx_rate_limiter"] == {"bandwidth": {"size": 12_500_000, "refill_time": 1000}}
    assert body["tx_rate_limiter"] == {
        "bandwidth": {"size": 100_000, "refill_time": 100, "one_time_burst": 65536}
    }
    check("NetworkInterface", body)


def test_token_bucket_rate_is_the_requested_bandwidth() -> None:
    for limit in (
        RateLimit(bandwidth=5_000_000),
        RateLimit(bandwidth=5_000_000, refill_time_ms=250),
        RateLimit(bandwidth=5_000_000, refill_time_ms=2000, burst=1),
    ):
        bucket = config.token_bucket(limit)
        assert bucket is not None
        check("TokenBucket", bucket)
        assert bucket["size"] * 1000 // bucket["refill_time"] == limit.bandwidth
        assert bucket.get("one_time_burst", 0) == limit.burst


def test_token_bucket_never_turns_a_tiny_limit_into_no_limit() -> None:
    bucket = config.token_bucket(RateLimit(bandwidth=3, refill_time_ms=10))
    assert bucket == {"size": 1, "refill_time": 10}  # size 0 would mean unlimited
    assert config.token_bucket(RateLimit(bandwidth=0)) is None
    assert config.rate_limiter(None) is None


def test_entropy_logger_metrics_and_serial() -> None:
    files = launch().files
    check("EntropyDevice", config.entropy())
    logger = config.logger(files)
    assert logger == {"log_path": "/run/firecracker.log", "level": "Warning"}
    check("Logger", logger)
    metrics = config.metrics(files)
    assert metrics == {"metrics_path": "/run/metrics.fifo"}
    check("Metrics", metrics)
    serial = config.serial(files)
    assert serial == {"serial_out_path": "/run/console.log"}
    check("SerialDevice", serial)


@pytest.mark.parametrize(
    ("vm_id", "expected"),
    [
        ("vm-0123456789abcdef", "vm-0123456789abcdef"),
        ("a" * 64, "a" * 64),
        ("my_vm.1", "my-vm-1"),
        ("x" * 80, "x" * 64),
        ("", "vm"),
    ],
)
def test_instance_id_follows_firecrackers_rule(vm_id: str, expected: str) -> None:
    result = config.instance_id(vm_id)
    assert result == expected
    assert re.fullmatch(r"[A-Za-z0-9-]{1,64}", result)
