"""The jail spec: JSON round trip, strict parsing and validation (no root, no I/O)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from metald.jailer import (
    CgroupSpec,
    DeviceNode,
    JailSpec,
    PlacedFile,
    Rlimit,
    SpecError,
    TapSpec,
)
from metald.jailer.spec import CPU_PERIOD_US, DEFAULT_DEVICES, DEFAULT_RLIMITS, MIB


def full_spec(**changes: object) -> JailSpec:
    fields: dict[str, object] = {
        "vm_id": "vm-1",
        "uid": 999,
        "gid": 995,
        "argv": ("/usr/bin/qemu-system-x86_64", "-S", "-kernel", "/vmlinux"),
        "backend": "qemu",
        "jail_base": "/srv/jailer",
        "netns": "vm-1",
        "tap": TapSpec("tap-12345678"),
        "files": (
            PlacedFile("/var/assets/k", "/vmlinux"),
            PlacedFile("/var/vms/disk0.img", "/disk0.img", read_only=False),
        ),
        "devices": (DeviceNode("/dev/kvm"), DeviceNode("/dev/net/tun", 0o660)),
        "host_paths": ("/usr/bin/qemu-system-x86_64", "/lib/x86_64-linux-gnu"),
        "writable_dirs": ("/run",),
        "cgroup": CgroupSpec.for_vm(memory_bytes=512 * MIB, vcpu_count=2),
        "rlimits": (Rlimit("NOFILE", 1024, 2048), Rlimit("CORE", 0, 0), Rlimit("FSIZE", -1, -1)),
        "env": {"LANG": "C"},
    }
    fields.update(changes)
    return JailSpec(**fields)  # type: ignore[arg-type]


def test_round_trip_of_a_full_spec() -> None:
    spec = full_spec()
    spec.validate()
    again = JailSpec.from_json(spec.to_json())
    assert again == spec
    assert again.to_json() == spec.to_json()


def test_defaults_survive_a_minimal_document() -> None:
    spec = JailSpec.from_json(json.dumps({"vm_id": "a", "uid": 5, "gid": 6, "argv": ["/vmm"]}))
    assert spec.devices == DEFAULT_DEVICES
    assert spec.rlimits == DEFAULT_RLIMITS
    assert spec.writable_dirs == ("/run",)
    assert spec.netns is None and spec.tap is None and spec.cgroup is None
    assert spec.jail_root == Path("/srv/jailer/qemu/a/root")
    spec.validate()


def test_paths() -> None:
    spec = full_spec(jail_base="/j", backend="firecracker", vm_id="abc", netns="ns1")
    assert spec.jail_dir == Path("/j/firecracker/abc")
    assert spec.jail_root == Path("/j/firecracker/abc/root")
    assert spec.host_path("/run/qmp.sock") == Path("/j/firecracker/abc/root/run/qmp.sock")
    assert spec.netns_path == "/run/netns/ns1"
    assert full_spec(netns="/proc/1/ns/net").netns_path == "/proc/1/ns/net"


def test_cgroup_limits_for_a_vm() -> None:
    cg = CgroupSpec.for_vm(memory_bytes=256 * MIB, vcpu_count=3, memory_allowance=64 * MIB)
    assert cg.memory_max == 320 * MIB
    assert (cg.cpu_quota_us, cg.cpu_period_us) == (3 * CPU_PERIOD_US, CPU_PERIOD_US)
    with pytest.raises(SpecError):
        CgroupSpec.for_vm(memory_bytes=0, vcpu_count=1)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"vm_id": ".."}, "vm_id"),
        ({"vm_id": "a/b"}, "vm_id"),
        ({"vm_id": "x" * 65}, "vm_id"),
        ({"backend": "Q/EMU"}, "backend"),
        ({"uid": 0}, "uid"),
        ({"gid": 0}, "gid"),
        ({"uid": 2**32 - 1}, "uid"),
        ({"uid": -1}, "uid"),
        ({"uid": True}, "uid"),
        ({"argv": ()}, "argv"),
        ({"argv": ("qemu",)}, "argv"),
        ({"jail_base": "relative"}, "jail_base"),
        ({"jail_base": "/"}, "jail_base"),
        ({"jail_base": "/srv/../etc"}, "jail_base"),
        ({"netns": "a/b"}, "netns"),
        ({"netns": ""}, "netns"),
        ({"tap": TapSpec("a-name-longer-than-15")}, "tap.name"),
        ({"tap": TapSpec("has space")}, "tap.name"),
        ({"tap": TapSpec("")}, "tap.name"),
        ({"files": (PlacedFile("relative", "/k"),)}, "files.source"),
        ({"files": (PlacedFile("/k", "/dev/k"),)}, "files.target"),
        ({"files": (PlacedFile("/k", "/run/k"),)}, "files.target"),
        ({"files": (PlacedFile("/k", "/lib/x86_64-linux-gnu/k"),)}, "files.target"),
        ({"files": (PlacedFile("/k", "/a"), PlacedFile("/l", "/a"))}, "files.target"),
        ({"files": (PlacedFile("/k", "/"),)}, "files.target"),
        ({"devices": (DeviceNode("/etc/passwd"),)}, "devices.path"),
        ({"devices": (DeviceNode("/dev/kvm", 0o4777),)}, "devices.mode"),
        ({"host_paths": ("/",)}, "host_paths"),
        ({"host_paths": ("/dev/sda",)}, "host_paths"),
        ({"host_paths": ("/run/x",)}, "host_paths"),
        ({"writable_dirs": ("/dev/shm",)}, "writable_dirs"),
        ({"writable_dirs": ("/",)}, "writable_dirs"),
        ({"cgroup": CgroupSpec(parent="../escape")}, "cgroup.parent"),
        ({"cgroup": CgroupSpec(parent="/")}, "cgroup.parent"),
        ({"cgroup": CgroupSpec(memory_max=0)}, "cgroup.memory_max"),
        ({"cgroup": CgroupSpec(cpu_period_us=10)}, "cgroup.cpu_period_us"),
        ({"rlimits": (Rlimit("NOPE", 1, 1),)}, "rlimits"),
        ({"rlimits": (Rlimit("NOFILE", 10, 5),)}, "rlimits"),
        ({"rlimits": (Rlimit("NOFILE", -1, 5),)}, "rlimits"),
        ({"env": {"A=B": "c"}}, "env"),
        ({"fail_at": "nowhere"}, "fail_at"),
    ],
)
def test_validation_names_the_field(changes: dict[str, object], field: str) -> None:
    with pytest.raises(SpecError, match=f"^{field}"):
        full_spec(**changes).validate()


@pytest.mark.parametrize(
    ("document", "where"),
    [
        ("[]", "spec"),
        ("{", "not JSON"),
        ('{"vm_id": "a", "uid": "5", "gid": 6, "argv": ["/v"]}', "spec.uid"),
        ('{"vm_id": "a", "uid": true, "gid": 6, "argv": ["/v"]}', "spec.uid"),
        ('{"vm_id": "a", "uid": 5, "gid": 6}', "spec.argv"),
        ('{"vm_id": "a", "uid": 5, "gid": 6, "argv": [1]}', "spec.argv"),
        ('{"vm_id": "a", "uid": 5, "gid": 6, "argv": ["/v"], "tap": "t"}', "spec.tap"),
        ('{"vm_id": "a", "uid": 5, "gid": 6, "argv": ["/v"], "files": [{}]}', "spec.files[0]"),
        ('{"vm_id": "a", "uid": 5, "gid": 6, "argv": ["/v"], "env": {"A": 1}}', "env"),
        (
            '{"vm_id": "a", "uid": 5, "gid": 6, "argv": ["/v"], "cgroup": {"required": 1}}',
            "spec.cgroup.required",
        ),
    ],
)
def test_parsing_is_strict(document: str, where: str) -> None:
    with pytest.raises(SpecError, match=where.replace("[", r"\[").replace("]", r"\]")):
        JailSpec.from_json(document)


_name = st.from_regex(r"[a-z0-9][a-z0-9_-]{0,11}", fullmatch=True)
_abs = st.lists(_name, min_size=1, max_size=4).map(lambda parts: "/" + "/".join(parts))


@st.composite
def specs(draw: st.DrawFn) -> JailSpec:
    return JailSpec(
        vm_id=draw(_name),
        uid=draw(st.integers(1, 2**32 - 2)),
        gid=draw(st.integers(1, 2**32 - 2)),
        argv=tuple(["/vmm", *draw(st.lists(st.text(max_size=20), max_size=5))]),
        backend=draw(st.sampled_from(["qemu", "firecracker"])),
        jail_base=draw(_abs),
        netns=draw(st.none() | _name | _abs),
        tap=draw(st.none() | st.builds(TapSpec, name=_name)),
        files=tuple(
            draw(
                st.lists(
                    st.builds(PlacedFile, source=_abs, target=_abs, read_only=st.booleans()),
                    max_size=3,
                )
            )
        ),
        devices=tuple(
            draw(st.lists(st.builds(DeviceNode, path=_name.map(lambda n: "/dev/" + n)), max_size=3))
        ),
        host_paths=tuple(draw(st.lists(_abs, max_size=3))),
        cgroup=draw(
            st.none()
            | st.builds(
                CgroupSpec,
                parent=_name,
                memory_max=st.none() | st.integers(1, 2**40),
                cpu_quota_us=st.none() | st.integers(1000, 10**7),
                pids_max=st.none() | st.integers(1, 10**5),
                required=st.booleans(),
            )
        ),
        rlimits=tuple(
            draw(
                st.lists(
                    st.builds(
                        Rlimit, name=st.sampled_from(["NOFILE", "CORE"]), soft=st.just(-1)
                    ).map(lambda r: Rlimit(r.name, 10, 20)),
                    max_size=2,
                )
            )
        ),
        env=draw(st.dictionaries(_name, st.text(max_size=10), max_size=3)),
        fail_at=draw(st.none() | st.sampled_from(["netns", "exec"])),
    )


@given(specs())
def test_any_spec_round_trips(spec: JailSpec) -> None:
    assert JailSpec.from_json(spec.to_json()) == spec
