"""Builds the default guest (kernel, initramfs, optional ext4 root) from Debian packages.

Steps (see notes/guests-on-this-machine.md for what was measured):

1. download   ``apt-cache depends linux-image-cloud-amd64`` names the versioned kernel
              package; ``apt-get download`` it and ``busybox-static`` into ``<store>/cache/debs``
              (reused when already there).
2. extract    ``dpkg-deb -x`` both.
3. vmlinux    the bzImage's setup header gives setup_sects (0x1f1), payload offset (0x248) and
              length (0x24c); the payload (LZ4 legacy frame in Debian's build) decompresses to
              the ELF ``vmlinux`` with a PVH entry note: QEMU microvm and Firecracker boot it.
4. modules    the virtio drivers are modules in that kernel; the ones in GUEST_MODULES and
              their dependencies (read from each module's .modinfo) are copied, decompressed,
              in load order.
5. initramfs  busybox-static with a symlink per applet, the modules, and ``guest-init.sh`` as
              ``/init``, packed with ``cpio -o -H newc`` and gzip. File times and owners are
              fixed, so the same inputs give the same bytes (and the same asset id).
6. rootfs     (optional) the same tree as an ext4 image made with ``mkfs.ext4 -d``.
7. register   all of it goes into the asset store, and becomes its default guest.

A second run is a no-op when the store's default was made by the same recipe
(:func:`recipe_id`: RECIPE_VERSION plus the hash of the init script and the module list).

The guest's init contract (also at the top of guest-init.sh):

Kernel command line: ``console=ttyS0`` (everything is printed on /dev/console), and optionally
``metald.vm_id=<id>`` (hostname; echoed in READY), ``metald.on_shutdown=reboot`` (end with
``reboot -f`` instead of ``poweroff -f``: Firecracker exits on a guest reset), ``metald.ip4=
<addr/prefix>``, ``metald.gw4=<ip>``, ``metald.ip6=<addr/prefix>``, ``metald.gw6=<ip>``,
``metald.dns=<ip,ip>``, ``metald.mac=<mac>`` (which interface; else eth0),
``metald.root=<device>`` (mount that ext4 device and switch_root into it).

Console lines, each starting with ``METALD-GUEST``:
``NET <if> ip4=<..> ip6=<..>`` when a network was configured;
``READY vm=<id> boot=<uuid> uptime=<s> root=<initramfs|device>`` exactly once per boot, once
modules and network are up (boot= differs per boot); the prefix ``METALD-GUEST READY`` is the
contract, fields may be added at the end;
``HEARTBEAT <seq>`` every second after READY (seq 1, 2, ...; a paused VM shows a gap);
``SHUTDOWN`` when the shutdown path starts (Ctrl-Alt-Del, SIGINT or SIGTERM to PID 1), then
sync and power off (or reboot); ``ERROR <text>`` when something failed. PID 1 reaps zombies.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import importlib.resources
import lzma
import os
import pwd
import re
import shutil
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from metald.assets.store import Asset, LocalAssetStore
from metald.core.errors import MetaldError

# Bump when the build changes in a way the init-script hash does not show.
RECIPE_VERSION = 1

KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"

# Loaded in dependency order; their own dependencies are added automatically.
GUEST_MODULES: tuple[str, ...] = (
    "virtio",
    "virtio_ring",
    "virtio_mmio",
    "virtio_pci",
    "failover",
    "net_failover",
    "virtio_net",
    "virtio_blk",
    "virtio_console",
    "virtio_rng",
)

ROOTFS_SIZE_MB = 64
# Fixed so the same inputs give byte-identical images (and so the same asset ids).
_FIXED_MTIME = 1_700_000_000
_ROOTFS_UUID = "6d657461-6c64-4000-8000-726f6f746673"

STEPS: tuple[str, ...] = (
    "download",
    "extract",
    "vmlinux",
    "modules",
    "initramfs",
    "rootfs",
    "register",
)

# Which Debian package provides each external tool, for the error message when one is missing.
_TOOL_PACKAGES = {
    "apt-cache": "apt",
    "apt-get": "apt",
    "dpkg-deb": "dpkg",
    "lz4": "lz4",
    "cpio": "cpio",
    "mkfs.ext4": "e2fsprogs",
    "debugfs": "e2fsprogs",
    "zstd": "zstd",
}

Progress = Callable[[str, int, int], None]


class GuestBuildError(Exception):
    """The guest could not be built; the message says what to install or fix."""


@dataclass(frozen=True)
class BuiltGuest:
    kernel: Asset
    initrd: Asset
    rootfs: Asset | None
    recipe: str
    kernel_package: str
    kernel_version: str
    modules: tuple[str, ...]
    reused: bool  # True when the store already had this recipe's guest and nothing was done
    seconds: float = 0.0
    info: dict[str, object] = field(default_factory=dict)


def init_script() -> bytes:
    """The guest's /init (package data)."""
    return importlib.resources.files("metald.assets").joinpath("guest-init.sh").read_bytes()


def recipe_id() -> str:
    """Names how the kernel and initrd are made; a change triggers a rebuild."""
    h = hashlib.sha256()
    h.update(init_script())
    h.update("\n".join(GUEST_MODULES).encode())
    return f"v{RECIPE_VERSION}-{h.hexdigest()[:12]}"


# -- running tools --------------------------------------------------------------------------


def _run(
    args: Sequence[str],
    *,
    cwd: Path | None = None,
    input: bytes | None = None,
    env: dict[str, str] | None = None,
) -> bytes:
    """Run a tool, check it succeeded and return its stdout; errors say what to install."""
    tool = args[0]
    try:
        proc = subprocess.run(
            list(args),
            cwd=cwd,
            input=input,
            capture_output=True,
            check=False,
            env=None if env is None else {**os.environ, **env},
        )
    except FileNotFoundError:
        pkg = _TOOL_PACKAGES.get(tool, tool)
        raise GuestBuildError(
            f"`{tool}` is not installed: install the Debian package {pkg} (apt-get install {pkg})"
        ) from None
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip().splitlines()[-5:]
        raise GuestBuildError(
            f"`{' '.join(args)}` failed (exit {proc.returncode}): " + " / ".join(err)
        )
    return proc.stdout


# -- step 1: download ----------------------------------------------------------------------


def kernel_package_name(meta_package: str = KERNEL_META_PACKAGE) -> str:
    """The versioned kernel package the meta package depends on (linux-image-6.1.0-N-...)."""
    try:
        out = _run(["apt-cache", "depends", meta_package]).decode()
    except GuestBuildError as exc:
        raise GuestBuildError(
            f"apt does not know {meta_package} (run `apt-get update` first?): {exc}"
        ) from None
    for line in out.splitlines():
        m = re.match(r"\s*Depends:\s*(linux-image-\d\S*)", line)
        if m:
            return m.group(1)
    raise GuestBuildError(f"`apt-cache depends {meta_package}` names no versioned kernel package")


def download_package(package: str, cache_dir: Path) -> Path:
    """The .deb of ``package`` in ``cache_dir``, downloaded with apt-get when not there yet."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    found = sorted(cache_dir.glob(f"{package}_*.deb"))
    if found:
        return found[-1]
    with tempfile.TemporaryDirectory(prefix=".dl-", dir=cache_dir) as tmp:
        # Run as root, apt downloads as the _apt user: let that user (only) write here.
        if os.geteuid() == 0:
            with contextlib.suppress(KeyError, OSError):
                os.chown(tmp, pwd.getpwnam("_apt").pw_uid, -1)
        try:
            _run(["apt-get", "download", "-q", package], cwd=Path(tmp))
        except GuestBuildError as exc:
            raise GuestBuildError(
                f"cannot download the Debian package {package} (is the apt index current? "
                f"run `apt-get update`): {exc}"
            ) from None
        debs = sorted(Path(tmp).glob(f"{package}_*.deb"))
        if not debs:
            raise GuestBuildError(f"apt-get download {package} produced no .deb")
        target = cache_dir / debs[-1].name
        os.replace(debs[-1], target)
        return target


# -- step 3: vmlinux -----------------------------------------------------------------------


def bzimage_to_vmlinux(bzimage: bytes) -> bytes:
    """The ELF vmlinux inside a bzImage (LZ4, gzip, xz or zstd payload)."""
    if len(bzimage) < 0x250 or bzimage[0x202:0x206] != b"HdrS":
        raise GuestBuildError("the kernel image is not a bzImage (no HdrS setup header)")
    setup_sects = bzimage[0x1F1] or 4
    payload_offset, payload_length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sects + 1) * 512 + payload_offset
    payload = bzimage[start : start + payload_length]
    if len(payload) != payload_length or payload_length < 8:
        raise GuestBuildError("the bzImage's payload is truncated")
    # The kernel build appends the uncompressed size (le32) to LZ4, xz and zstd payloads.
    size = struct.unpack("<I", payload[-4:])[0]
    if payload.startswith(b"\x02\x21\x4c\x18"):  # LZ4 legacy frame
        vmlinux = _run(["lz4", "-dc"], input=payload[:-4])
    elif payload.startswith(b"\x1f\x8b"):
        vmlinux = gzip.decompress(payload)
        size = len(vmlinux)
    elif payload.startswith(b"\xfd7zXZ\x00"):
        vmlinux = lzma.LZMADecompressor().decompress(payload[:-4])
    elif payload.startswith(b"\x28\xb5\x2f\xfd"):
        vmlinux = _run(["zstd", "-dc"], input=payload[:-4])
    else:
        raise GuestBuildError(
            f"unknown compression of the bzImage payload (magic {payload[:6].hex()})"
        )
    if len(vmlinux) != size:
        raise GuestBuildError(
            f"the decompressed kernel has {len(vmlinux)} bytes, the bzImage says {size}"
        )
    check_vmlinux(vmlinux)
    return vmlinux


def check_vmlinux(data: bytes) -> None:
    """Raise unless ``data`` is an x86-64 ELF with a PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise GuestBuildError("the decompressed kernel is not a 64-bit little-endian ELF")
    (machine,) = struct.unpack_from("<H", data, 0x12)
    if machine != 0x3E:
        raise GuestBuildError("the decompressed kernel is not an x86-64 ELF")
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(phnum):
        p_type, _flags, p_offset, _va, _pa, p_filesz = struct.unpack_from(
            "<IIQQQQ", data, phoff + i * phentsize
        )
        if p_type != 4:  # PT_NOTE
            continue
        pos, end = p_offset, p_offset + p_filesz
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", data, pos)
            name = data[pos + 12 : pos + 12 + namesz].rstrip(b"\x00")
            if name == b"Xen" and ntype == 18:
                return
            pos += 12 + _align4(namesz) + _align4(descsz)
    raise GuestBuildError("the kernel has no PVH entry note (CONFIG_PVH): microVMs cannot boot it")


def _align4(n: int) -> int:
    return (n + 3) & ~3


# -- step 4: modules -----------------------------------------------------------------------

_MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")


def _module_name(filename: str) -> str | None:
    for suffix in _MODULE_SUFFIXES:
        if filename.endswith(suffix):
            return filename[: -len(suffix)].replace("-", "_")
    return None


def read_module(path: Path) -> bytes:
    """A kernel module's ELF bytes, decompressed if it is .ko.xz/.ko.zst/.ko.gz."""
    raw = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(raw)
    if path.name.endswith(".gz"):
        return gzip.decompress(raw)
    if path.name.endswith(".zst"):
        return _run(["zstd", "-dc"], input=raw)
    return raw


def module_depends(elf: bytes) -> list[str]:
    """The ``depends=`` of a module, read from its .modinfo section."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2:
        raise GuestBuildError("a kernel module is not a 64-bit ELF")
    (shoff,) = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, offset, size = struct.unpack_from(
            "<IIQQQQ", elf, shoff + i * shentsize
        )
        return name, offset, size

    _n, str_off, _s = section(shstrndx)
    for i in range(shnum):
        name_off, offset, size = section(i)
        end = elf.index(b"\x00", str_off + name_off)
        if elf[str_off + name_off : end] == b".modinfo":
            for entry in elf[offset : offset + size].split(b"\x00"):
                if entry.startswith(b"depends="):
                    deps = entry[len(b"depends=") :].decode()
                    return [d.replace("-", "_") for d in deps.split(",") if d]
            return []
    return []


def collect_modules(modules_root: Path, wanted: Iterable[str]) -> list[tuple[str, bytes]]:
    """The wanted modules and their dependencies, in load order: [(name, elf bytes)]."""
    index: dict[str, Path] = {}
    for dirpath, _dirs, files in os.walk(modules_root):
        for f in files:
            name = _module_name(f)
            if name is not None:
                index.setdefault(name, Path(dirpath) / f)
    loaded: dict[str, bytes] = {}
    order: list[str] = []

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in order:
            return
        if name in chain:
            raise GuestBuildError(f"kernel modules depend on each other in a cycle: {chain}")
        if name not in index:
            raise GuestBuildError(f"kernel module {name} is not in the kernel package")
        if name not in loaded:
            loaded[name] = read_module(index[name])
        for dep in module_depends(loaded[name]):
            visit(dep, (*chain, name))
        order.append(name)

    for name in wanted:
        visit(name.replace("-", "_"), ())
    return [(n, loaded[n]) for n in order]


# -- step 5/6: images ----------------------------------------------------------------------


_TREE_DIRS = (
    "bin",
    "sbin",
    "usr/bin",
    "usr/sbin",
    "dev",
    "proc",
    "sys",
    "tmp",
    "run",
    "root",
    "newroot",
    "etc/metald",
    "lib/metald-modules",
)


def make_tree(
    tree: Path,
    busybox: Path,
    modules: Sequence[tuple[str, bytes]],
    recipe: str,
) -> None:
    """The guest's file tree: busybox and its applet links, modules, /init, /etc."""
    for d in _TREE_DIRS:
        (tree / d).mkdir(parents=True, exist_ok=True)
    os.chmod(tree / "tmp", 0o1777)
    shutil.copyfile(busybox, tree / "bin/busybox")
    os.chmod(tree / "bin/busybox", 0o755)
    applets = _run([str(tree / "bin/busybox"), "--list-full"]).decode().split()
    for applet in applets:
        link = tree / applet
        if applet == "bin/busybox" or link.exists() or link.is_symlink():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to("/bin/busybox")
    if not (tree / "bin/sh").is_symlink():
        raise GuestBuildError("busybox has no sh applet")
    for name, elf in modules:
        (tree / "lib/metald-modules" / f"{name}.ko").write_bytes(elf)
    (tree / "etc/metald/modules").write_text("".join(f"{n}\n" for n, _ in modules))
    (tree / "etc/metald/recipe").write_text(recipe + "\n")
    (tree / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (tree / "etc/group").write_text("root:x:0:\n")
    (tree / "etc/hostname").write_text("metald-guest\n")
    (tree / "init").write_bytes(init_script())
    os.chmod(tree / "init", 0o755)


def _tree_entries(tree: Path) -> list[str]:
    """Every path in the tree, relative, sorted, with fixed modification times."""
    entries = []
    for dirpath, dirs, files in os.walk(tree):
        for n in dirs + files:
            p = Path(dirpath) / n
            entries.append(str(p.relative_to(tree)))
    for rel in [*entries, "."]:
        os.utime(tree / rel, (_FIXED_MTIME, _FIXED_MTIME), follow_symlinks=False)
    return sorted(entries)


def pack_initramfs(tree: Path, out: Path) -> None:
    """``cpio -o -H newc`` of the tree, owned by root, gzip-compressed, reproducible."""
    names = "\n".join(_tree_entries(tree)) + "\n"
    archive = _run(
        ["cpio", "-o", "-H", "newc", "--reproducible", "-R", "0:0", "--quiet"],
        cwd=tree,
        input=names.encode(),
    )
    if len(archive) < 1024:
        raise GuestBuildError("cpio produced an empty archive")
    out.write_bytes(gzip.compress(archive, compresslevel=9, mtime=0))


def make_rootfs(tree: Path, out: Path, size_mb: int = ROOTFS_SIZE_MB) -> None:
    """An ext4 image of the tree (``mkfs.ext4 -d``), byte-identical for identical trees."""
    (tree / "etc/metald/rootfs").write_text("this tree is the guest's root filesystem\n")
    entries = _tree_entries(tree)
    out.unlink(missing_ok=True)
    cmd = [
        "mkfs.ext4", "-q", "-F", "-L", "metald-root", "-U", _ROOTFS_UUID,
        "-E", f"root_owner=0:0,hash_seed={_ROOTFS_UUID}",
        "-d", str(tree), str(out), f"{size_mb}M",
    ]  # fmt: skip
    _run(cmd, env={"E2FSPROGS_FAKE_TIME": str(_FIXED_MTIME)})
    # mkfs copies each file's ctime, which cannot be set on the host: fix it in the image.
    script = "".join(f"sif /{e} ctime @{_FIXED_MTIME}\n" for e in ["", *entries])
    with tempfile.NamedTemporaryFile("w", suffix=".debugfs") as f:
        f.write(script)
        f.flush()
        _run(
            ["debugfs", "-w", "-f", f.name, str(out)],
            env={"E2FSPROGS_FAKE_TIME": str(_FIXED_MTIME)},
        )


# -- the whole build -----------------------------------------------------------------------


def existing_guest(store: LocalAssetStore, *, rootfs: bool = False) -> BuiltGuest | None:
    """The store's default guest if it was made by the current recipe (and has a rootfs when
    one is wanted) and its files are all there; else None."""
    try:
        default = store.default()
    except MetaldError:
        return None
    if default is None or default.recipe != recipe_id() or default.initrd is None:
        return None
    if rootfs and default.rootfs is None:
        return None
    try:
        store.default_boot()
        kernel = store.get(default.kernel)
        initrd = store.get(default.initrd)
        root = None
        if default.rootfs is not None:
            store.check("rootfs", default.rootfs, customer="")
            root = store.get(default.rootfs)
    except MetaldError:
        return None
    info = default.info
    return BuiltGuest(
        kernel=kernel,
        initrd=initrd,
        rootfs=root,
        recipe=default.recipe,
        kernel_package=str(info.get("kernel_package", "")),
        kernel_version=str(info.get("kernel_version", "")),
        modules=tuple(str(m) for m in info.get("modules", ())),
        reused=True,
        info=dict(info),
    )


def build_default_guest(
    store: LocalAssetStore,
    work_dir: Path,
    progress: Progress | None = None,
    *,
    rootfs: bool = False,
    force: bool = False,
) -> BuiltGuest:
    """Build the default guest into ``store`` (see the module docstring); ``work_dir`` holds
    scratch files and may be removed afterwards. A no-op when the store already has it."""
    started = time.monotonic()
    steps = [s for s in STEPS if rootfs or s != "rootfs"]
    total = len(steps)

    def step(name: str) -> None:
        if progress is not None:
            progress(name, steps.index(name), total)

    if not force:
        found = existing_guest(store, rootfs=rootfs)
        if found is not None:
            if progress is not None:
                progress("done", total, total)
            return found

    recipe = recipe_id()
    store.root.mkdir(parents=True, exist_ok=True)
    with store.locked(".build-lock"):
        if not force:  # someone else may have built it while we waited for the lock
            found = existing_guest(store, rootfs=rootfs)
            if found is not None:
                if progress is not None:
                    progress("done", total, total)
                return found

        step("download")
        debs_dir = store.cache_dir / "debs"
        kernel_pkg = kernel_package_name()
        kernel_deb = download_package(kernel_pkg, debs_dir)
        busybox_deb = download_package(BUSYBOX_PACKAGE, debs_dir)

        step("extract")
        work_dir.mkdir(parents=True, exist_ok=True)
        kdir, bdir = work_dir / "kernel-pkg", work_dir / "busybox-pkg"
        for d, deb in ((kdir, kernel_deb), (bdir, busybox_deb)):
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir()
            _run(["dpkg-deb", "-x", str(deb), str(d)])
        vmlinuz = sorted((kdir / "boot").glob("vmlinuz-*"))
        if not vmlinuz:
            raise GuestBuildError(f"{kernel_pkg} has no /boot/vmlinuz-*")
        kernel_version = vmlinuz[-1].name[len("vmlinuz-") :]
        busybox = bdir / "bin" / "busybox"
        if not busybox.is_file():
            raise GuestBuildError(f"{BUSYBOX_PACKAGE} has no /bin/busybox")

        step("vmlinux")
        vmlinux = work_dir / "vmlinux"
        vmlinux.write_bytes(bzimage_to_vmlinux(vmlinuz[-1].read_bytes()))

        step("modules")
        modules_root = next(
            (
                p
                for p in (kdir / "lib/modules" / kernel_version,
                          kdir / "usr/lib/modules" / kernel_version)
                if p.is_dir()
            ),
            None,
        )  # fmt: skip
        if modules_root is None:
            raise GuestBuildError(f"{kernel_pkg} has no modules for {kernel_version}")
        modules = collect_modules(modules_root, GUEST_MODULES)

        step("initramfs")
        tree = work_dir / "tree"
        shutil.rmtree(tree, ignore_errors=True)
        make_tree(tree, busybox, modules, recipe)
        initrd = work_dir / "initrd.gz"
        pack_initramfs(tree, initrd)

        rootfs_img: Path | None = None
        if rootfs:
            step("rootfs")
            rootfs_img = work_dir / "rootfs.ext4"
            make_rootfs(tree, rootfs_img)

        step("register")
        k = store.add_file(vmlinux, "kernel", f"vmlinux-{kernel_version}")
        i = store.add_file(initrd, "initrd", f"initrd-metald-{recipe}.gz")
        r = (
            store.add_file(rootfs_img, "rootfs", f"rootfs-metald-{recipe}.ext4")
            if rootfs_img is not None
            else None
        )
        info: dict[str, object] = {
            "kernel_package": kernel_pkg,
            "kernel_version": kernel_version,
            "busybox_package": busybox_deb.name,
            "modules": [n for n, _ in modules],
            "kernel_args": "console=ttyS0 reboot=t panic=-1 quiet",
        }
        store.set_default(k.id, i.id, rootfs_id=r.id if r else None, recipe=recipe, info=info)
        with contextlib.suppress(OSError):
            shutil.rmtree(work_dir / "kernel-pkg")
        if progress is not None:
            progress("done", total, total)
        return BuiltGuest(
            kernel=k,
            initrd=i,
            rootfs=r,
            recipe=recipe,
            kernel_package=kernel_pkg,
            kernel_version=kernel_version,
            modules=tuple(n for n, _ in modules),
            reused=False,
            seconds=time.monotonic() - started,
            info=info,
        )
