"""Which cgroup hierarchy this host mounts at /sys/fs/cgroup, found once at start.

As runc and systemd decide it: statfs(2) of /sys/fs/cgroup says cgroup2
(pure v2, "unified") or tmpfs (v1 controllers below it); a tmpfs root with a
cgroup2 mount at /sys/fs/cgroup/unified is systemd's hybrid layout, which
runc and crun treat as v1 for every resource.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from dataclasses import dataclass, field
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP2_SUPER_MAGIC = 0x63677270
TMPFS_MAGIC = 0x01021994

V1, HYBRID, V2 = "v1", "hybrid", "v2"

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def filesystem_type(path: Path) -> int:
    """f_type of statfs(2): the magic number of the filesystem at `path`."""
    # struct statfs starts with `__fsword_t f_type` (a long) on every Linux ABI.
    buffer = ctypes.create_string_buffer(256)
    if _libc.statfs(os.fsencode(str(path)), buffer) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error), str(path))
    return ctypes.c_long.from_buffer(buffer).value & 0xFFFFFFFF


@dataclass(frozen=True)
class Hierarchy:
    """The mode (v1, hybrid, v2), where it is mounted, and its controllers."""

    mode: str
    root: Path = CGROUP_ROOT
    controllers: frozenset[str] = field(default_factory=frozenset)

    @property
    def unified(self) -> bool:
        """True on a pure cgroup v2 host: resources go to the v2 files."""
        return self.mode == V2

    def has(self, controller: str) -> bool:
        return controller in self.controllers

    @classmethod
    def at(cls, root: Path, mode: str) -> "Hierarchy":
        """The hierarchy of a tree whose mode is known (a fake tree in tests)."""
        if mode == V2:
            try:
                names = (root / "cgroup.controllers").read_text().split()
            except OSError:
                names = []
            return cls(mode=V2, root=root, controllers=frozenset(names))
        names = set()
        if root.is_dir():
            for entry in root.iterdir():
                if entry.name != "unified":
                    names.update(entry.name.split(","))
        return cls(mode=mode, root=root, controllers=frozenset(names))


def detect(root: Path = CGROUP_ROOT) -> Hierarchy:
    """The host's hierarchy, from the filesystem types at `root` (statfs)."""
    kind = filesystem_type(root)
    if kind == CGROUP2_SUPER_MAGIC:
        return Hierarchy.at(root, V2)
    if kind != TMPFS_MAGIC:
        raise OSError(f"{root} is neither cgroup2 nor a tmpfs of cgroup v1 hierarchies (filesystem type {kind:#x})")
    unified = root / "unified"
    try:
        hybrid = unified.is_dir() and filesystem_type(unified) == CGROUP2_SUPER_MAGIC
    except OSError:
        hybrid = False
    return Hierarchy.at(root, HYBRID if hybrid else V1)
