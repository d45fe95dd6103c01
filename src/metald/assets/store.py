"""The local asset store: a directory of kernels, initrds and disk images, addressed by sha256.

Layout under ``root``::

    blobs/sha256/<64 hex>      the bytes, mode 0444, never modified once written
    assets/<asset id>.json     metadata: {id, kind, sha256, size, name, created_at, owner}
    default.json               the default guest: {kernel, initrd, rootfs, recipe, ...}
    tmp/                       files being copied in (renamed into blobs/ when complete)
    cache/                     downloads kept by the guest builder (see guest_builder.py)
    pins/<inode number>        a second name (hard link) of every file resolve() handed out
    .lock                      flock(2) held while the store is being written to

An asset id is ``sha256-`` followed by the first 16 hex digits of the content's sha256
(``sha256-0123456789abcdef``): short, stable, and the same on every host for the same bytes.
Adding the same bytes twice gives the same asset (the first name and kind are kept).

:meth:`LocalAssetStore.resolve` is a security boundary: whatever a tenant puts in a request
(kernel_path, initrd_path, a disk's path) it only ever returns a regular file inside the store,
so a tenant can never attach a host file to a guest. Its error messages never name anything
outside the store that the caller did not already send. How:

- Resolved once, opened once, no symlink followed: the reference is turned into a path below
  the store's root (the root itself may be a symlink: it is the operator's setting, resolved
  once per call), and that path is opened one component at a time with O_PATH | O_NOFOLLOW
  (metald.host.files.walk_beneath). A symlink anywhere below the root is refused.
- Trusted files only (FailedPrecondition: the request is fine, the store is not): every
  directory on the way and the file must be owned by root (or by metald's own uid, when
  metald does not run as root: whoever runs it owns what it trusts) and not group- or
  world-writable; the file must be a regular file with no hard link the store does not
  account for (st_nlink: 1, or 2 with its pin; plus the links that metald before issue 7
  made into jails, found under the jail base the daemon names as ``legacy_link_dirs``, so an
  upgrade with VMs still running in old jails keeps the default guest usable).
- Pinned: the open file (not its name) is hard-linked as ``pins/<inode>`` (linkat from the
  descriptor), and the pin's path is what resolve returns: what the VMM runtime copies (a
  writable disk) and hands to the jail (bind-mounted from an O_NOFOLLOW descriptor), also
  when the VM boots again weeks later. A symlink or a rename swapped into the store after
  resolve() reaches no guest. ``pins/`` is written only here (root only, mode 0700); a pin is
  named by its inode, which it keeps alive, so the name never denotes another file; pins are
  shared by every VM using the file and kept when the asset's name goes (no VM is known
  here: removing pins is an operator's job, with the VMs that use them deleted).
- Owned: an asset is shared (owner "", as the default guest must be) or belongs to one
  customer (``metald assets owner``). A customer's asset, by id or by its blob's path, is
  NotFound for everyone else, word for word as an id nobody has (so nothing is revealed);
  files an operator puts in sub-directories of the store are shared.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import stat
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from metald.core.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    NotYours,
    Unavailable,
)
from metald.core.validation import CUSTOMER_ID
from metald.host import files

AssetKind = Literal["kernel", "initrd", "rootfs", "disk"]
ASSET_KINDS: tuple[AssetKind, ...] = ("kernel", "initrd", "rootfs", "disk")

ID_PREFIX = "sha256-"
ID_HEX_LEN = 16
_ID_RE = re.compile(rf"^{ID_PREFIX}[0-9a-f]{{{ID_HEX_LEN}}}$")
_HEX64_RE = re.compile(r"^[0-9a-f]{64}$")
_BLOB_REL_RE = re.compile(r"^blobs/sha256/([0-9a-f]{64})$")
PINS = "pins"

BUILD_HINT = "run `metald assets build` to make the default guest image"


def asset_id_for(sha256_hex: str) -> str:
    """The asset id of content with this sha256."""
    return ID_PREFIX + sha256_hex[:ID_HEX_LEN]


def is_asset_id(reference: str) -> bool:
    return _ID_RE.fullmatch(reference) is not None


class NoDefaultImage(FailedPrecondition):
    """The store has no (complete) default guest; the operator must build one."""


@dataclass(frozen=True)
class Asset:
    id: str
    kind: AssetKind
    sha256: str
    size: int
    name: str
    created_at: float
    path: Path = field(compare=False)
    owner: str = ""  # "": shared; else the only customer that may attach it

    def visible_to(self, customer: str) -> bool:
        return self.owner == "" or self.owner == customer

    def to_dict(self) -> dict[str, Any]:
        """The metadata as stored (and as printed by ``metald assets list --json``)."""
        return {
            "id": self.id,
            "kind": self.kind,
            "sha256": self.sha256,
            "size": self.size,
            "name": self.name,
            "created_at": self.created_at,
            "owner": self.owner,
        }


@dataclass(frozen=True)
class DefaultImage:
    """What ``default.json`` records: the default guest's assets and how they were made."""

    kernel: str
    initrd: str | None
    rootfs: str | None
    recipe: str
    info: dict[str, Any]
    created_at: float


class LocalAssetStore:
    """A content-addressed directory of guest assets; implements the ``Assets`` port."""

    def __init__(self, root: Path, legacy_link_dirs: Sequence[Path] = ()) -> None:
        # Absolute but not resolved: the real path is looked up whenever it is needed, so a
        # store whose root is a symlink keeps working if the link is moved.
        self.root = Path(os.path.abspath(root))
        # Directories only metald writes (its jail base) where metald before issue 7
        # hard-linked store files into jails: those links are counted as the store's, so
        # VMs still running in such jails after an upgrade do not stop every CreateVm.
        self.legacy_link_dirs = tuple(Path(os.path.abspath(d)) for d in legacy_link_dirs)

    # -- layout -------------------------------------------------------------------------

    @property
    def blobs_dir(self) -> Path:
        return self.root / "blobs" / "sha256"

    @property
    def meta_dir(self) -> Path:
        return self.root / "assets"

    @property
    def tmp_dir(self) -> Path:
        return self.root / "tmp"

    @property
    def cache_dir(self) -> Path:
        return self.root / "cache"

    @property
    def default_file(self) -> Path:
        return self.root / "default.json"

    def blob_path(self, sha256_hex: str) -> Path:
        return self.blobs_dir / sha256_hex

    def _ensure_layout(self) -> None:
        for d in (self.blobs_dir, self.meta_dir, self.tmp_dir, self.cache_dir):
            d.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def locked(self, name: str = ".lock") -> Iterator[None]:
        """Hold a lock (an flock on ``root/<name>``); other holders wait. ``.lock`` guards
        writes to the store; the guest builder holds ``.build-lock`` around a whole build."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / name, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # -- writing ------------------------------------------------------------------------

    def add_file(self, src: Path, kind: str, name: str, *, owner: str = "") -> Asset:
        """Copy ``src`` into the store and record it; the same content gives the same asset.
        ``owner``: "" (shared) or the one customer that may attach it; adding content that
        is already there under another owner is refused (change it with set_owner)."""
        if kind not in ASSET_KINDS:
            raise InvalidArgument("kind", f"must be one of {', '.join(ASSET_KINDS)}")
        if not name or "\x00" in name or "\n" in name:
            raise InvalidArgument("name", "must be a non-empty single line")
        _check_owner(owner)
        with self.locked():
            self._ensure_layout()
            digest, size, tmp = self._copy_in(src)
            try:
                blob = self.blob_path(digest)
                if blob.exists():
                    os.unlink(tmp)
                else:
                    os.chmod(tmp, 0o444)
                    os.rename(tmp, blob)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                raise
            asset_id = asset_id_for(digest)
            existing = self._read_meta(asset_id)
            if existing is not None:
                if existing.sha256 != digest:
                    raise Unavailable(f"asset id {asset_id} already names different content")
                if existing.owner != owner:
                    raise FailedPrecondition(
                        f"asset {asset_id} is already in the store, "
                        f"{_owner_text(existing.owner)}: change that with `metald assets owner`"
                    )
                return existing
            asset = Asset(
                id=asset_id,
                kind=kind,
                sha256=digest,
                size=size,
                name=name,
                created_at=time.time(),
                path=blob,
                owner=owner,
            )
            self._write_json(self.meta_dir / f"{asset_id}.json", asset.to_dict())
            return asset

    def set_owner(self, asset_id: str, owner: str) -> Asset:
        """Make an asset shared (owner "") or one customer's. The default guest's assets
        stay shared. VMs that already use an asset keep their pinned copy of it."""
        _check_owner(owner)
        with self.locked():
            asset = self.get(asset_id)
            if owner:
                default = self.default()
                if default is not None and asset_id in (
                    default.kernel,
                    default.initrd,
                    default.rootfs,
                ):
                    raise InvalidArgument("owner", "the default guest's assets must be shared")
            changed = replace(asset, owner=owner)
            self._write_json(self.meta_dir / f"{asset_id}.json", changed.to_dict())
            return changed

    def _copy_in(self, src: Path) -> tuple[str, int, str]:
        """Copy src to a temp file in tmp/ while hashing it: (sha256 hex, size, temp path)."""
        h = hashlib.sha256()
        size = 0
        fd, tmp = tempfile.mkstemp(prefix="add-", dir=self.tmp_dir)
        try:
            with open(src, "rb") as fin, os.fdopen(fd, "wb") as fout:
                while chunk := fin.read(1 << 20):
                    h.update(chunk)
                    fout.write(chunk)
                    size += len(chunk)
                fout.flush()
                os.fsync(fout.fileno())
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return h.hexdigest(), size, tmp

    def _write_json(self, path: Path, data: Mapping[str, Any]) -> None:
        """Write JSON atomically (temp file in the same directory, fsync, rename)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=2, sort_keys=True)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.rename(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def set_default(
        self,
        kernel_id: str,
        initrd_id: str | None,
        *,
        rootfs_id: str | None = None,
        recipe: str = "",
        info: Mapping[str, Any] | None = None,
    ) -> DefaultImage:
        """Name the default guest. ``recipe`` and ``info`` record how it was made."""
        checks: list[tuple[str, str | None, AssetKind]] = [
            ("kernel_id", kernel_id, "kernel"),
            ("initrd_id", initrd_id, "initrd"),
            ("rootfs_id", rootfs_id, "rootfs"),
        ]
        for fld, ref, kind in checks:
            if ref is None:
                continue
            try:
                asset = self.get(ref)
            except NotFound:
                raise InvalidArgument(fld, f"no asset with id {ref!r}") from None
            if asset.kind != kind:
                raise InvalidArgument(fld, f"asset {ref} is a {asset.kind}, not a {kind}")
            if asset.owner:
                raise InvalidArgument(
                    fld, f"asset {ref} belongs to a customer: the default guest must be shared"
                )
        default = DefaultImage(
            kernel=kernel_id,
            initrd=initrd_id,
            rootfs=rootfs_id,
            recipe=recipe,
            info=dict(info or {}),
            created_at=time.time(),
        )
        with self.locked():
            self._write_json(
                self.default_file,
                {
                    "kernel": default.kernel,
                    "initrd": default.initrd,
                    "rootfs": default.rootfs,
                    "recipe": default.recipe,
                    "info": default.info,
                    "created_at": default.created_at,
                },
            )
        return default

    # -- reading ------------------------------------------------------------------------

    def _read_meta(self, asset_id: str) -> Asset | None:
        path = self.meta_dir / f"{asset_id}.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise Unavailable(f"asset store: metadata of {asset_id} is unreadable") from exc
        try:
            sha = str(data["sha256"])
            kind = str(data["kind"])
            owner = data.get("owner", "")  # metadata written before owners: shared
            if not _HEX64_RE.fullmatch(sha) or kind not in ASSET_KINDS:
                raise ValueError(asset_id)
            if not isinstance(owner, str) or (owner and not CUSTOMER_ID.fullmatch(owner)):
                raise ValueError(asset_id)
            if asset_id_for(sha) != asset_id or data["id"] != asset_id:
                raise ValueError(asset_id)
            return Asset(
                id=asset_id,
                kind=kind,
                sha256=sha,
                size=int(data["size"]),
                name=str(data["name"]),
                created_at=float(data["created_at"]),
                path=self.blob_path(sha),
                owner=owner,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise Unavailable(f"asset store: metadata of {asset_id} is malformed") from exc

    def get(self, asset_id: str) -> Asset:
        """The asset with this id; NotFound if there is none."""
        if not is_asset_id(asset_id):
            raise InvalidArgument("asset_id", f"must look like {ID_PREFIX}<{ID_HEX_LEN} hex>")
        asset = self._read_meta(asset_id)
        if asset is None:
            raise NotFound(f"no asset with id {asset_id}")
        return asset

    def list(self) -> builtins.list[Asset]:
        """Every asset, oldest first."""
        try:
            names = sorted(os.listdir(self.meta_dir))
        except FileNotFoundError:
            return []
        assets = []
        for n in names:
            if n.endswith(".json") and is_asset_id(n[: -len(".json")]):
                a = self._read_meta(n[: -len(".json")])
                if a is not None:
                    assets.append(a)
        return sorted(assets, key=lambda a: (a.created_at, a.id))

    def default(self) -> DefaultImage | None:
        """The default guest as recorded, or None when none was ever set."""
        try:
            data = json.loads(self.default_file.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise NoDefaultImage(f"the default guest record is unreadable; {BUILD_HINT}") from exc
        try:
            return DefaultImage(
                kernel=str(data["kernel"]),
                initrd=None if data.get("initrd") is None else str(data["initrd"]),
                rootfs=None if data.get("rootfs") is None else str(data["rootfs"]),
                recipe=str(data.get("recipe", "")),
                info=dict(data.get("info") or {}),
                created_at=float(data.get("created_at", 0.0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise NoDefaultImage(f"the default guest record is malformed; {BUILD_HINT}") from exc

    def default_boot(self) -> tuple[Path, Path | None]:
        """The default guest's kernel and initrd, resolved (and pinned) like a tenant's."""
        default = self.default()
        if default is None:
            raise NoDefaultImage(f"the asset store has no default guest image; {BUILD_HINT}")
        try:
            kernel = self.resolve("default.kernel", default.kernel, customer="")
            initrd = (
                None
                if default.initrd is None
                else self.resolve("default.initrd", default.initrd, customer="")
            )
        except (InvalidArgument, NotFound, FailedPrecondition) as exc:
            raise NoDefaultImage(
                f"the default guest image is unusable ({exc.message}); {BUILD_HINT}"
            ) from None
        return kernel, initrd

    def ping(self) -> None:
        """Raise Unavailable unless the store's root is a readable directory."""
        try:
            st = os.stat(self.root)
        except OSError:
            raise Unavailable("asset store: the root directory is missing") from None
        if not stat.S_ISDIR(st.st_mode):
            raise Unavailable("asset store: the root is not a directory")
        if not os.access(self.root, os.R_OK | os.X_OK):
            raise Unavailable("asset store: the root directory is not readable")

    # -- the security boundary ----------------------------------------------------------

    def resolve(self, field: str, reference: str, *, customer: str) -> Path:
        """An asset id, or a path inside the store, to the pin of a trusted regular file in
        it that ``customer`` may attach (see the module's docstring for every rule).

        Refusals: InvalidArgument(field, reason) for a reference that names no usable file
        (outside the store, '..', a symlink, not a regular file, missing, the store's own
        bookkeeping); NotFound for an asset id or blob nobody has or someone else owns (the
        same words); FailedPrecondition for a file the store must not hand out (owner, mode,
        other hard links). No reason ever names a host path.
        """
        with self._open(field, reference, customer) as (fd, st):
            return self._pin(field, fd, st)

    def check(self, field: str, reference: str, *, customer: str) -> None:
        """Raise what resolve() would for this reference, and pin nothing."""
        with self._open(field, reference, customer):
            pass

    @contextlib.contextmanager
    def _open(
        self, field: str, reference: str, customer: str
    ) -> Iterator[tuple[int, os.stat_result]]:
        """The referenced file, open (O_PATH) and checked: (descriptor, its fstat)."""
        rel = self._relative(field, reference, customer)
        real_root = self._real_root()
        try:
            root_fd = os.open(real_root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            raise Unavailable("asset store: the root directory is missing") from None
        try:
            walked = files.walk_beneath(root_fd, rel, os.O_PATH, check_dir=_trusted_dir)
        except _Untrusted as exc:
            raise FailedPrecondition(f"{field}: {exc}") from None
        except OSError as exc:
            if is_asset_id(reference) and exc.errno == errno.ENOENT:
                raise InvalidArgument(
                    field, f"the content of asset {reference} is missing"
                ) from None
            raise InvalidArgument(field, _open_problem(exc)) from None
        finally:
            os.close(root_fd)
        try:
            st = walked.stat
            if not stat.S_ISREG(st.st_mode):
                raise InvalidArgument(field, "is not a regular file")
            if "/" not in rel:  # default.json, the locks: files directly in the root
                raise InvalidArgument(field, "is not an asset (use an asset id)")
            why = _untrusted_file(st)
            if why:
                raise FailedPrecondition(f"{field}: {why}")
            yield walked.fd, st
        finally:
            os.close(walked.fd)

    def _real_root(self) -> str:
        try:
            return os.path.realpath(self.root, strict=True)
        except OSError:
            raise Unavailable("asset store: the root directory is missing") from None

    def _relative(self, field: str, reference: str, customer: str) -> str:
        """The reference as a path relative to the store's root, with the owner checked."""
        if not isinstance(reference, str) or reference == "":
            raise InvalidArgument(field, "must name an asset id or a file in the asset store")
        if "\x00" in reference:
            raise InvalidArgument(field, "must not contain NUL bytes")
        try:
            os.fsencode(reference)
        except UnicodeError:
            raise InvalidArgument(field, "is not a valid path") from None

        if is_asset_id(reference):
            asset = self._read_meta(reference)
            if asset is None:
                raise NotFound(f"{field}: no asset {reference!r} in the asset store")
            if not asset.visible_to(customer):
                raise _not_yours(customer, f"{field}: no asset {reference!r} in the asset store")
            return f"blobs/sha256/{asset.sha256}"
        if reference.startswith(ID_PREFIX) and "/" not in reference:
            raise InvalidArgument(
                field, f"is not a valid asset id (expected {ID_PREFIX}<{ID_HEX_LEN} hex digits>)"
            )
        if ".." in reference.split("/"):
            raise InvalidArgument(field, "must not contain a '..' component")

        if os.path.isabs(reference):
            candidate = os.path.normpath(reference)
            # Refuse before touching the file system, so a caller cannot learn anything about
            # files outside the store (not even whether they exist).
            real_root = self._real_root()
            for root in (str(self.root), real_root):
                if _within(candidate, root):
                    rel = candidate[len(root.rstrip("/")) + 1 :]
                    break
            else:
                raise InvalidArgument(field, "is outside the asset store")
        else:
            rel = os.path.normpath(reference)
        rel = rel.strip("/")
        if rel in ("", "."):
            raise InvalidArgument(field, "is not a regular file")
        # The store's own bookkeeping (metadata, locks, pins, temp files, apt cache) is not
        # attachable: only blobs and files an operator placed in sub-directories.
        if rel.split("/")[0] in _INTERNAL_DIRS:
            raise InvalidArgument(field, "is not an asset (use an asset id)")
        blob = _BLOB_REL_RE.fullmatch(rel)
        if blob is not None:
            asset = self._read_meta(asset_id_for(blob.group(1)))
            if asset is None or asset.sha256 != blob.group(1):
                raise NotFound(f"{field}: no asset {reference!r} in the asset store")
            if not asset.visible_to(customer):
                raise _not_yours(customer, f"{field}: no asset {reference!r} in the asset store")
        return rel

    def _pin(self, field: str, fd: int, st: os.stat_result) -> Path:
        """Hard-link the open file as pins/<inode> (or find its pin) and return the pin's
        path; refuse a file with links the store does not account for."""
        real_root = self._real_root()
        pins = os.path.join(real_root, PINS)
        try:
            os.mkdir(pins, 0o700)
        except FileExistsError:
            pass
        except OSError:
            raise Unavailable("asset store: cannot make its pins directory") from None
        try:
            pins_fd = files.open_no_symlinks(pins, os.O_PATH | os.O_DIRECTORY)
        except OSError:
            raise Unavailable("asset store: its pins directory is unusable") from None
        try:
            if _untrusted_dir(os.fstat(pins_fd)) or stat.S_IMODE(os.fstat(pins_fd).st_mode) & 0o077:
                raise Unavailable("asset store: its pins directory is not root's alone")
            name = str(st.st_ino)
            for _ in range(3):
                try:
                    have = os.stat(name, dir_fd=pins_fd, follow_symlinks=False)
                except FileNotFoundError:
                    have = None
                if have is not None:
                    if not (stat.S_ISREG(have.st_mode) and files.same_file(have, st)):
                        raise Unavailable("asset store: a pin names another file")
                    break
                links = os.fstat(fd).st_nlink
                if links == 0:  # its name went since it was opened
                    raise InvalidArgument(field, "changed in the asset store while it was opened")
                if links != 1 and links != 1 + self._legacy_links(st):
                    if _pinned(name, pins_fd):
                        continue  # pinned by someone else since the look above: check it
                    raise FailedPrecondition(f"{field}: {_OTHER_LINKS}")
                try:
                    files.link_fd(fd, name, dest_dir_fd=pins_fd)
                    break
                except FileExistsError:
                    continue  # pinned by someone else meanwhile: check that pin
                except OSError as exc:
                    raise _pin_problem(field, exc) from None
            else:
                raise Unavailable("asset store: the file could not be pinned")
            links = os.fstat(fd).st_nlink
            if links != 2 and links != 2 + self._legacy_links(st):
                raise FailedPrecondition(f"{field}: {_OTHER_LINKS}")
        finally:
            os.close(pins_fd)
        return Path(pins) / name

    def _legacy_links(self, st: os.stat_result) -> int:
        """How many names of the file `st` the legacy link directories hold (0 without
        any). Walked only when a file has more links than the store accounts for; a
        directory someone besides root (or metald's uid) could write is not counted, nor
        is anything behind a symlink or on another filesystem."""
        found = 0
        for top in self.legacy_link_dirs:
            try:
                top_st = os.stat(top, follow_symlinks=False)
            except OSError:
                continue
            if not stat.S_ISDIR(top_st.st_mode) or top_st.st_dev != st.st_dev:
                continue
            found += _names_of(top, st)
        return found


_INTERNAL_DIRS = ("assets", "tmp", "cache", PINS)
_OTHER_LINKS = (
    "the file in the asset store has other hard links (it is also somewhere else): "
    "the operator must give it one name only"
)


class _Untrusted(Exception):
    """A directory on the way that someone besides metald's owner could change."""


def _not_yours(customer: str, message: str) -> NotFound:
    """Another customer's asset: answered word for word as a missing one; NotYours when a
    customer asked (the API logs a security event), plain NotFound for the shared view."""
    return NotYours(message) if customer else NotFound(message)


def _trusted_owners() -> set[int]:
    """Root, and metald's own uid when it is not root (who runs metald owns what it trusts)."""
    return {0, os.geteuid()}


def _untrusted_dir(st: os.stat_result) -> str:
    if st.st_uid not in _trusted_owners():
        return "a directory of the asset store is not owned by root"
    if files.writable_by_others(st):
        return "a directory of the asset store is group- or world-writable"
    return ""


def _trusted_dir(st: os.stat_result) -> None:
    why = _untrusted_dir(st)
    if why:
        raise _Untrusted(why + ": the operator must fix it")


def _untrusted_file(st: os.stat_result) -> str:
    if st.st_uid not in _trusted_owners():
        return "the file in the asset store is not owned by root: the operator must fix it"
    if files.writable_by_others(st):
        return "the file in the asset store is group- or world-writable: the operator must fix it"
    return ""


def _open_problem(exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "has a symbolic link on its path (the asset store follows none)"
    if exc.errno == errno.EXDEV:
        return "must not contain a '..' component"
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return "no such file in the asset store"
    return "cannot be read in the asset store"


def _names_of(top: Path, st: os.stat_result) -> int:
    """Names of the inode `st` under `top`, walking trusted directories of its filesystem."""
    found = 0
    pending = [str(top)]
    while pending:
        path = pending.pop()
        try:
            here = os.stat(path, follow_symlinks=False)
            if _untrusted_dir(here) or here.st_dev != st.st_dev:
                continue
            entries = list(os.scandir(path))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    pending.append(entry.path)
                elif entry.inode() == st.st_ino and entry.is_file(follow_symlinks=False):
                    found += entry.stat(follow_symlinks=False).st_dev == st.st_dev
            except OSError:
                continue
    return found


def _pinned(name: str, pins_fd: int) -> bool:
    try:
        os.stat(name, dir_fd=pins_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _pin_problem(field: str, exc: OSError) -> Exception:
    if exc.errno == errno.ENOENT:
        return InvalidArgument(field, "changed in the asset store while it was opened")
    if exc.errno == errno.EXDEV:
        return FailedPrecondition(f"{field}: the file is not on the asset store's filesystem")
    return FailedPrecondition(f"{field}: the asset store cannot pin the file: {exc.strerror}")


def _check_owner(owner: str) -> None:
    if owner and not CUSTOMER_ID.fullmatch(owner):
        raise InvalidArgument("owner", "a customer id (1-128 of A-Z, a-z, 0-9, _ . -) or ''")


def _owner_text(owner: str) -> str:
    return "shared" if not owner else f"owned by customer {owner}"


def _within(path: str, root: str) -> bool:
    """Whether normalised absolute ``path`` is ``root`` or below it (by whole components)."""
    return path == root or path.startswith(root.rstrip("/") + "/")
