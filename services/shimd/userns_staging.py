"""Mount sources a container in a user namespace can reach.

The runtime makes a userns container's mounts from inside the pod's user
namespace, as the pod's root (a host uid like 100000), so every directory on
the way to a source must be traversable by that uid; pyrio's state directories
are root's alone (0700). shimd therefore stages, under
`<run_dir>/userns/<container id>/` (a directory only the pod's root and the
host's may enter):
- `rootfs`: a bind of the container's overlay (imaged made it of idmapped
  layers, so the image's files are root's inside and the mapped ids' outside);
- `m<N>`: a bind mount of each bind source of the spec (volumes, pod files,
  shm, termination log), which the spec then names instead.
The path is derived from the container id alone, so a destroy (after any
crash) finds and unmounts what a create staged.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from common import mounts
from common.userns import host_id

TRAVERSE_ONLY = 0o711


def staging_dir(run_dir: str, container_id: str) -> Path:
    return Path(run_dir) / "userns" / container_id


def stage(run_dir: str, container_id: str, spec: dict[str, Any], userns: dict[str, Any]) -> None:
    """Stage the spec's rootfs and bind sources and point the spec at them."""
    directory = staging_dir(run_dir, container_id)
    directory.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(directory.parent, TRAVERSE_ONLY)
    directory.mkdir(mode=0o700, exist_ok=True)
    root_uid, root_gid = host_id(userns["uids"], 0), host_id(userns["gids"], 0)
    os.chown(directory, root_uid if root_uid is not None else 0, root_gid if root_gid is not None else 0)
    rootfs = directory / "rootfs"
    rootfs.mkdir(mode=0o755, exist_ok=True)
    if not mounts.is_mount_point(str(rootfs)):
        mounts.mount(spec["root"]["path"], str(rootfs), None, mounts.MS_BIND)
    spec["root"]["path"] = str(rootfs)
    for index, mount in enumerate(spec["mounts"]):
        if mount.get("type") != "bind":
            continue
        source = mount["source"]
        target = directory / f"m{index}"
        if os.path.isdir(source):
            target.mkdir(mode=0o755, exist_ok=True)
        else:
            target.touch(mode=0o644, exist_ok=True)
        if not mounts.is_mount_point(str(target)):
            mounts.mount(source, str(target), None, mounts.MS_BIND | mounts.MS_REC)
        mount["source"] = str(target)


def unstage(run_dir: str, container_id: str) -> None:
    """Unmount and remove what `stage` made (fine when nothing was)."""
    directory = staging_dir(run_dir, container_id)
    if not directory.exists():
        return
    mounts.umount_all_under(str(directory))
    left = mounts.mounts_under(str(directory))
    if left:
        # Never remove through a mount: that would delete a volume's files.
        raise OSError(f"cannot unmount the staged mounts {left} of container {container_id}")
    shutil.rmtree(directory, ignore_errors=True)
