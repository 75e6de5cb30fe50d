"""Checking a pod's cgroup parent from a CRI request (netd at RunPodSandbox,
shimd at CreateContainer), before anything is made with it: runc would
otherwise mkdir whatever path it is given, at the root of every hierarchy."""

from __future__ import annotations

from common.cgroups.manager import CgroupManager
from common.errors import InvalidArgument

FIELD = "linux.cgroup_parent"


def check_cgroup_parent(parent: str, cgroups: CgroupManager, root: str) -> None:
    """InvalidArgument unless `parent` is a plain path (or slice) this driver
    takes, inside `root` when one is configured (runtime.cgroup_parent_root)."""
    if any(char in parent for char in "\0\n\r") or len(parent) > 4096:
        raise InvalidArgument(f"{FIELD} must not contain NUL or line breaks (or pass 4096 bytes), got {parent[:200]!r}")
    if any(part in (".", "..") for part in parent.replace("\\", "/").split("/")):
        raise InvalidArgument(f"{FIELD} must not contain '.' or '..' components, got {parent[:200]!r}")
    try:
        cgroups.validate_parent(parent)
    except InvalidArgument as exc:
        raise InvalidArgument(f"{FIELD}: {exc}") from None
    if root:
        inside, top = cgroups.parent_cgroup(parent).rstrip("/"), cgroups.parent_cgroup(root).rstrip("/")
        if inside != top and not inside.startswith(top + "/"):
            raise InvalidArgument(f"{FIELD} {parent[:200]!r} is outside {root!r}, the node's runtime.cgroup_parent_root")
