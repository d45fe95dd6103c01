"""Which mount holds /run/netns, and how it propagates, read from a mountinfo text (the
named network namespaces decide from this where a name outlives metald)."""

from __future__ import annotations

from pathlib import Path

from metald.host.mounts import mount_holding, parse_mountinfo


def _run_dir_propagation(mountinfo: str) -> tuple[set[str], set[str]]:
    entry = mount_holding(Path("/run/netns"), parse_mountinfo(mountinfo))
    return (set(), set()) if entry is None else (set(entry.shared), set(entry.master))


HOST = """\
27 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
42 27 254:0 /run/netns /run/netns rw,relatime shared:7 - ext4 /dev/vda rw
"""
SLAVE = """\
300 299 254:0 / / rw,relatime master:1 - ext4 /dev/vda rw
301 300 254:0 /run/netns /run/netns rw,relatime master:7 - ext4 /dev/vda rw
302 301 0:4 net:[4026532999] /run/netns/mvm-a rw master:7 - nsfs nsfs rw
"""


def test_the_deepest_mount_on_the_path_decides() -> None:
    assert _run_dir_propagation(HOST) == ({"7"}, set())
    assert _run_dir_propagation(SLAVE) == (set(), {"7"})  # not a name's own mount


def test_without_a_mount_of_its_own_the_parent_mount_decides() -> None:
    only_root = "27 1 254:0 / / rw,relatime shared:1 master:3 - ext4 /dev/vda rw\n"
    assert _run_dir_propagation(only_root) == ({"1"}, {"3"})
    private = "27 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n"
    assert _run_dir_propagation(private) == (set(), set())


def test_the_last_of_stacked_mounts_is_the_one_seen() -> None:
    stacked = HOST + "43 42 254:0 /run/netns /run/netns rw,relatime shared:9 - ext4 x rw\n"
    assert _run_dir_propagation(stacked) == ({"9"}, set())
