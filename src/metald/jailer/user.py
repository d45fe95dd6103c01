"""The unprivileged user jailed VMMs run as."""

from __future__ import annotations

import grp
import os
import pwd
import subprocess

DEFAULT_JAIL_USER = "metald-vm"


def ensure_jail_user(name: str = DEFAULT_JAIL_USER) -> tuple[int, int]:
    """The (uid, gid) of the jail user, creating it as a system user with its own group,
    no home and no login shell when it does not exist (root only). For set-up: it blocks."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        entry = None
    if entry is None:
        if os.geteuid() != 0:
            raise PermissionError(
                f"user {name} does not exist and only root can create it "
                f"(useradd --system --user-group --no-create-home --shell /usr/sbin/nologin {name})"
            ) from None
        result = subprocess.run(
            [
                "useradd",
                "--system",
                "--user-group",
                "--no-create-home",
                "--home-dir",
                "/nonexistent",
                "--shell",
                "/usr/sbin/nologin",
                name,
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0 and result.returncode != 9:  # 9: exists (a race)
            raise OSError(f"useradd {name} failed: {result.stderr.strip()}")
        entry = pwd.getpwnam(name)
    if entry.pw_uid == 0 or entry.pw_gid == 0:
        raise PermissionError(f"user {name} is root or in group root: not a jail user")
    grp.getgrgid(entry.pw_gid)  # the primary group exists
    return entry.pw_uid, entry.pw_gid
