"""The local asset store: a directory of kernels, initrds and disk images, addressed by sha256.

Layout under ``root``::

    blobs/sha256/<64 hex>      the bytes, mode 0444, never modified once written
    assets/<asset id>.json     metadata: {id, kind, sha256, size, name, created_at}
    default.json               the default guest: {kernel, initrd, rootfs, recipe, ...}
    tmp/                       files being copied in (renamed into blobs/ when complete)
    cache/                     downloads kept by the guest builder (see guest_builder.py)
    .lock                      flock(2) held while the store is being written to

An asset id is ``sha256-`` followed by the first 16 hex digits of the content's sha256
(``sha256-0123456789abcdef``): short, stable, and the same on every host for the same bytes.
Adding the same bytes twice gives the same asset (the first name and kind are kept).

:meth:`LocalAssetStore.resolve` is a security boundary: whatever a tenant puts in a request
(kernel_path, initrd_path, a disk's path) it only ever returns a regular file inside the store,
so a tenant can never attach a host file to a guest. Its error messages never name anything
outside the store that the caller did not already send.
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
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from metald.core.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable

AssetKind = Literal["kernel", "initrd", "rootfs", "disk"]
ASSET_KINDS: tuple[AssetKind, ...] = ("kernel", "initrd", "rootfs", "disk")

ID_PREFIX = "sha256-"
ID_HEX_LEN = 16
_ID_RE = re.compile(rf"^{ID_PREFIX}[0-9a-f]{{{ID_HEX_LEN}}}$")
_HEX64_RE = re.compile(r"^[0-9a-f]{64}$")

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

    def to_dict(self) -> dict[str, Any]:
        """The metadata as stored (and as printed by ``metald assets list --json``)."""
        return {
            "id": self.id,
            "kind": self.kind,
            "sha256": self.sha256,
            "size": self.size,
            "name": self.name,
            "created_at": self.created_at,
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

    def __init__(self, root: Path) -> None:
        # Absolute but not resolved: the real path is looked up whenever it is needed, so a
        # store whose root is a symlink keeps working if the link is moved.
        self.root = Path(os.path.abspath(root))

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

    def add_file(self, src: Path, kind: str, name: str) -> Asset:
        """Copy ``src`` into the store and record it; the same content gives the same asset."""
        if kind not in ASSET_KINDS:
            raise InvalidArgument("kind", f"must be one of {', '.join(ASSET_KINDS)}")
        if not name or "\x00" in name or "\n" in name:
            raise InvalidArgument("name", "must be a non-empty single line")
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
                return existing
            asset = Asset(
                id=asset_id,
                kind=kind,
                sha256=digest,
                size=size,
                name=name,
                created_at=time.time(),
                path=blob,
            )
            self._write_json(self.meta_dir / f"{asset_id}.json", asset.to_dict())
            return asset

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
            if not _HEX64_RE.fullmatch(sha) or kind not in ASSET_KINDS:
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
        """The default guest's kernel and initrd, as real files in the store."""
        default = self.default()
        if default is None:
            raise NoDefaultImage(f"the asset store has no default guest image; {BUILD_HINT}")
        try:
            kernel = self.resolve("default.kernel", default.kernel)
            initrd = (
                None if default.initrd is None else self.resolve("default.initrd", default.initrd)
            )
        except InvalidArgument as exc:
            raise NoDefaultImage(
                f"the default guest image is incomplete ({exc.message}); {BUILD_HINT}"
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

    def resolve(self, field: str, reference: str) -> Path:
        """An asset id, or a path inside the store, to the real path of a regular file in it.

        A path is absolute or relative to the root; a ``..`` component is refused outright;
        symlinks are resolved and the result must still lie inside the store. Anything else
        raises InvalidArgument(field, reason); the reason never names a host path.
        """
        if not isinstance(reference, str) or reference == "":
            raise InvalidArgument(field, "must name an asset id or a file in the asset store")
        if "\x00" in reference:
            raise InvalidArgument(field, "must not contain NUL bytes")
        try:
            os.fsencode(reference)
        except UnicodeError:
            raise InvalidArgument(field, "is not a valid path") from None

        if is_asset_id(reference):
            return self._resolve_id(field, reference)
        if reference.startswith(ID_PREFIX) and "/" not in reference:
            raise InvalidArgument(
                field, f"is not a valid asset id (expected {ID_PREFIX}<{ID_HEX_LEN} hex digits>)"
            )

        if ".." in reference.split("/"):
            raise InvalidArgument(field, "must not contain a '..' component")

        try:
            real_root = os.path.realpath(self.root, strict=True)
        except OSError:
            raise Unavailable("asset store: the root directory is missing") from None

        if os.path.isabs(reference):
            candidate = os.path.normpath(reference)
            # Refuse before touching the file system, so a caller cannot learn anything about
            # files outside the store (not even whether they exist).
            if not (_within(candidate, str(self.root)) or _within(candidate, real_root)):
                raise InvalidArgument(field, "is outside the asset store")
        else:
            candidate = os.path.join(real_root, reference)

        try:
            real = os.path.realpath(candidate, strict=False)
        except (OSError, ValueError):
            raise InvalidArgument(field, "cannot be resolved") from None
        if not _within(real, real_root):
            raise InvalidArgument(field, "resolves outside the asset store")
        if real == real_root:
            raise InvalidArgument(field, "is not a regular file")
        try:
            st = os.stat(real)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                raise InvalidArgument(field, "no such file in the asset store") from None
            raise InvalidArgument(field, "cannot be read in the asset store") from None
        if not stat.S_ISREG(st.st_mode):
            raise InvalidArgument(field, "is not a regular file")
        # The store's own bookkeeping (metadata, locks, temp files, apt cache) is not
        # attachable: only asset content and files an operator placed in sub-directories.
        internal = [os.path.join(real_root, d) for d in _INTERNAL_DIRS]
        if os.path.dirname(real) == real_root or any(_within(real, d) for d in internal):
            raise InvalidArgument(field, "is not an asset (use an asset id)")
        return Path(real)

    def _resolve_id(self, field: str, asset_id: str) -> Path:
        asset = self._read_meta(asset_id)
        if asset is None:
            raise InvalidArgument(field, f"no asset with id {asset_id}")
        try:
            return self.resolve(field, f"blobs/sha256/{asset.sha256}")
        except InvalidArgument:
            raise InvalidArgument(field, f"the content of asset {asset_id} is missing") from None


_INTERNAL_DIRS = ("assets", "tmp", "cache")


def _within(path: str, root: str) -> bool:
    """Whether normalised absolute ``path`` is ``root`` or below it (by whole components)."""
    return path == root or path.startswith(root.rstrip("/") + "/")
