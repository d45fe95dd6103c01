"""The local asset store (a security boundary: no host file may be resolved), plus the guest
builder's and kernel-argument helpers' pure parts. No root, no network, no QEMU."""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import os
import shutil
import stat
import struct
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from metald.assets import guest_builder as gb
from metald.assets.store import (
    LocalAssetStore,
    NoDefaultImage,
    asset_id_for,
    is_asset_id,
)
from metald.cli.assets import STORE_ENV
from metald.cli.main import app
from metald.core.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from metald.core.guest import GuestArgs, kernel_command_line
from metald.core.ports import Assets
from metald.host.cpu import host_tsc_khz

SECRET = "s3cr3t-host-dir"


def _file(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.fixture
def store(tmp_path: Path) -> LocalAssetStore:
    return LocalAssetStore(tmp_path / "store")


# -- adding and reading --------------------------------------------------------------------


def test_implements_the_assets_port(store: LocalAssetStore) -> None:
    port: Assets = store  # checked by mypy
    assert callable(port.resolve) and callable(port.default_boot) and callable(port.ping)


def test_add_file_is_content_addressed(store: LocalAssetStore, tmp_path: Path) -> None:
    src = _file(tmp_path / "k", b"kernel bytes")
    asset = store.add_file(src, "kernel", "my kernel")
    sha = hashlib.sha256(b"kernel bytes").hexdigest()
    assert asset.sha256 == sha
    assert asset.id == f"sha256-{sha[:16]}" == asset_id_for(sha)
    assert is_asset_id(asset.id)
    assert asset.kind == "kernel" and asset.name == "my kernel" and asset.size == 12
    assert asset.path == store.root / "blobs" / "sha256" / sha
    assert asset.path.read_bytes() == b"kernel bytes"
    assert stat.S_IMODE(asset.path.stat().st_mode) == 0o444
    meta = json.loads((store.root / "assets" / f"{asset.id}.json").read_text())
    assert meta == {
        "id": asset.id,
        "kind": "kernel",
        "sha256": sha,
        "size": 12,
        "name": "my kernel",
        "created_at": asset.created_at,
    }
    assert store.get(asset.id) == asset
    assert list((store.root / "tmp").iterdir()) == []


def test_add_file_is_idempotent(store: LocalAssetStore, tmp_path: Path) -> None:
    a = store.add_file(_file(tmp_path / "a", b"same"), "disk", "first")
    b = store.add_file(_file(tmp_path / "b", b"same"), "disk", "second")
    assert a == b and b.name == "first"
    assert len(list(store.blobs_dir.iterdir())) == 1
    c = store.add_file(_file(tmp_path / "c", b"other"), "rootfs", "third")
    assert c.id != a.id
    assert [x.id for x in store.list()] == [a.id, c.id]
    assert list((store.root / "tmp").iterdir()) == []


def test_add_file_concurrently(store: LocalAssetStore, tmp_path: Path) -> None:
    src = _file(tmp_path / "a", os.urandom(1 << 16))
    results = []

    def add() -> None:
        results.append(store.add_file(src, "disk", "x"))

    threads = [threading.Thread(target=add) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({r.id for r in results}) == 1 and len(results) == 8
    assert len(list(store.blobs_dir.iterdir())) == 1


@pytest.mark.parametrize(
    ("kind", "name", "field"),
    [("bogus", "x", "kind"), ("kernel", "", "name"), ("kernel", "a\nb", "name")],
)
def test_add_file_checks_kind_and_name(
    store: LocalAssetStore, tmp_path: Path, kind: str, name: str, field: str
) -> None:
    with pytest.raises(InvalidArgument) as err:
        store.add_file(_file(tmp_path / "a", b"x"), kind, name)
    assert err.value.field == field


def test_add_missing_file_leaves_nothing(store: LocalAssetStore, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        store.add_file(tmp_path / "nope", "disk", "x")
    assert list((store.root / "tmp").iterdir()) == []
    assert store.list() == []


def test_get_unknown_and_malformed(store: LocalAssetStore) -> None:
    with pytest.raises(NotFound):
        store.get("sha256-0123456789abcdef")
    with pytest.raises(InvalidArgument):
        store.get("../../etc/passwd")
    assert store.list() == []


def test_corrupt_metadata_is_reported(store: LocalAssetStore, tmp_path: Path) -> None:
    a = store.add_file(_file(tmp_path / "a", b"x"), "disk", "x")
    (store.meta_dir / f"{a.id}.json").write_text("{not json")
    with pytest.raises(Unavailable):
        store.get(a.id)


# -- the default guest ---------------------------------------------------------------------


def _kernel_and_initrd(store: LocalAssetStore, tmp_path: Path) -> tuple[str, str]:
    k = store.add_file(_file(tmp_path / "k", b"K"), "kernel", "k")
    i = store.add_file(_file(tmp_path / "i", b"I"), "initrd", "i")
    return k.id, i.id


def test_default_boot(store: LocalAssetStore, tmp_path: Path) -> None:
    k, i = _kernel_and_initrd(store, tmp_path)
    store.set_default(k, i, recipe="r1", info={"kernel_version": "6.1"})
    kernel, initrd = store.default_boot()
    assert kernel.read_bytes() == b"K" and initrd is not None and initrd.read_bytes() == b"I"
    d = store.default()
    assert d is not None and d.recipe == "r1" and d.info == {"kernel_version": "6.1"}
    store.set_default(k, None)
    assert store.default_boot() == (kernel, None)


def test_no_default_tells_the_operator_what_to_run(store: LocalAssetStore) -> None:
    with pytest.raises(NoDefaultImage) as err:
        store.default_boot()
    assert isinstance(err.value, FailedPrecondition)
    assert "metald assets build" in err.value.message


def test_default_with_missing_blob(store: LocalAssetStore, tmp_path: Path) -> None:
    k, i = _kernel_and_initrd(store, tmp_path)
    store.set_default(k, i)
    blob = store.get(k).path
    blob.chmod(0o644)
    blob.unlink()
    with pytest.raises(NoDefaultImage) as err:
        store.default_boot()
    assert "metald assets build" in err.value.message


def test_set_default_checks_ids_and_kinds(store: LocalAssetStore, tmp_path: Path) -> None:
    k, i = _kernel_and_initrd(store, tmp_path)
    with pytest.raises(InvalidArgument) as err:
        store.set_default(i, k)
    assert err.value.field == "kernel_id"
    with pytest.raises(InvalidArgument) as err:
        store.set_default(k, "sha256-0000000000000000")
    assert err.value.field == "initrd_id"
    assert store.default() is None


def test_malformed_default_record(store: LocalAssetStore, tmp_path: Path) -> None:
    _kernel_and_initrd(store, tmp_path)
    store.default_file.write_text("[]")
    with pytest.raises(NoDefaultImage):
        store.default_boot()


# -- ping ----------------------------------------------------------------------------------


def test_ping(store: LocalAssetStore, tmp_path: Path) -> None:
    with pytest.raises(Unavailable):
        store.ping()
    store.root.mkdir()
    store.ping()
    f = _file(tmp_path / "file", b"")
    with pytest.raises(Unavailable):
        LocalAssetStore(f).ping()


# -- resolve: the security boundary --------------------------------------------------------


@pytest.fixture
def populated(tmp_path: Path) -> Iterator[tuple[LocalAssetStore, str, Path]]:
    """A store with one asset, a user file, and hostile symlinks; and a secret dir outside."""
    secret_dir = tmp_path / SECRET
    _file(secret_dir / "shadow", b"root:$6$...")
    store = LocalAssetStore(tmp_path / "store")
    asset = store.add_file(_file(tmp_path / "src", b"kernel"), "kernel", "k")
    _file(store.root / "images" / "disk.img", b"disk")
    (store.root / "images" / "link-inside").symlink_to("disk.img")
    (store.root / "images" / "link-outside").symlink_to(secret_dir / "shadow")
    (store.root / "images" / "dir-outside").symlink_to(secret_dir)
    (store.root / "images" / "dangling-outside").symlink_to(secret_dir / "missing")
    (store.root / "images" / "loop").symlink_to("loop")
    (store.root / "images" / "subdir").mkdir()
    # A sibling whose name starts with the store's: a naive prefix check would accept it.
    _file(tmp_path / "store2" / "x.img", b"sibling")
    yield store, asset.id, tmp_path


def test_resolve_accepts_ids_and_paths_inside(populated: tuple[LocalAssetStore, str, Path]) -> None:
    store, asset_id, _ = populated
    real = Path(os.path.realpath(store.root))
    blob = store.resolve("f", asset_id)
    assert blob.read_bytes() == b"kernel" and blob.is_relative_to(real)
    disk = real / "images" / "disk.img"
    assert store.resolve("f", "images/disk.img") == disk
    assert store.resolve("f", "./images//disk.img") == disk
    assert store.resolve("f", str(store.root / "images" / "disk.img")) == disk
    assert store.resolve("f", "images/link-inside") == disk
    assert store.resolve("f", f"blobs/sha256/{store.get(asset_id).sha256}") == blob


def test_resolve_through_a_symlinked_root(populated: tuple[LocalAssetStore, str, Path]) -> None:
    store, asset_id, tmp_path = populated
    (tmp_path / "alias").symlink_to(store.root)
    aliased = LocalAssetStore(tmp_path / "alias")
    real = Path(os.path.realpath(store.root))
    assert aliased.resolve("f", asset_id).is_relative_to(real)
    assert aliased.resolve("f", str(tmp_path / "alias/images/disk.img")) == (
        real / "images/disk.img"
    )
    assert aliased.resolve("f", str(store.root / "images/disk.img")) == real / "images/disk.img"


BAD_REFERENCES = [
    ("", "must name an asset id"),
    ("/etc/shadow", "outside the asset store"),
    ("/etc/passwd", "outside the asset store"),
    ("/etc/does-not-exist", "outside the asset store"),  # same answer: no existence oracle
    ("../x", "'..'"),
    ("images/../../x", "'..'"),
    ("/etc/../etc/passwd", "'..'"),
    ("..", "'..'"),
    ("images/link-outside", "resolves outside"),
    ("images/dir-outside/shadow", "resolves outside"),
    ("images/dangling-outside", "resolves outside"),
    ("images/loop", "cannot be read"),
    ("images/subdir", "not a regular file"),
    ("images", "not a regular file"),
    (".", "not a regular file"),
    ("blobs/sha256", "not a regular file"),
    ("images/missing.img", "no such file"),
    ("images/disk.img/x", "no such file"),
    ("images/disk.img\x00", "NUL"),
    ("\x00", "NUL"),
    ("sha256-0123456789abcdef", "no asset with id"),
    ("sha256-xyz", "not a valid asset id"),
    ("\ud800", "not a valid path"),
    ("/", "outside the asset store"),
    ("/proc/self/root/etc/shadow", "outside the asset store"),
]


@pytest.mark.parametrize(("reference", "reason"), BAD_REFERENCES)
def test_resolve_refuses(
    populated: tuple[LocalAssetStore, str, Path], reference: str, reason: str
) -> None:
    store, _, tmp_path = populated
    with pytest.raises(InvalidArgument) as err:
        store.resolve("config.boot.kernel_path", reference)
    assert err.value.field == "config.boot.kernel_path"
    assert reason in err.value.message
    assert err.value.message.startswith("config.boot.kernel_path: ")
    # Never a host path in the answer: not the store's, not the symlink targets'.
    assert SECRET not in err.value.message
    assert str(tmp_path) not in err.value.message


def test_resolve_refuses_sibling_prefix_and_absolute_paths_outside(
    populated: tuple[LocalAssetStore, str, Path],
) -> None:
    store, _, tmp_path = populated
    for ref in (
        str(tmp_path / "store2" / "x.img"),
        str(tmp_path / SECRET / "shadow"),
        str(tmp_path / "src"),
    ):
        with pytest.raises(InvalidArgument, match="outside the asset store"):
            store.resolve("f", ref)


def test_resolve_an_asset_whose_blob_is_gone(populated: tuple[LocalAssetStore, str, Path]) -> None:
    store, asset_id, _ = populated
    blob = store.get(asset_id).path
    blob.chmod(0o644)
    blob.unlink()
    with pytest.raises(InvalidArgument, match="missing"):
        store.resolve("f", asset_id)


def test_resolve_a_blob_replaced_by_a_symlink_out(
    populated: tuple[LocalAssetStore, str, Path],
) -> None:
    store, asset_id, tmp_path = populated
    blob = store.get(asset_id).path
    blob.chmod(0o644)
    blob.unlink()
    blob.symlink_to(tmp_path / SECRET / "shadow")
    with pytest.raises(InvalidArgument) as err:
        store.resolve("f", asset_id)
    assert SECRET not in err.value.message


def test_resolve_when_the_root_is_gone(tmp_path: Path) -> None:
    with pytest.raises(Unavailable):
        LocalAssetStore(tmp_path / "none").resolve("f", "x")


# Path components that matter in the populated store, and junk; drawn mostly from the first.
_PARTS = st.sampled_from(
    [
        "images", "disk.img", "link-inside", "link-outside", "dir-outside", "dangling-outside",
        "loop", "subdir", "shadow", "missing", SECRET, "store", "store2", "x.img", "blobs",
        "sha256", "assets", "..", ".", "",
    ]
)  # fmt: skip
_JUNK = st.sampled_from(
    ["\x00", "~", "*", " ", "\n", "%2e%2e", "\\..", "..\\", "\udcff", "\ud800", "etc", "passwd"]
) | st.text(max_size=6)


@st.composite
def _references(draw: st.DrawFn) -> str:
    prefix = draw(
        st.sampled_from(["", "", "", "/", "./", "//", "ROOT/", "ROOT/", "TMP/", "/proc/self/cwd/"])
    )
    if draw(st.booleans()):  # mostly the store's own (hostile) entries, a little varied
        head = draw(st.sampled_from(["images/", "./images/", "images//", "blobs/sha256/", ""]))
        parts = [draw(_PARTS), *draw(st.lists(_PARTS | _JUNK, max_size=2))]
        return prefix + head + "/".join(parts)
    return prefix + "/".join(draw(st.lists(_PARTS | _PARTS | _JUNK, max_size=6)))


@settings(
    max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(raw=_references())
def test_resolve_never_escapes(populated: tuple[LocalAssetStore, str, Path], raw: str) -> None:
    store, _, tmp_path = populated
    ref = raw.replace("ROOT/", str(store.root) + "/", 1).replace("TMP/", str(tmp_path) + "/", 1)
    real_root = os.path.realpath(store.root)
    try:
        got = store.resolve("f", ref)
    except InvalidArgument as err:
        assert err.field == "f"
        # Nothing the caller did not send: the secret dir only if it was in the reference.
        if SECRET not in ref:
            assert SECRET not in err.message
        if str(tmp_path) not in ref:
            assert str(tmp_path) not in err.message
        return
    assert got.is_absolute()
    assert str(got).startswith(real_root + "/")
    assert got.is_file() and not got.is_symlink()
    assert SECRET not in os.path.realpath(got)


# -- guest builder: pure parts -------------------------------------------------------------


def _elf64(sections: dict[str, bytes], *, notes: bytes = b"", machine: int = 0x3E) -> bytes:
    """A minimal little-endian ELF64 with the given sections and one PT_NOTE segment."""
    shstr = b"\x00" + b"".join(n.encode() + b"\x00" for n in [*sections, ".shstrtab"])
    body = b""
    offsets = {}
    base = 64 + 56  # ELF header + one program header
    for name, data in sections.items():
        offsets[name] = base + len(body)
        body += data
    note_off = base + len(body)
    body += notes
    shstr_off = base + len(body)
    body += shstr
    shoff = base + len(body)
    names = [*sections, ".shstrtab"]
    sh = b"\x00" * 64
    for n in names:
        name_idx = shstr.index(b"\x00" + n.encode() + b"\x00") + 1
        off = offsets.get(n, shstr_off)
        size = len(sections[n]) if n in sections else len(shstr)
        sh += struct.pack("<IIQQQQIIQQ", name_idx, 1, 0, 0, off, size, 0, 0, 1, 0)
    ident = b"\x7fELF\x02\x01\x01" + b"\x00" * 9
    hdr = ident + struct.pack(
        "<HHIQQQIHHHHHH", 2, machine, 1, 0, 64, shoff, 0, 64, 56, 1, 64, len(names) + 1,
        len(names),
    )  # fmt: skip
    ph = struct.pack("<IIQQQQQQ", 4, 4, note_off, 0, 0, len(notes), len(notes), 4)
    return hdr + ph + body + sh


def _note(name: bytes, ntype: int, desc: bytes) -> bytes:
    def pad(b: bytes) -> bytes:
        return b + b"\x00" * (-len(b) % 4)

    return struct.pack("<III", len(name), len(desc), ntype) + pad(name) + pad(desc)


PVH_NOTE = _note(b"Xen\x00", 18, b"\x00\x10\x00\x01")


def _bzimage(payload: bytes, setup_sects: int = 3) -> bytes:
    setup = bytearray((setup_sects + 1) * 512)
    setup[0x1F1] = setup_sects
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<II", setup, 0x248, 16, len(payload))
    return bytes(setup) + b"\x00" * 16 + payload + b"trailing"


def test_vmlinux_from_a_gzip_bzimage() -> None:
    elf = _elf64({".text": b"\x90" * 100}, notes=_note(b"GNU\x00", 1, b"1234") + PVH_NOTE)
    assert gb.bzimage_to_vmlinux(_bzimage(gzip.compress(elf))) == elf


@pytest.mark.skipif(shutil.which("lz4") is None, reason="lz4 is not installed")
def test_vmlinux_from_an_lz4_legacy_bzimage() -> None:
    elf = _elf64({".text": os.urandom(3000)}, notes=PVH_NOTE)
    lz = subprocess.run(["lz4", "-l", "-c"], input=elf, capture_output=True, check=True).stdout
    payload = lz + struct.pack("<I", len(elf))  # as the kernel build appends it
    assert gb.bzimage_to_vmlinux(_bzimage(payload, setup_sects=0x27)) == elf


def test_vmlinux_checks() -> None:
    with pytest.raises(gb.GuestBuildError, match="not a bzImage"):
        gb.bzimage_to_vmlinux(b"\x00" * 4096)
    with pytest.raises(gb.GuestBuildError, match="unknown compression"):
        gb.bzimage_to_vmlinux(_bzimage(b"\x00" * 64))
    with pytest.raises(gb.GuestBuildError, match="PVH"):
        gb.check_vmlinux(_elf64({".text": b"\x90"}, notes=_note(b"GNU\x00", 1, b"x")))
    with pytest.raises(gb.GuestBuildError, match="x86-64"):
        gb.check_vmlinux(_elf64({".text": b"\x90"}, notes=PVH_NOTE, machine=0xB7))
    with pytest.raises(gb.GuestBuildError, match="ELF"):
        gb.check_vmlinux(b"MZ" + b"\x00" * 100)


def _module(depends: str) -> bytes:
    info = b"license=GPL\x00" + f"depends={depends}".encode() + b"\x00vermagic=6.1\x00"
    return _elf64({".text": b"\xc3", ".modinfo": info})


def test_module_depends() -> None:
    assert gb.module_depends(_module("virtio,virtio_ring")) == ["virtio", "virtio_ring"]
    assert gb.module_depends(_module("")) == []
    assert gb.module_depends(_module("virtio-rng")) == ["virtio_rng"]


def test_collect_modules_orders_dependencies_first(tmp_path: Path) -> None:
    d = tmp_path / "lib/modules/6.1/kernel"
    _file(d / "drivers/net/virtio_net.ko", _module("virtio,virtio_ring,net_failover"))
    _file(d / "drivers/net/net_failover.ko", _module("failover"))
    _file(d / "net/core/failover.ko", _module(""))
    _file(d / "drivers/virtio/virtio.ko", _module(""))
    _file(d / "drivers/virtio/virtio_ring.ko", _module("virtio"))
    _file(d / "drivers/char/virtio-rng.ko.xz", lzma.compress(_module("virtio,virtio_ring")))
    got = gb.collect_modules(tmp_path / "lib/modules/6.1", ["virtio_net", "virtio_rng"])
    names = [n for n, _ in got]
    assert sorted(names) == sorted(
        ["virtio", "virtio_ring", "failover", "net_failover", "virtio_net", "virtio_rng"]
    )
    for name, _ in got:
        assert all(
            names.index(dep) < names.index(name) for dep in gb.module_depends(dict(got)[name])
        )
    assert dict(got)["virtio_rng"] == _module("virtio,virtio_ring")
    with pytest.raises(gb.GuestBuildError, match="not in the kernel package"):
        gb.collect_modules(tmp_path / "lib/modules/6.1", ["virtio_blk"])


def test_recipe_names_the_init_script() -> None:
    assert gb.recipe_id().startswith(f"v{gb.RECIPE_VERSION}-")
    assert gb.recipe_id() == gb.recipe_id()
    assert gb.init_script().startswith(b"#!/bin/sh\n")


@pytest.mark.skipif(shutil.which("busybox") is None, reason="busybox is not installed")
def test_init_script_parses_under_busybox_sh(tmp_path: Path) -> None:
    script = _file(tmp_path / "init", gb.init_script())
    subprocess.run(["busybox", "sh", "-n", str(script)], check=True)


def test_missing_tool_names_the_package() -> None:
    with pytest.raises(gb.GuestBuildError, match="install the Debian package"):
        gb._run(["metald-no-such-tool-xyz"])


def test_build_is_a_no_op_when_the_default_matches(store: LocalAssetStore, tmp_path: Path) -> None:
    k, i = _kernel_and_initrd(store, tmp_path)
    store.set_default(k, i, recipe=gb.recipe_id(), info={"kernel_version": "6.1"})
    steps: list[tuple[str, int, int]] = []
    got = gb.build_default_guest(store, tmp_path / "work", lambda *a: steps.append(a))
    assert got.reused and got.kernel.id == k and got.initrd.id == i
    assert got.kernel_version == "6.1"
    assert steps == [("done", 6, 6)]
    assert not (tmp_path / "work").exists()


# -- kernel arguments ----------------------------------------------------------------------


def test_guest_args_render() -> None:
    args = GuestArgs(
        vm_id="vm-1",
        on_shutdown="reboot",
        ip4="10.1.0.2/24",
        gw4="10.1.0.1",
        ip6="fd00::2/64",
        gw6="fd00::1",
        dns=("8.8.8.8", "2606:4700:4700::1111"),
        mac="52:54:00:aa:bb:cc",
    ).render()
    assert args.split() == [
        "metald.vm_id=vm-1",
        "metald.ip4=10.1.0.2/24",
        "metald.gw4=10.1.0.1",
        "metald.ip6=fd00::2/64",
        "metald.gw6=fd00::1",
        "metald.mac=52:54:00:aa:bb:cc",
        "metald.dns=8.8.8.8,2606:4700:4700::1111",
        "metald.on_shutdown=reboot",
    ]
    assert GuestArgs().render() == ""
    for bad in ("a b", "x'y", "a\nb", 'q"'):
        with pytest.raises(ValueError):
            GuestArgs(vm_id=bad).render()
    with pytest.raises(ValueError):
        GuestArgs(on_shutdown="halt").render()


def test_kernel_command_line() -> None:
    line = kernel_command_line(GuestArgs(vm_id="v"), accel="tcg", tsc_khz=2596138)
    assert line == (
        "console=ttyS0 panic=-1 quiet sysctl.kernel.ctrl-alt-del=0 reboot=t "
        "tsc_early_khz=2596138 tsc=reliable metald.vm_id=v"
    )
    line = kernel_command_line(GuestArgs(vm_id="v"), accel="kvm", reboot="k", extra="x=1")
    assert (
        line
        == "console=ttyS0 panic=-1 quiet sysctl.kernel.ctrl-alt-del=0 reboot=k metald.vm_id=v x=1"
    )


def test_host_tsc_khz(tmp_path: Path) -> None:
    if Path("/sys/devices/system/cpu/cpu0/cpufreq").exists():
        pytest.skip("this host has cpufreq: cpu MHz is not the TSC rate here")
    info = _file(tmp_path / "cpuinfo", b"processor\t: 0\ncpu MHz\t\t: 2596.138\nflags\t: x\n")
    assert host_tsc_khz(info) == 2596138
    assert host_tsc_khz(_file(tmp_path / "none", b"processor\t: 0\n")) is None
    assert host_tsc_khz(tmp_path / "missing") is None


# -- the CLI -------------------------------------------------------------------------------


def test_cli_list_and_build_no_op(store: LocalAssetStore, tmp_path: Path) -> None:
    runner = CliRunner()
    empty = runner.invoke(app, ["assets", "list", "--store", str(store.root)])
    assert empty.exit_code == 0 and "metald assets build" in empty.output

    k, i = _kernel_and_initrd(store, tmp_path)
    store.set_default(k, i, recipe=gb.recipe_id(), info={"kernel_version": "6.1"})
    listed = runner.invoke(app, ["assets", "list", "--json"], env={STORE_ENV: str(store.root)})
    assert listed.exit_code == 0, listed.output
    data = json.loads(listed.output)
    assert data["default"]["kernel"] == k
    assert {a["id"]: a["role"] for a in data["assets"]} == {
        k: "default kernel",
        i: "default initrd",
    }

    built = runner.invoke(app, ["assets", "build", "--store", str(store.root), "--json"])
    assert built.exit_code == 0, built.output
    out = json.loads(built.stdout)
    assert out["reused"] is True and out["kernel"]["id"] == k and out["initrd"]["id"] == i

    table = runner.invoke(app, ["assets", "build", "--store", str(store.root)])
    assert table.exit_code == 0 and "already up to date" in table.output


def test_cli_add(store: LocalAssetStore, tmp_path: Path) -> None:
    src = _file(tmp_path / "disk.img", b"disk")
    args = ["assets", "add", str(src), "--kind", "disk", "--store", str(store.root), "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    added = json.loads(result.stdout)
    assert added["name"] == "disk.img" and store.get(added["id"]).kind == "disk"
    bad = CliRunner().invoke(app, [*args[:3], "--kind", "nope", "--store", str(store.root)])
    assert bad.exit_code == 1


@pytest.mark.parametrize("internal", ["default.json", "assets", "tmp", "cache"])
def test_resolve_refuses_the_stores_own_bookkeeping(tmp_path: Path, internal: str) -> None:
    from metald.assets.store import LocalAssetStore

    store = LocalAssetStore(tmp_path)
    target = tmp_path / internal
    if "." not in internal:
        target.mkdir(parents=True, exist_ok=True)
        target = target / "file.json"
    target.write_text("{}")
    with pytest.raises(InvalidArgument, match="is not an asset"):
        store.resolve("config.boot.kernel_path", str(target.relative_to(tmp_path)))
