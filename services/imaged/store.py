"""The image store on disk: blobs, unpacked layers, image and rootfs records.

    <store_dir>/blobs/sha256/<hex>     manifests and configs, verified
    <store_dir>/layers/<hex>/          one layer (named by its diff id hex):
        diff/                          its files, overlayfs-ready
        layer.json                     {diff_id, digest, size}
    <store_dir>/l/<short>              short symlinks to layer diffs (long mounts)
    <store_dir>/images/<hex>.json      image records, by config digest
    <store_dir>/containers/<id>.json   rootfs records: the truth of "in use"
    <store_dir>/rootfs/<id>/           upper, work, merged of a container
    <store_dir>/tmp/                   downloads and unpacks in progress

Every directory of the store is 0700 (fixed at start for stores made
laxer): layers and rootfs hold whatever an image brought, setuid-root
programs and 0666 device nodes included, and no host user may reach them.

Every step that commits is a rename (of a verified blob, of a fully
unpacked layer directory) or an atomic record write, so a SIGKILL leaves
either nothing or a complete object; `tmp/` is emptied at start, and layers
no image or container references are collected then.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
import os
import shutil
import threading
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from common import state
from common.errors import NotFound

log = logging.getLogger("pyrio.imaged.store")

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def syncfs(path: str) -> None:
    """Flush the filesystem holding `path`: an unpacked layer must be on
    disk before the rename that makes it visible survives a power cut."""
    descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        _libc.syncfs(descriptor)
    finally:
        os.close(descriptor)


def hex_of(digest: str) -> str:
    return digest.split(":", 1)[-1]


class Store:
    def __init__(self, root: str) -> None:
        self.root = Path(root)
        self.blobs = self.root / "blobs" / "sha256"
        self.layers = self.root / "layers"
        self.links = self.root / "l"
        self.images = self.root / "images"
        self.containers = self.root / "containers"
        self.rootfs = self.root / "rootfs"
        self.tmp = self.root / "tmp"
        # Guards every decision that reads and then changes records
        # (tagging, removal, rootfs creation) within this process; imaged is
        # the only writer of its store.
        self.lock = threading.RLock()
        self._pins: dict[str, int] = {}
        # diff id -> [lock, holders and waiters]; dropped when nobody needs it.
        self._layer_locks: dict[str, list[Any]] = {}

    # --- start-up -----------------------------------------------------------

    def open(self) -> None:
        # Every directory 0700, existing ones included: a layer tree holds
        # whatever its image brought (setuid-root programs, 0666 device
        # nodes), which no host user may reach, as containers-storage does.
        state.private_dir(self.root)
        for directory in (self.blobs.parent, self.blobs, self.layers, self.links, self.images, self.containers, self.rootfs):
            state.private_dir(directory)
        for parent in (self.layers, self.rootfs):
            for entry in parent.iterdir():
                if entry.is_dir() and not entry.is_symlink():
                    os.chmod(entry, state.PRIVATE_DIR_MODE)
        # Whatever is in tmp/ belongs to a pull a crash interrupted.
        shutil.rmtree(self.tmp, ignore_errors=True)
        state.private_dir(self.tmp)
        for directory in (self.images, self.containers, self.blobs):
            state.remove_stale_temp_files(directory)
        self.collect_garbage()

    def temp_path(self, kind: str) -> Path:
        return self.tmp / f"{kind}-{uuid.uuid4().hex}"

    def make_layer_staging(self) -> Path:
        """A new private staging dir with an empty `diff/` inside. The diff's
        own mode is the one a layer's root directory gets (0755, like any
        unpacked tree); the 0700 staging dir, renamed into place as the
        layer dir, is what keeps host users out."""
        staging = self.temp_path("layer")
        os.mkdir(staging, state.PRIVATE_DIR_MODE)
        os.mkdir(staging / "diff", 0o755)
        os.chmod(staging / "diff", 0o755)
        return staging

    # --- blobs --------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        return self.blobs / hex_of(digest)

    def put_blob(self, digest: str, data: bytes) -> None:
        if not self.blob_path(digest).exists():
            state.atomic_write_bytes(self.blob_path(digest), data, 0o644)

    def read_blob_json(self, digest: str) -> dict[str, Any]:
        try:
            return json.loads(self.blob_path(digest).read_bytes())
        except FileNotFoundError:
            raise NotFound(f"blob {digest} is not in the image store") from None

    # --- layers -------------------------------------------------------------

    def layer_dir(self, diff_id: str) -> Path:
        return self.layers / hex_of(diff_id)

    def layer_diff(self, diff_id: str) -> Path:
        return self.layer_dir(diff_id) / "diff"

    def has_layer(self, diff_id: str) -> bool:
        return (self.layer_dir(diff_id) / "layer.json").exists()

    def layer_record(self, diff_id: str) -> dict[str, Any]:
        return state.read_json(self.layer_dir(diff_id) / "layer.json", default={}) or {}

    @contextmanager
    def layer_lock(self, diff_id: str) -> Iterator[None]:
        """One pull at a time fetches a given layer; the others wait and reuse it."""
        with self.lock:
            entry = self._layer_locks.setdefault(diff_id, [threading.Lock(), 0])
            entry[1] += 1
        try:
            with entry[0]:
                yield
        finally:
            with self.lock:
                entry[1] -= 1
                if entry[1] == 0:
                    del self._layer_locks[diff_id]

    def commit_layer(self, staging: Path, diff_id: str, record: dict[str, Any]) -> None:
        """Make a fully unpacked staging dir (with diff/ inside) the layer."""
        state.atomic_write_json(staging / "layer.json", record)
        syncfs(str(staging))
        os.rename(staging, self.layer_dir(diff_id))
        state.fsync_dir(self.layers)

    def short_link(self, diff_id: str) -> str:
        """`l/<short>` relative to the store root, created on first use."""
        name = hex_of(diff_id)[:16]
        link = self.links / name
        target = f"../layers/{hex_of(diff_id)}/diff"
        try:
            if os.readlink(link) == target:
                return f"l/{name}"
        except FileNotFoundError:
            pass
        temporary = self.links / f".{name}.{uuid.uuid4().hex[:8]}.tmp"
        os.symlink(target, temporary)
        os.replace(temporary, link)
        return f"l/{name}"

    def pin_layers(self, diff_ids: list[str]) -> None:
        """Keep layers of a pull in progress from garbage collection."""
        with self.lock:
            for diff_id in diff_ids:
                self._pins[diff_id] = self._pins.get(diff_id, 0) + 1

    def unpin_layers(self, diff_ids: list[str]) -> None:
        with self.lock:
            for diff_id in diff_ids:
                count = self._pins.get(diff_id, 0) - 1
                if count <= 0:
                    self._pins.pop(diff_id, None)
                else:
                    self._pins[diff_id] = count

    def remove_layer(self, diff_id: str) -> None:
        directory = self.layer_dir(diff_id)
        if not directory.exists():
            return
        # Rename first: a crash mid-rmtree must not leave a half layer that
        # still looks complete.
        doomed = self.temp_path("removed-layer")
        os.rename(directory, doomed)
        state.fsync_dir(self.layers)
        try:
            link = self.links / hex_of(diff_id)[:16]
            os.unlink(link)
        except FileNotFoundError:
            pass
        shutil.rmtree(doomed, ignore_errors=True)

    # --- image records ------------------------------------------------------

    def image_path(self, image_id: str) -> Path:
        return self.images / f"{hex_of(image_id)}.json"

    def list_images(self) -> list[dict[str, Any]]:
        return [record for _, record in state.iter_json_records(self.images)]

    def get_image(self, image_id: str) -> dict[str, Any] | None:
        return state.read_json(self.image_path(image_id))

    def put_image(self, record: dict[str, Any]) -> None:
        state.atomic_write_json(self.image_path(record["id"]), record, 0o644)

    def delete_image_record(self, image_id: str) -> None:
        state.remove_file(self.image_path(image_id))

    # --- container rootfs records ------------------------------------------

    def container_path(self, container_id: str) -> Path:
        return self.containers / f"{container_id}.json"

    def list_containers(self) -> list[dict[str, Any]]:
        return [record for _, record in state.iter_json_records(self.containers)]

    def get_container(self, container_id: str) -> dict[str, Any] | None:
        return state.read_json(self.container_path(container_id))

    def put_container(self, record: dict[str, Any]) -> None:
        state.atomic_write_json(self.container_path(record["container_id"]), record)

    def delete_container_record(self, container_id: str) -> None:
        state.remove_file(self.container_path(container_id))

    def containers_using(self, image_id: str) -> list[str]:
        """Containers whose rootfs or one of whose image volumes is the image."""
        return sorted(
            record["container_id"] for record in self.list_containers()
            if record.get("image_id") == image_id
            or any(volume.get("image_id") == image_id for volume in record.get("image_volumes") or [])
        )

    # --- garbage ------------------------------------------------------------

    def collect_garbage(self) -> dict[str, int]:
        """Remove layers and blobs that no image, container or pull in
        progress refers to (left by removals, or by pulls a crash stopped)."""
        with self.lock:
            images = self.list_images()
            containers = self.list_containers()
            wanted_layers = set(self._pins)
            wanted_blobs = set()
            for record in images:
                wanted_layers.update(record.get("layers", []))
                wanted_blobs.update(hex_of(digest) for digest in record.get("blobs", []))
            for record in containers:
                wanted_layers.update(record.get("layers", []))
                for volume in record.get("image_volumes") or []:
                    wanted_layers.update(volume.get("layers", []))
            removed_layers = removed_blobs = 0
            for entry in list(self.layers.iterdir()):
                if f"sha256:{entry.name}" not in wanted_layers:
                    self.remove_layer(f"sha256:{entry.name}")
                    removed_layers += 1
            for entry in list(self.blobs.iterdir()):
                # Pulls write their blobs and record together under the
                # lock, so an unreferenced blob here is garbage.
                if entry.name not in wanted_blobs and not entry.name.startswith("."):
                    entry.unlink(missing_ok=True)
                    removed_blobs += 1
            for entry in list(self.links.iterdir()):
                if not os.path.exists(entry):
                    entry.unlink(missing_ok=True)
        if removed_layers or removed_blobs:
            log.info("collected garbage", extra={"layers": removed_layers, "blobs": removed_blobs})
        return {"layers": removed_layers, "blobs": removed_blobs}

    # --- usage ----------------------------------------------------------------

    @staticmethod
    def disk_usage(path: Path) -> tuple[int, int]:
        """(bytes, inodes) used by the tree at path, counting hard links once."""
        seen: set[tuple[int, int]] = set()
        used_bytes = inodes = 0
        stack = [str(path)]
        while stack:
            current = stack.pop()
            try:
                entries = os.scandir(current)
            except (FileNotFoundError, NotADirectoryError, PermissionError):
                continue
            with entries:
                for entry in entries:
                    try:
                        info = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    key = (info.st_dev, info.st_ino)
                    if key in seen:
                        continue
                    seen.add(key)
                    inodes += 1
                    used_bytes += info.st_blocks * 512
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
        return used_bytes, inodes
