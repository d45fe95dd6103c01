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
from typing import Any

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
from metald.core.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    NotYours,
    Unavailable,
)
from metald.core.guest import GuestArgs, kernel_command_line
from metald.core.ports import Assets
from metald.host import files
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
        "owner": "",
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


def _resolve(store: LocalAssetStore, ref: str, customer: str = "alice", field: str = "f") -> Path:
    return store.resolve(field, ref, customer=customer)


def _same(a: Path, b: Path) -> bool:
    return files.same_file(os.stat(a), os.stat(b))


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
    (store.root / "linked-dir").symlink_to("images")
    # A sibling whose name starts with the store's: a naive prefix check would accept it.
    _file(tmp_path / "store2" / "x.img", b"sibling")
    yield store, asset.id, tmp_path


def test_resolve_accepts_ids_and_paths_inside(populated: tuple[LocalAssetStore, str, Path]) -> None:
    store, asset_id, _ = populated
    real = Path(os.path.realpath(store.root))
    pin = _resolve(store, asset_id)
    # What comes back is the pin: a second name of that very file, in the store's pins/.
    assert pin.parent == real / "pins" and _same(pin, store.get(asset_id).path)
    assert pin.read_bytes() == b"kernel"
    assert _resolve(store, f"blobs/sha256/{store.get(asset_id).sha256}") == pin
    disk = real / "images" / "disk.img"
    disk_pin = _resolve(store, "images/disk.img")
    assert _same(disk_pin, disk) and disk_pin.parent == real / "pins"
    for ref in ("./images//disk.img", str(store.root / "images" / "disk.img")):
        assert _resolve(store, ref) == disk_pin
    # One pin per file, however often and by whomever it is resolved.
    assert os.stat(disk).st_nlink == 2
    assert sorted(os.listdir(real / "pins")) == sorted(
        str(os.stat(p).st_ino) for p in (disk, store.get(asset_id).path)
    )
    assert stat.S_IMODE(os.stat(real / "pins").st_mode) == 0o700


def test_resolve_through_a_symlinked_root(populated: tuple[LocalAssetStore, str, Path]) -> None:
    """The root itself may be a symlink (it is the operator's setting); nothing below it."""
    store, asset_id, tmp_path = populated
    (tmp_path / "alias").symlink_to(store.root)
    aliased = LocalAssetStore(tmp_path / "alias")
    real = Path(os.path.realpath(store.root))
    assert _resolve(aliased, asset_id).is_relative_to(real)
    disk = real / "images/disk.img"
    assert _same(_resolve(aliased, str(tmp_path / "alias/images/disk.img")), disk)
    assert _same(_resolve(aliased, str(store.root / "images/disk.img")), disk)


BAD_REFERENCES = [
    ("", "must name an asset id"),
    ("/etc/shadow", "outside the asset store"),
    ("/etc/passwd", "outside the asset store"),
    ("/etc/does-not-exist", "outside the asset store"),  # same answer: no existence oracle
    ("../x", "'..'"),
    ("images/../../x", "'..'"),
    ("/etc/../etc/passwd", "'..'"),
    ("..", "'..'"),
    ("images/link-inside", "symbolic link"),  # even a symlink that stays inside
    ("linked-dir/disk.img", "symbolic link"),
    ("images/link-outside", "symbolic link"),
    ("images/dir-outside/shadow", "symbolic link"),
    ("images/dangling-outside", "symbolic link"),
    ("images/loop", "symbolic link"),
    ("images/subdir", "not a regular file"),
    ("images", "not a regular file"),
    (".", "not a regular file"),
    ("blobs/sha256", "not a regular file"),
    ("images/missing.img", "no such file"),
    ("images/disk.img/x", "no such file"),
    ("images/disk.img\x00", "NUL"),
    ("\x00", "NUL"),
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
        _resolve(store, reference, field="config.boot.kernel_path")
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
            _resolve(store, ref)


def test_resolve_an_asset_whose_blob_is_gone(populated: tuple[LocalAssetStore, str, Path]) -> None:
    store, asset_id, _ = populated
    blob = store.get(asset_id).path
    blob.chmod(0o644)
    blob.unlink()
    with pytest.raises(InvalidArgument, match="missing"):
        _resolve(store, asset_id)


def test_resolve_a_blob_replaced_by_a_symlink_out(
    populated: tuple[LocalAssetStore, str, Path],
) -> None:
    store, asset_id, tmp_path = populated
    blob = store.get(asset_id).path
    blob.chmod(0o644)
    blob.unlink()
    blob.symlink_to(tmp_path / SECRET / "shadow")
    with pytest.raises(InvalidArgument) as err:
        _resolve(store, asset_id)
    assert SECRET not in err.value.message and "symbolic link" in err.value.message


def test_resolve_when_the_root_is_gone(tmp_path: Path) -> None:
    with pytest.raises(Unavailable):
        _resolve(LocalAssetStore(tmp_path / "none"), "images/x")


# -- resolve: swaps after (and during) resolution reach nothing ------------------------------


def test_a_swap_after_resolve_does_not_change_the_pin(
    populated: tuple[LocalAssetStore, str, Path],
) -> None:
    """Resolved, then the name is rename-swapped and then symlinked elsewhere: the pin is
    still the original file; resolving again gives the new file's own pin, or a refusal."""
    store, _, tmp_path = populated
    disk = store.root / "images" / "disk.img"
    original = os.stat(disk)
    pin = _resolve(store, "images/disk.img")
    _file(tmp_path / "evil", b"evil")
    os.rename(disk, store.root / "images" / "old.img")
    os.rename(tmp_path / "evil", disk)
    assert pin.read_bytes() == b"disk" and files.same_file(os.stat(pin), original)
    new_pin = _resolve(store, "images/disk.img")
    assert new_pin != pin and new_pin.read_bytes() == b"evil"
    disk.unlink()
    disk.symlink_to(tmp_path / SECRET / "shadow")
    with pytest.raises(InvalidArgument, match="symbolic link"):
        _resolve(store, "images/disk.img")
    assert pin.read_bytes() == b"disk"


def test_a_swap_between_open_and_pin_pins_the_opened_file(
    populated: tuple[LocalAssetStore, str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race staged exactly: the file is open when the swap happens; the pin is made from
    the descriptor, so it is the file that was opened and checked, not the newcomer."""
    store, _, tmp_path = populated
    disk = store.root / "images" / "disk.img"
    original = os.stat(disk)
    real_pin = LocalAssetStore._pin

    def swap_then_pin(self: LocalAssetStore, field: str, fd: int, st: os.stat_result) -> Path:
        os.rename(disk, store.root / "images" / "old.img")
        _file(tmp_path / "evil", b"evil")
        os.rename(tmp_path / "evil", disk)
        return real_pin(self, field, fd, st)

    monkeypatch.setattr(LocalAssetStore, "_pin", swap_then_pin)
    pin = _resolve(store, "images/disk.img")
    assert files.same_file(os.stat(pin), original) and pin.read_bytes() == b"disk"


def test_a_file_deleted_between_open_and_pin_is_refused(
    populated: tuple[LocalAssetStore, str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, _, _ = populated
    real_pin = LocalAssetStore._pin

    def delete_then_pin(self: LocalAssetStore, field: str, fd: int, st: os.stat_result) -> Path:
        (store.root / "images" / "disk.img").unlink()
        return real_pin(self, field, fd, st)

    monkeypatch.setattr(LocalAssetStore, "_pin", delete_then_pin)
    with pytest.raises(InvalidArgument, match="changed in the asset store"):
        _resolve(store, "images/disk.img")


def test_a_swap_during_the_walk_is_not_followed(
    populated: tuple[LocalAssetStore, str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """images/ is replaced by a symlink to the secret directory after the walk has looked at
    the root and before it opens images/: refused, nothing outside reached."""
    store, _, tmp_path = populated
    real_walk = files.walk_beneath
    (tmp_path / SECRET / "disk.img").write_bytes(b"secret disk")

    def walk(dir_fd: int, path: str, flags: int = os.O_RDONLY, **kw: Any) -> files.Walked:
        check = kw["check_dir"]

        def swap_first(st: os.stat_result) -> None:
            check(st)
            if (store.root / "images").is_dir() and not (store.root / "images").is_symlink():
                os.rename(store.root / "images", tmp_path / "images-away")
                (store.root / "images").symlink_to(tmp_path / SECRET)

        return real_walk(dir_fd, path, flags, check_dir=swap_first)

    monkeypatch.setattr(files, "walk_beneath", walk)
    with pytest.raises(InvalidArgument, match="symbolic link"):
        _resolve(store, "images/disk.img")


def test_concurrent_resolves_make_one_pin(populated: tuple[LocalAssetStore, str, Path]) -> None:
    store, _, _ = populated
    got: list[Path] = []

    def one() -> None:
        got.append(_resolve(store, "images/disk.img"))

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 8 and len(set(got)) == 1
    assert os.stat(store.root / "images" / "disk.img").st_nlink == 2


def test_pins_are_not_attachable_by_path(populated: tuple[LocalAssetStore, str, Path]) -> None:
    store, asset_id, _ = populated
    pin = _resolve(store, asset_id)
    with pytest.raises(InvalidArgument, match="is not an asset"):
        _resolve(store, f"pins/{pin.name}")


# -- resolve: only trusted files -----------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda p: os.chown(p, 65534, -1), "not owned by root"),
        (lambda p: p.chmod(0o664), "group- or world-writable"),
        (lambda p: p.chmod(0o646), "group- or world-writable"),
        (lambda p: os.chown(p.parent, 65534, -1), "directory of the asset store is not owned"),
        (lambda p: p.parent.chmod(0o775), "directory of the asset store is group"),
        (lambda p: p.parent.parent.chmod(0o757), "directory of the asset store is group"),
        (lambda p: os.link(p, p.parent.parent.parent / "elsewhere"), "other hard links"),
    ],
)
def test_untrusted_files_are_refused(
    populated: tuple[LocalAssetStore, str, Path], change: Any, reason: str
) -> None:
    store, _, tmp_path = populated
    disk = store.root / "images" / "disk.img"
    change(disk)
    with pytest.raises(FailedPrecondition) as err:
        _resolve(store, "images/disk.img")
    assert reason in err.value.message and str(tmp_path) not in err.value.message
    assert not (store.root / "pins").exists() or os.listdir(store.root / "pins") == []


def test_a_pinned_file_may_have_its_pin_but_no_other_link(
    populated: tuple[LocalAssetStore, str, Path],
) -> None:
    store, _, tmp_path = populated
    disk = store.root / "images" / "disk.img"
    pin = _resolve(store, "images/disk.img")
    assert _resolve(store, "images/disk.img") == pin  # nlink 2: itself and its pin
    os.link(disk, tmp_path / "outside")
    with pytest.raises(FailedPrecondition, match="other hard links"):
        _resolve(store, "images/disk.img")


def test_links_in_jails_of_metald_before_issue_7_are_counted_as_the_stores(
    populated: tuple[LocalAssetStore, str, Path],
) -> None:
    """Upgrade path: metald before issue 7 hard-linked store files into jails; VMs still
    running in those after an upgrade must not make the file (the default guest) unusable.
    Links there count only for the jail base named by the daemon, in trusted directories."""
    store, _, tmp_path = populated
    disk = store.root / "images" / "disk.img"
    jails = tmp_path / "srv-jailer"
    old_jail = jails / "qemu" / "vm-old" / "root"
    old_jail.mkdir(parents=True)
    os.link(disk, old_jail / "rootfs.ext4")
    with pytest.raises(FailedPrecondition, match="other hard links"):
        _resolve(store, "images/disk.img")  # a store that was not told of the jail base
    upgraded = LocalAssetStore(store.root, legacy_link_dirs=[jails])
    pin = _resolve(upgraded, "images/disk.img")
    assert _same(pin, disk) and os.stat(disk).st_nlink == 3
    assert _resolve(upgraded, "images/disk.img") == pin  # pinned: its pin + the old jail's
    # a link elsewhere is still refused, and so is one in a jail dir others may write
    os.link(disk, tmp_path / "outside")
    with pytest.raises(FailedPrecondition, match="other hard links"):
        _resolve(upgraded, "images/disk.img")
    os.unlink(tmp_path / "outside")
    open_dir = jails / "qemu" / "vm-open"
    open_dir.mkdir(mode=0o777)
    open_dir.chmod(0o777)
    os.link(disk, open_dir / "rootfs.ext4")
    with pytest.raises(FailedPrecondition, match="other hard links"):
        _resolve(upgraded, "images/disk.img")
    os.unlink(open_dir / "rootfs.ext4")
    (old_jail / "rootfs.ext4").unlink()  # the old VM deleted: back to the pin only
    assert _resolve(upgraded, "images/disk.img") == pin


def test_metald_not_root_trusts_its_own_files(
    populated: tuple[LocalAssetStore, str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run as uid 4242, metald trusts root's files and its own, nobody else's."""
    store, _, _ = populated
    disk = store.root / "images" / "disk.img"
    monkeypatch.setattr(os, "geteuid", lambda: 4242)
    os.chown(disk, 4242, -1)
    assert _same(_resolve(store, "images/disk.img"), disk)
    os.chown(disk, 4243, -1)
    with pytest.raises(FailedPrecondition, match="not owned by root"):
        _resolve(store, "images/disk.img")


# -- resolve: owners -----------------------------------------------------------------------


def test_another_customers_asset_is_not_found_like_a_missing_one(
    store: LocalAssetStore, tmp_path: Path
) -> None:
    bobs = store.add_file(_file(tmp_path / "b", b"bob's kernel"), "kernel", "b", owner="bob")
    shared = store.add_file(_file(tmp_path / "s", b"shared"), "kernel", "s")
    assert bobs.owner == "bob" and shared.owner == ""
    missing = "sha256-0123456789abcdef"
    blob_path = f"blobs/sha256/{bobs.sha256}"
    missing_blob = "blobs/sha256/" + "0" * 64
    _file(store.root / missing_blob, b"a blob no asset names")
    for theirs, nobodys in ((bobs.id, missing), (blob_path, missing_blob)):
        with pytest.raises(NotFound) as a:
            _resolve(store, theirs, "alice")
        with pytest.raises(NotFound) as b:
            _resolve(store, nobodys, "alice")
        assert a.value.message.replace(theirs, "X") == b.value.message.replace(nobodys, "X")
        # The same answer; the API tells them apart only for its security event.
        assert isinstance(a.value, NotYours) and not isinstance(b.value, NotYours)
    # The shared view (the default guest's) does not see it either; its owner does.
    with pytest.raises(NotFound) as shared_view:
        _resolve(store, bobs.id, "")
    assert not isinstance(shared_view.value, NotYours)
    assert _resolve(store, bobs.id, "bob").read_bytes() == b"bob's kernel"
    assert _resolve(store, blob_path, "bob") == _resolve(store, bobs.id, "bob")
    assert _resolve(store, shared.id, "alice").read_bytes() == b"shared"


def test_set_owner(store: LocalAssetStore, tmp_path: Path) -> None:
    a = store.add_file(_file(tmp_path / "a", b"A"), "disk", "a")
    assert store.set_owner(a.id, "carol").owner == "carol" == store.get(a.id).owner
    with pytest.raises(NotFound):
        _resolve(store, a.id, "alice")
    assert store.set_owner(a.id, "").owner == ""
    assert _resolve(store, a.id, "alice").read_bytes() == b"A"
    with pytest.raises(InvalidArgument) as err:
        store.set_owner(a.id, "no spaces")
    assert err.value.field == "owner"
    with pytest.raises(NotFound):
        store.set_owner("sha256-0123456789abcdef", "carol")


def test_adding_content_another_owner_has_is_refused(
    store: LocalAssetStore, tmp_path: Path
) -> None:
    a = store.add_file(_file(tmp_path / "a", b"A"), "disk", "a", owner="bob")
    with pytest.raises(FailedPrecondition, match="owned by customer bob"):
        store.add_file(_file(tmp_path / "b", b"A"), "disk", "b", owner="alice")
    assert store.get(a.id).owner == "bob"
    assert store.add_file(_file(tmp_path / "c", b"A"), "disk", "c", owner="bob") == a


def test_the_default_guest_stays_shared(store: LocalAssetStore, tmp_path: Path) -> None:
    k, i = _kernel_and_initrd(store, tmp_path)
    owned = store.add_file(_file(tmp_path / "o", b"O"), "kernel", "o", owner="bob")
    with pytest.raises(InvalidArgument, match="must be shared") as err:
        store.set_default(owned.id, i)
    assert err.value.field == "kernel_id" and store.default() is None
    store.set_default(k, i)
    with pytest.raises(InvalidArgument, match="must be shared"):
        store.set_owner(k, "bob")
    assert store.get(k).owner == ""
    kernel, _ = store.default_boot()
    assert kernel.read_bytes() == b"K"


def test_metadata_without_an_owner_is_shared(store: LocalAssetStore, tmp_path: Path) -> None:
    a = store.add_file(_file(tmp_path / "a", b"A"), "disk", "a")
    meta = store.meta_dir / f"{a.id}.json"
    data = json.loads(meta.read_text())
    del data["owner"]
    meta.write_text(json.dumps(data))
    assert store.get(a.id).owner == ""
    data["owner"] = 7
    meta.write_text(json.dumps(data))
    with pytest.raises(Unavailable):
        store.get(a.id)


# Path components that matter in the populated store, and junk; drawn mostly from the first.
_PARTS = st.sampled_from(
    [
        "images", "disk.img", "link-inside", "link-outside", "dir-outside", "dangling-outside",
        "loop", "subdir", "shadow", "missing", SECRET, "store", "store2", "x.img", "blobs",
        "sha256", "assets", "pins", "linked-dir", "..", ".", "",
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
        got = _resolve(store, ref)
    except (InvalidArgument, NotFound) as err:
        if isinstance(err, InvalidArgument):
            assert err.field == "f"
        # Nothing the caller did not send: the secret dir only if it was in the reference.
        if SECRET not in ref:
            assert SECRET not in err.message
        if str(tmp_path) not in ref:
            assert str(tmp_path) not in err.message
        return
    assert got.parent == Path(real_root) / "pins"
    assert got.is_file() and not got.is_symlink()
    # The pin is a file of the store: the one user file, or the asset's blob.
    assert got.read_bytes() in (b"disk", b"kernel")


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


def test_cli_owner(store: LocalAssetStore, tmp_path: Path) -> None:
    run = CliRunner().invoke
    where = ["--store", str(store.root)]
    src = _file(tmp_path / "k", b"K")
    added = run(
        app, ["assets", "add", str(src), "--kind", "kernel", "--owner", "bob", *where, "--json"]
    )
    assert added.exit_code == 0, added.output
    asset_id = json.loads(added.stdout)["id"]
    assert json.loads(added.stdout)["owner"] == "bob" == store.get(asset_id).owner

    shown = run(app, ["assets", "owner", asset_id, *where, "--json"])
    assert shown.exit_code == 0 and json.loads(shown.stdout) == {"id": asset_id, "owner": "bob"}
    assert "bob" in run(app, ["assets", "list", *where]).output

    moved = run(app, ["assets", "owner", asset_id, "--set", "carol", *where])
    assert moved.exit_code == 0 and "carol" in moved.output
    assert store.get(asset_id).owner == "carol"
    shared = run(app, ["assets", "owner", asset_id, "--shared", *where])
    assert shared.exit_code == 0 and "(shared)" in shared.output
    assert store.get(asset_id).owner == ""

    both = run(app, ["assets", "owner", asset_id, "--set", "x", "--shared", *where])
    bad = run(app, ["assets", "owner", asset_id, "--set", "not ok", *where])
    unknown = run(app, ["assets", "owner", "sha256-0123456789abcdef", *where])
    assert (both.exit_code, bad.exit_code, unknown.exit_code) == (2, 1, 1)
    assert store.get(asset_id).owner == ""


@pytest.mark.parametrize("internal", ["default.json", "assets", "tmp", "cache", "pins"])
def test_resolve_refuses_the_stores_own_bookkeeping(tmp_path: Path, internal: str) -> None:
    from metald.assets.store import LocalAssetStore

    store = LocalAssetStore(tmp_path)
    target = tmp_path / internal
    if "." not in internal:
        target.mkdir(parents=True, exist_ok=True)
        target = target / "file.json"
    target.write_text("{}")
    with pytest.raises(InvalidArgument, match="is not an asset"):
        store.resolve(
            "config.boot.kernel_path", str(target.relative_to(tmp_path)), customer="alice"
        )
