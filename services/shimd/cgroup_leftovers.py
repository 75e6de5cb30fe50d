"""What a container's create may leave in the cgroup tree, and its removal.

runc makes the container's cgroup (and any missing parent) in every
hierarchy it uses, hybrid v1's name=systemd and unified included. When the
create fails before runc records the container, `runc delete` knows nothing
to remove, so shimd notes beforehand which parent directories do not exist
yet and, when it destroys the container, removes the container's cgroup
from every hierarchy and those parents while they are empty (rmdir refuses
a cgroup that still has children or processes, so another pod's is safe).
"""

from __future__ import annotations

from pathlib import Path

from common.cgroups import CGROUP_ROOT
from common.cgroups.files import remove_tree


def hierarchy_roots(root: Path = CGROUP_ROOT) -> list[Path]:
    """Every mounted hierarchy: the root itself on cgroup v2, each v1 directory otherwise."""
    if (root / "cgroup.controllers").exists():
        return [root]
    try:
        return sorted(entry for entry in root.iterdir() if entry.is_dir() and not entry.is_symlink())
    except OSError:
        return []


def missing_parents(cgroup: str, root: Path = CGROUP_ROOT) -> list[str]:
    """The directories above `cgroup` that do not exist yet, deepest first."""
    missing: list[str] = []
    parts = [part for part in cgroup.strip("/").split("/") if part][:-1]
    for hierarchy in hierarchy_roots(root):
        for depth in range(len(parts), 0, -1):
            directory = hierarchy.joinpath(*parts[:depth])
            if directory.is_dir():
                break
            missing.append(str(directory))
    return missing


def remove_leftovers(cgroup: str, made_parents: list[str], root: Path = CGROUP_ROOT) -> None:
    relative = cgroup.strip("/")
    if not relative:
        return
    for hierarchy in hierarchy_roots(root):
        remove_tree(hierarchy / relative)
    for directory in made_parents:
        try:
            Path(directory).rmdir()
        except OSError:
            pass  # not empty (another container uses it) or already gone
