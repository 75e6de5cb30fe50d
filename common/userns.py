"""User namespaces of pods (hostUsers: false): the kubelet's mappings, checked
once for netd (which makes the pod's namespace) and shimd (which checks each
container against its pod), and idmapped mounts (imaged maps a container's
root filesystem with the pod's user namespace).

An idmapped mount is made with the new mount API: open_tree(OPEN_TREE_CLONE)
copies the mount detached, mount_setattr(MOUNT_ATTR_IDMAP) gives it the user
namespace's mapping, move_mount attaches it. Files of the host's uid 0 then
show as the namespace's root inside (and the mapped host id through the mount
outside), with nothing chowned.
"""

from __future__ import annotations

import ctypes
import os
from typing import Any

from common.errors import InvalidArgument

NAMESPACE_POD, NAMESPACE_NODE = 0, 2
# The kernel accepts at most 340 lines in uid_map (Linux 4.15); the kubelet sends one.
MAX_MAPPINGS = 340
MAX_ID = (1 << 32) - 1

SYS_OPEN_TREE, SYS_MOVE_MOUNT, SYS_MOUNT_SETATTR = 428, 429, 442
OPEN_TREE_CLONE, OPEN_TREE_CLOEXEC = 1, os.O_CLOEXEC
AT_FDCWD, AT_EMPTY_PATH, AT_RECURSIVE = -100, 0x1000, 0x8000
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOUNT_ATTR_IDMAP = 0x00100000

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def user_namespace_options(security: dict[str, Any]) -> dict[str, Any] | None:
    """The userns_options of a (pod or container) security context when they ask
    for a pod user namespace, None for the node's; InvalidArgument otherwise."""
    options = (security.get("namespace_options") or {}).get("userns_options")
    if options is None:
        return None
    mode = int(options.get("mode", NAMESPACE_POD))
    if mode == NAMESPACE_NODE:
        if options.get("uids") or options.get("gids"):
            raise InvalidArgument("userns_options mode NODE takes no uids or gids mappings")
        return None
    if mode != NAMESPACE_POD:
        raise InvalidArgument(f"userns_options mode must be POD or NODE, got {mode}")
    return {"uids": mappings(options.get("uids") or [], "uids"), "gids": mappings(options.get("gids") or [], "gids")}


def mappings(given: list[dict[str, Any]], field: str) -> list[dict[str, int]]:
    """Checked CRI IDMappings, as {container_id, host_id, length}."""
    if not given:
        raise InvalidArgument(f"userns_options mode POD needs {field} mappings")
    if len(given) > MAX_MAPPINGS:
        raise InvalidArgument(f"userns_options {field}: at most {MAX_MAPPINGS} mappings, got {len(given)}")
    result = []
    for entry in given:
        mapping = {key: int(entry.get(key, 0)) for key in ("container_id", "host_id", "length")}
        if mapping["length"] <= 0:
            raise InvalidArgument(f"userns_options {field} mapping {mapping} needs a positive length")
        for key in ("container_id", "host_id"):
            if mapping[key] < 0 or mapping[key] + mapping["length"] - 1 > MAX_ID:
                raise InvalidArgument(f"userns_options {field} mapping {mapping}: {key} range leaves 0-{MAX_ID}")
        result.append(mapping)
    for key in ("container_id", "host_id"):
        ranges = sorted((mapping[key], mapping[key] + mapping["length"]) for mapping in result)
        for (_, end), (start, _) in zip(ranges, ranges[1:]):
            if start < end:
                raise InvalidArgument(f"userns_options {field} mappings overlap in their {key} ranges")
    if not any(mapping["container_id"] == 0 for mapping in result):
        raise InvalidArgument(f"userns_options {field} mappings must map the pod's root (container_id 0)")
    return result


def id_map_text(mappings: list[dict[str, int]]) -> str:
    """/proc/<pid>/uid_map (or gid_map) contents."""
    return "".join(f"{m['container_id']} {m['host_id']} {m['length']}\n" for m in mappings)


def oci_mappings(mappings: list[dict[str, int]]) -> list[dict[str, int]]:
    return [{"containerID": m["container_id"], "hostID": m["host_id"], "size": m["length"]} for m in mappings]


def host_id(mappings: list[dict[str, int]], inside: int) -> int | None:
    """The host id an id inside the namespace maps to."""
    for m in mappings:
        if m["container_id"] <= inside < m["container_id"] + m["length"]:
            return m["host_id"] + inside - m["container_id"]
    return None


def _check(result: int, what: str) -> int:
    if result < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")
    return result


def idmapped_bind(source: str, target: str, userns_path: str) -> None:
    """Mount `source` again on `target`, idmapped with the user namespace pinned at `userns_path`."""
    userns_fd = os.open(userns_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        tree = _check(_libc.syscall(SYS_OPEN_TREE, AT_FDCWD, os.fsencode(source),
                                    OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC), f"open_tree {source}")
        try:
            attr = _MountAttr(attr_set=MOUNT_ATTR_IDMAP, userns_fd=userns_fd)
            _check(_libc.syscall(SYS_MOUNT_SETATTR, tree, b"", AT_EMPTY_PATH, ctypes.byref(attr), ctypes.sizeof(attr)),
                   f"mount_setattr (idmap) {source}")
            _check(_libc.syscall(SYS_MOVE_MOUNT, tree, b"", AT_FDCWD, os.fsencode(target), MOVE_MOUNT_F_EMPTY_PATH),
                   f"move_mount {source} to {target}")
        finally:
            os.close(tree)
    finally:
        os.close(userns_fd)
