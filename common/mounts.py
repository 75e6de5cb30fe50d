"""mount(2)/umount(2) through libc, and reading /proc/self/mountinfo.

imaged mounts overlay root filesystems and netd pins namespaces with bind
mounts; both go through here rather than forking mount(8) on a hot path.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
from dataclasses import dataclass

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MNT_DETACH = 0x2

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def _encode(value: str | None) -> bytes | None:
    return None if value is None else os.fsencode(value)


def mount(source: str | None, target: str, fstype: str | None = None, flags: int = 0, data: str | None = None) -> None:
    if _libc.mount(_encode(source), _encode(target), _encode(fstype), flags, _encode(data)) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"mount {source} on {target} ({fstype or 'bind'}): {os.strerror(errno)}")


def umount(target: str, lazy: bool = False) -> bool:
    """Unmount; True if something was unmounted, False if it was not mounted."""
    if _libc.umount2(_encode(target), MNT_DETACH if lazy else 0) != 0:
        errno = ctypes.get_errno()
        if errno in (22, 2):  # EINVAL: not a mount point; ENOENT: gone
            return False
        raise OSError(errno, f"umount {target}: {os.strerror(errno)}")
    return True


def mount_points() -> list[str]:
    points = []
    with open("/proc/self/mountinfo") as handle:
        for line in handle:
            points.append(line.split()[4].encode().decode("unicode_escape"))
    return points


def is_mount_point(path: str) -> bool:
    return os.path.realpath(path) in set(mount_points())


def mounts_under(prefix: str) -> list[str]:
    """Mount points at or below `prefix`, deepest first (the order to unmount)."""
    prefix = os.path.realpath(prefix)
    found = [point for point in mount_points() if point == prefix or point.startswith(prefix + "/")]
    return sorted(found, key=len, reverse=True)


def umount_all_under(prefix: str) -> int:
    """Unmount everything at or below prefix, lazily; returns how many."""
    count = 0
    for point in mounts_under(prefix):
        try:
            if umount(point, lazy=True):
                count += 1
        except OSError:
            continue
    return count


@dataclass(frozen=True)
class MountEntry:
    """One line of /proc/self/mountinfo: where, and its propagation peers."""

    mount_point: str
    shared: bool  # optional field shared:N (a peer group)
    slave: bool  # optional field master:N (receives from a peer group)


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    return re.sub(r"\\([0-7]{3})", lambda found: chr(int(found.group(1), 8)), field)


def mount_entries() -> list[MountEntry]:
    entries = []
    with open("/proc/self/mountinfo") as handle:
        for line in handle:
            fields = line.split()
            separator = fields.index("-", 6)
            optional = fields[6:separator]
            entries.append(MountEntry(
                mount_point=_unescape(fields[4]),
                shared=any(tag.startswith("shared:") for tag in optional),
                slave=any(tag.startswith("master:") for tag in optional),
            ))
    return entries


def mount_of(path: str) -> MountEntry:
    """The mount `path` is on: the deepest mount point above it (the last one
    mounted there when several are stacked)."""
    target = os.path.realpath(path)
    best: MountEntry | None = None
    for entry in mount_entries():
        point = entry.mount_point
        if target == point or point == "/" or target.startswith(point.rstrip("/") + "/"):
            if best is None or len(point) >= len(best.mount_point):
                best = entry
    assert best is not None  # "/" is always mounted
    return best
