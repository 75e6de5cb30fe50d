"""Container root filesystems: one overlayfs mount per container, and its
image volumes (CRI Mount.image): a read-only overlay of another image's layers.

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
from common.userns import idmapped_bind
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
        """Mount (or find mounted) the record's overlay and its image volumes;
        returns the merged dir."""
        paths = self.paths(record["container_id"])
        # The base dir is what keeps host users out of the mounted rootfs;
        # upper's mode becomes the container's "/", which a non-root
        # container user must be able to traverse.
        state.private_dir(paths["base"])
        for key in ("upper", "work", "merged", "empty"):
            paths[key].mkdir(mode=0o755, exist_ok=True)
        merged = str(paths["merged"])
        userns_path = record.get("idmap_userns") or ""
        if not mounts.is_mount_point(merged):
            if userns_path:
                self._idmapped_overlay(merged, record["layers"], paths, userns_path, "l",
                                       tuple(record.get("idmap_root") or (0, 0)))
            else:
                self._overlay(merged, record["layers"], paths, writable=True)
        for index, volume in enumerate(record.get("image_volumes") or []):
            target = self.volume_path(record["container_id"], index)
            target.mkdir(mode=0o755, parents=True, exist_ok=True)
            if mounts.is_mount_point(str(target)):
                continue
            if userns_path:
                self._idmapped_overlay(str(target), volume["layers"], paths, userns_path, f"v{index}-l")
            else:
                self._overlay(str(target), volume["layers"], paths, writable=False)
        return merged

    def volume_path(self, container_id: str, index: int) -> Path:
        """Where the container's `index`th image volume is mounted."""
        return self.paths(container_id)["base"] / "volumes" / str(index)

    def _idmapped_overlay(self, target: str, layer_ids: list[str], paths: dict[str, Path], userns_path: str,
                          prefix: str, root_ids: tuple[int, int] | None = None) -> None:
        """An overlay for a user-namespaced pod, as containerd's remapped
        snapshots: its layers are idmapped mounts (overlayfs itself cannot be
        idmapped; its layers can), so the image's root-owned files are the
        pod's root's, with nothing chowned. With `root_ids` (the container's
        rootfs) its upper dir is the pod root's (host ids) and copy-ups keep
        the mapped owners; without, it is read-only (an image volume)."""
        idmapped = paths["base"] / "idmapped"
        idmapped.mkdir(mode=0o700, exist_ok=True)
        lower = []
        for index, diff_id in enumerate(reversed(layer_ids)):
            layer = idmapped / f"{prefix}{index}"
            layer.mkdir(mode=0o755, exist_ok=True)
            if not mounts.is_mount_point(str(layer)):
                idmapped_bind(str(self.store.layer_diff(diff_id)), str(layer), userns_path)
            lower.append(layer)
        base = paths["base"].relative_to(self.store.root)
        if root_ids is not None:
            os.chown(paths["upper"], *root_ids)
            relative = [str(path.relative_to(self.store.root)) for path in lower or [paths["empty"]]]
            options = f"lowerdir={':'.join(relative)},upperdir={base}/upper,workdir={base}/work"
        else:
            # Without an upper dir overlayfs wants two lower dirs: the empty one is the second.
            relative = [str(path.relative_to(self.store.root)) for path in [*lower, paths["empty"]]]
            options = f"ro,lowerdir={':'.join(relative)}"
        if len(options) > MAX_MOUNT_DATA:
            raise OSError(f"image has too many layers ({len(layer_ids)}) for one overlay mount")
        result = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, target],
                                cwd=self.store.root, capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise OSError(f"mount idmapped overlay on {target}: {result.stderr.strip()}")

    def _overlay(self, target: str, layer_ids: list[str], paths: dict[str, Path], writable: bool) -> None:
        """An overlay of the layers (top first) on target: with the
        container's upper and work dirs, or read-only (an image volume: the
        layers themselves, no copy; overlayfs wants two lower dirs without an
        upper one, the empty dir is the second)."""
        layers = list(reversed(layer_ids))
        lower = [str(self.store.layer_diff(diff_id)) for diff_id in layers]
        if writable:
            # overlayfs needs a lower dir; an image without layers gets an empty one.
            options = f"lowerdir={':'.join(lower or [str(paths['empty'])])},upperdir={paths['upper']},workdir={paths['work']}"
        else:
            options = f"lowerdir={':'.join([*lower, str(paths['empty'])])}"
        if len(options) <= MAX_MOUNT_DATA:
            mounts.mount("overlay", target, "overlay", mounts.MS_RDONLY if not writable else 0, options)
            return
        short = [self.store.short_link(diff_id) for diff_id in layers]
        relative_base = paths["base"].relative_to(self.store.root)
        if writable:
            options = f"lowerdir={':'.join(short)},upperdir={relative_base}/upper,workdir={relative_base}/work"
        else:
            options = f"lowerdir={':'.join([*short, f'{relative_base}/empty'])}"
        if len(options) > MAX_MOUNT_DATA:
            raise OSError(f"image has too many layers ({len(layers)}) for one overlay mount")
        command = ["mount", "-t", "overlay", "overlay", "-o", options if writable else f"ro,{options}", target]
        result = subprocess.run(command, cwd=self.store.root, capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise OSError(f"mount overlay on {target}: {result.stderr.strip()}")

    def unmount(self, container_id: str) -> None:
        """Unmount the container's image volumes and its root filesystem."""
        base = self.paths(container_id)["base"]
        volumes = base / "volumes"
        for point in mounts.mounts_under(str(volumes)) if volumes.is_dir() else []:
            self._unmount_one(point)
        self._unmount_one(str(self.paths(container_id)["merged"]))
        idmapped = base / "idmapped"
        for point in mounts.mounts_under(str(idmapped)) if idmapped.is_dir() else []:
            self._unmount_one(point)

    @staticmethod
    def _unmount_one(target: str) -> None:
        for _ in range(50):
            try:
                if not mounts.umount(target):
                    return
            except OSError as exc:
                if exc.errno == 16:  # EBUSY: a process still has it open; retry, then detach
                    time.sleep(0.1)
                    continue
                raise
        mounts.umount(target, lazy=True)

    def remove(self, container_id: str) -> None:
        self.unmount(container_id)
        base = self.paths(container_id)["base"]
        left = mounts.mounts_under(str(base)) if base.exists() else []
        if left:
            # Never delete through a mount: an idmapped layer's files are the image's.
            raise OSError(f"mounts {left} of container {container_id} are still there")
        shutil.rmtree(base, ignore_errors=True)

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
