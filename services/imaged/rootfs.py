"""Container root filesystems: one overlayfs mount per container.

The image's layers are the lower dirs (top layer first), the container gets
its own upper and work dirs. The record is written before anything is made
on disk, so after a crash `remove` (or a repeated `prepare`) always knows
what to undo. mount(2) takes at most one page of options: when the absolute
layer paths do not fit, the mount is done by mount(8) run from the store
root with short relative links (`l/<short>`), as Docker's overlay2 does.
"""

from __future__ import annotations

import logging
import os
import resource
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from common import mounts, state
from services.imaged.store import Store

log = logging.getLogger("pyrio.imaged.rootfs")

# mount(2) copies at most one page of option data.
MAX_MOUNT_DATA = resource.getpagesize() - 1


class RootfsManager:
    def __init__(self, store: Store) -> None:
        self.store = store

    def paths(self, container_id: str) -> dict[str, Path]:
        base = self.store.rootfs / container_id
        return {"base": base, "upper": base / "upper", "work": base / "work", "merged": base / "merged", "empty": base / "empty"}

    def mount(self, record: dict[str, Any]) -> str:
        """Mount (or find mounted) the record's overlay; returns the merged dir."""
        paths = self.paths(record["container_id"])
        # The base dir is what keeps host users out of the mounted rootfs;
        # upper's mode becomes the container's "/", which a non-root
        # container user must be able to traverse.
        state.private_dir(paths["base"])
        for key in ("upper", "work", "merged"):
            paths[key].mkdir(mode=0o755, exist_ok=True)
        merged = str(paths["merged"])
        if mounts.is_mount_point(merged):
            return merged
        layers = list(reversed(record["layers"]))
        if not layers:
            # overlayfs needs a lower dir; an image without layers gets an empty one.
            paths["empty"].mkdir(mode=0o755, exist_ok=True)
            lower = [str(paths["empty"])]
        else:
            lower = [str(self.store.layer_diff(diff_id)) for diff_id in layers]
        options = f"lowerdir={':'.join(lower)},upperdir={paths['upper']},workdir={paths['work']}"
        if len(options) <= MAX_MOUNT_DATA:
            mounts.mount("overlay", merged, "overlay", 0, options)
            return merged
        short = [self.store.short_link(diff_id) for diff_id in layers]
        relative_base = paths["base"].relative_to(self.store.root)
        options = f"lowerdir={':'.join(short)},upperdir={relative_base}/upper,workdir={relative_base}/work"
        if len(options) > MAX_MOUNT_DATA:
            raise OSError(f"image has too many layers ({len(layers)}) for one overlay mount")
        result = subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o", options, merged],
            cwd=self.store.root, capture_output=True, text=True, timeout=60,
        )
        if result.returncode != 0:
            raise OSError(f"mount overlay on {merged}: {result.stderr.strip()}")
        return merged

    def unmount(self, container_id: str) -> None:
        merged = str(self.paths(container_id)["merged"])
        for _ in range(50):
            try:
                if not mounts.umount(merged):
                    return
            except OSError as exc:
                if exc.errno == 16:  # EBUSY: a process still has it open; retry, then detach
                    time.sleep(0.1)
                    continue
                raise
        mounts.umount(merged, lazy=True)

    def remove(self, container_id: str) -> None:
        self.unmount(container_id)
        shutil.rmtree(self.paths(container_id)["base"], ignore_errors=True)

    def usage(self, container_id: str) -> tuple[int, int]:
        return self.store.disk_usage(self.paths(container_id)["upper"])

    def remove_orphans(self, known: set[str]) -> None:
        """Remove directories of containers that have no record. Records are
        written first and deleted last, so this is only a safety net."""
        for entry in self.store.rootfs.iterdir():
            if entry.name not in known:
                log.info("removing orphaned rootfs %s", entry.name)
                self.remove(entry.name)

    def is_mounted(self, container_id: str) -> bool:
        return os.path.ismount(self.paths(container_id)["merged"])
