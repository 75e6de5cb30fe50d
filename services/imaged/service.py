"""imaged: images, the blob and layer store, and container root filesystems.

RPC methods (docs/ARCHITECTURE.md): image.pull, image.status, image.list,
image.remove, image.fs_info, rootfs.prepare, rootfs.remove, rootfs.usage,
rootfs.list.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

from common.config import Config
from common.errors import AlreadyExists, Internal, InvalidArgument, NotFound, FailedPrecondition
from common.rpc import CallContext, RpcServer
from services.imaged.pull import Puller
from services.imaged.reference import Reference, is_image_id, parse_reference
from services.imaged.rootfs import RootfsManager
from services.imaged.store import Store

log = logging.getLogger("pyrio.imaged")

_CONTAINER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_HEX_PREFIX = re.compile(r"^[a-f0-9]{3,64}$")


def user_of(config: dict[str, Any]) -> tuple[int | None, str]:
    """(uid, username) the image runs as, as containerd reports them: a
    numeric user is a uid, anything else a name; the group is dropped."""
    user = str((config.get("config") or {}).get("User") or "")
    if not user:
        return None, ""
    user = user.split(":", 1)[0]
    if user.isdigit():
        return int(user), ""
    return None, user


class ImageDaemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.store = Store(config.image.store_dir)
        self.store.open()
        self.rootfs = RootfsManager(self.store)
        self.rootfs.remove_orphans({record["container_id"] for record in self.store.list_containers()})
        self._remount_rootfs()
        self.puller = Puller(self.store, config.image)

    def _remount_rootfs(self) -> None:
        """Mounts outlive imaged restarts; after a node reboot they are gone,
        so put back every container root filesystem the records promise."""
        for record in self.store.list_containers():
            if self.rootfs.is_mounted(record["container_id"]):
                continue
            try:
                self.rootfs.mount(record)
                log.info("remounted root filesystem", extra={"container_id": record["container_id"]})
            except OSError as exc:
                log.error("cannot remount root filesystem", extra={"container_id": record["container_id"], "error": str(exc)})

    def health(self) -> dict[str, Any]:
        return {"ready": True, "reason": "", "store_dir": str(self.store.root)}

    def close(self) -> None:
        self.puller.close()

    def register(self, server: RpcServer) -> None:
        for method, handler in (
            ("image.pull", self.pull),
            ("image.pull_abandon", self.pull_abandon),
            ("image.status", self.status),
            ("image.list", self.list),
            ("image.remove", self.remove),
            ("image.fs_info", self.fs_info),
            ("rootfs.prepare", self.prepare_rootfs),
            ("rootfs.remove", self.remove_rootfs),
            ("rootfs.usage", self.rootfs_usage),
            ("rootfs.list", self.list_rootfs),
        ):
            server.register(method, handler)

    # --- lookup ---------------------------------------------------------------

    def find_image(self, text: str) -> tuple[dict[str, Any] | None, Reference | None]:
        """The image a reference, id or short id names (None if none), and
        the parsed reference when `text` was one."""
        text = (text or "").strip()
        if not text:
            raise InvalidArgument("image must not be empty")
        records = self.store.list_images()
        if is_image_id(text):
            wanted = text if text.startswith("sha256:") else f"sha256:{text}"
            return next((record for record in records if record["id"] == wanted), None), None
        reference: Reference | None = None
        try:
            reference = parse_reference(text)
        except InvalidArgument:
            if not _HEX_PREFIX.match(text.removeprefix("sha256:")):
                raise
        if reference is not None:
            for record in records:
                if reference.digest:
                    if reference.with_digest(reference.digest) in record.get("repo_digests", []):
                        return record, reference
                elif reference.tagged() in record.get("repo_tags", []):
                    return record, reference
        prefix = text.removeprefix("sha256:")
        if _HEX_PREFIX.match(prefix):
            matches = [record for record in records if record["id"].removeprefix("sha256:").startswith(prefix)]
            if len(matches) > 1:
                raise InvalidArgument(f"image id prefix {prefix!r} is ambiguous: it matches {len(matches)} images")
            if matches:
                return matches[0], None
        return None, reference

    def _image_dict(self, record: dict[str, Any]) -> dict[str, Any]:
        config = self._config_of(record)
        uid, username = user_of(config)
        image: dict[str, Any] = {
            "id": record["id"],
            "repo_tags": list(record.get("repo_tags", [])),
            "repo_digests": list(record.get("repo_digests", [])),
            "size": int(record.get("size", 0)),
            "username": username,
            "pinned": self._pinned(record),
            "spec": {"image": record["id"]},
        }
        if uid is not None:
            image["uid"] = uid
        return image

    def _pinned(self, record: dict[str, Any]) -> bool:
        """Whether image.pinned_images names this image (by reference, id,
        or a prefix ending in "*")."""
        names = record.get("repo_tags", []) + record.get("repo_digests", [])
        for pattern in self.config.image.pinned_images:
            if pattern.endswith("*"):
                matched = any(name.startswith(pattern[:-1]) for name in names)
            elif is_image_id(pattern):
                matched = record["id"].removeprefix("sha256:") == pattern.removeprefix("sha256:")
            else:
                try:
                    matched = str(parse_reference(pattern)) in names
                except InvalidArgument:
                    matched = False
            if matched:
                return True
        return False

    def _config_of(self, record: dict[str, Any]) -> dict[str, Any]:
        try:
            return self.store.read_blob_json(record["id"])
        except NotFound:
            raise Internal(f"image {record['id']}: its config blob is missing from the store") from None

    # --- image methods ------------------------------------------------------------

    def pull(self, params: dict[str, Any], call: CallContext) -> dict[str, Any]:
        image = str(params.get("image") or "")
        if not image.strip():
            raise InvalidArgument("image must not be empty")
        # The caller's deadline: past it nobody can use what a download brings.
        record = self.puller.pull(image, params.get("auth"), call.deadline, str(params.get("waiter") or ""))
        return {"image_ref": record["id"]}

    def pull_abandon(self, params: dict[str, Any], _call: CallContext) -> dict[str, Any]:
        """The caller of a pull went away (crigw saw its gRPC call cancelled)."""
        return {"abandoned": self.puller.abandon(str(params.get("waiter") or ""))}

    def status(self, params: dict[str, Any], _call: CallContext) -> dict[str, Any]:
        record, _ = self.find_image(str(params.get("image") or ""))
        if record is None:
            # CRI: an unknown image is an empty answer, not an error.
            return {"image": None, "info": {}}
        info: dict[str, Any] = {}
        if params.get("verbose"):
            info = {
                "imageSpec": self._config_of(record),
                "manifestDigest": record.get("manifest_digest", ""),
                "layers": record.get("layers", []),
                "pulledAt": record.get("pulled_at", 0),
                "containers": self.store.containers_using(record["id"]),
            }
        return {"image": self._image_dict(record), "info": info}

    def list(self, params: dict[str, Any], _call: CallContext) -> list[dict[str, Any]]:
        wanted = str(params.get("filter_image") or "")
        if wanted:
            record, _ = self.find_image(wanted)
            records = [record] if record else []
        else:
            records = self.store.list_images()
        return [self._image_dict(record) for record in sorted(records, key=lambda item: item.get("created_at", 0))]

    def remove(self, params: dict[str, Any], _call: CallContext) -> dict[str, Any]:
        """Remove a tag, or the image once nothing names or uses it.

        By tag: the tag goes; the image goes with its last tag unless a
        container uses it (then it stays, untagged, as CRI-O keeps it).
        By id or digest: the image goes with all its tags, unless a
        container uses it: FailedPrecondition naming the containers.
        """
        text = str(params.get("image") or "")
        with self.store.lock:
            record, reference = self.find_image(text)
            if record is None:
                return {}  # idempotent: already gone
            users = self.store.containers_using(record["id"])
            tag = reference.tagged() if reference is not None and not reference.digest else ""
            if tag and tag in record["repo_tags"] and (len(record["repo_tags"]) > 1 or users):
                record["repo_tags"].remove(tag)
                repository = reference.repository if reference else ""
                if not any(other.rsplit(":", 1)[0] == repository for other in record["repo_tags"]):
                    record["repo_digests"] = [d for d in record["repo_digests"] if d.split("@", 1)[0] != repository]
                self.store.put_image(record)
                log.info("untagged", extra={"image_id": record["id"], "tag": tag, "in_use_by": users})
                return {}
            if users:
                raise FailedPrecondition(
                    f"image {text} ({record['id']}) is in use by container(s) {', '.join(user[:12] for user in users)}; "
                    "remove those containers first"
                )
            self.store.delete_image_record(record["id"])
            self.store.collect_garbage()
            log.info("removed image", extra={"image_id": record["id"]})
        return {}

    def fs_info(self, _params: dict[str, Any], _call: CallContext) -> dict[str, Any]:
        """Usage of the store: layers, blobs, records and containers' writable
        layers. Images and containers share one filesystem here, so both
        lists carry the same entry, as CRI-O answers by default: a different
        container mountpoint would tell the kubelet the disk is split."""
        used_bytes = inodes_used = 0
        for directory in (self.store.layers, self.store.blobs, self.store.images, self.store.links):
            used, inodes = self.store.disk_usage(directory)
            used_bytes += used
            inodes_used += inodes
        for record in self.store.list_containers():
            # Only the upper dirs: walking merged/ would count the image again.
            used, inodes = self.rootfs.usage(record["container_id"])
            used_bytes += used
            inodes_used += inodes
        usage = {"timestamp": time.time_ns(), "fs_id": {"mountpoint": str(self.store.root)},
                 "used_bytes": used_bytes, "inodes_used": inodes_used}
        return {"image_filesystems": [usage], "container_filesystems": [dict(usage)]}

    # --- root filesystems -------------------------------------------------------------

    @staticmethod
    def _container_id(params: dict[str, Any]) -> str:
        container_id = str(params.get("container_id") or "")
        if not _CONTAINER_ID.match(container_id):
            raise InvalidArgument(f"invalid container id {container_id!r}")
        return container_id

    def _image_volume(self, text: str) -> dict[str, Any]:
        """An image a container mounts as a volume (CRI Mount.image): present and complete."""
        record, _ = self.find_image(text)
        if record is None:
            raise NotFound(f"image {text!r} of an image volume is not present: pull it first")
        if any(not self.store.has_layer(diff_id) for diff_id in record["layers"]):
            raise FailedPrecondition(f"image {text!r} of an image volume is incomplete in the store: pull it again")
        return {"image": text, "image_id": record["id"], "layers": record["layers"]}

    def _rootfs_answer(self, container: dict[str, Any], merged: str) -> dict[str, Any]:
        image = self.store.get_image(container["image_id"]) or {}
        config = self.store.read_blob_json(container["image_id"])
        return {
            "rootfs": merged,
            "image_volumes": [str(self.rootfs.volume_path(container["container_id"], index))
                              for index in range(len(container.get("image_volumes") or []))],
            "image_id": container["image_id"],
            "image_name": container.get("image_name", ""),
            "repo_digest": (image.get("repo_digests") or container.get("repo_digests") or [""])[0],
            "config": config.get("config") or {},
        }

    def prepare_rootfs(self, params: dict[str, Any], _call: CallContext) -> dict[str, Any]:
        """Mount a container's overlay root; idempotent per container id."""
        container_id = self._container_id(params)
        image_text = str(params.get("image") or "")
        with self.store.lock:
            record, reference = self.find_image(image_text)
            if record is None:
                raise NotFound(f"image {image_text!r} is not present: pull it first")
            existing = self.store.get_container(container_id)
            missing = [diff_id for diff_id in record["layers"] if not self.store.has_layer(diff_id)]
            if missing:
                raise FailedPrecondition(
                    f"image {image_text!r} is incomplete in the store ({len(missing)} layer(s) missing, "
                    f"first {missing[0]}): pull it again"
                )
            volumes = [self._image_volume(str(text)) for text in params.get("image_volumes") or []]
            if existing is not None and existing["image_id"] != record["id"]:
                raise AlreadyExists(f"container {container_id} already has a root filesystem from image {existing['image_id']}")
            container = existing or {
                "container_id": container_id,
                "image_id": record["id"],
                "image_name": reference.tagged() if reference is not None and reference.tagged() in record["repo_tags"]
                else (record["repo_tags"] or [""])[0],
                "repo_digests": record.get("repo_digests", []),
                "layers": record["layers"],
                "image_volumes": volumes,
                # A user-namespaced pod's pinned namespace: the layers are idmapped with it.
                "idmap_userns": str(params.get("idmap_userns") or ""),
                "idmap_root": [int(value) for value in params.get("idmap_root") or (0, 0)],  # the pod root's host uid, gid
                "created_at": time.time_ns(),
            }
            if existing is None:
                # The record first: it is what a later remove (or restart) undoes.
                self.store.put_container(container)
            try:
                merged = self.rootfs.mount(container)
            except OSError as exc:
                if existing is None:
                    self.rootfs.remove(container_id)
                    self.store.delete_container_record(container_id)
                raise Internal(f"cannot mount the root filesystem of container {container_id}: {exc}") from None
            return self._rootfs_answer(container, merged)

    def remove_rootfs(self, params: dict[str, Any], _call: CallContext) -> dict[str, Any]:
        container_id = self._container_id(params)
        with self.store.lock:
            try:
                self.rootfs.remove(container_id)
            except OSError as exc:
                raise Internal(f"cannot unmount the root filesystem of container {container_id}: {exc}") from None
            # The record last: a crash before this line is retried by the next remove.
            self.store.delete_container_record(container_id)
        return {}

    def rootfs_usage(self, params: dict[str, Any], _call: CallContext) -> dict[str, Any]:
        container_id = self._container_id(params)
        if self.store.get_container(container_id) is None:
            raise NotFound(f"container {container_id} has no root filesystem")
        used, inodes = self.rootfs.usage(container_id)
        return {"used_bytes": used, "inodes_used": inodes, "mountpoint": str(self.rootfs.paths(container_id)["upper"])}

    def list_rootfs(self, _params: dict[str, Any], _call: CallContext) -> list[dict[str, Any]]:
        return [
            {**record, "rootfs": str(self.rootfs.paths(record["container_id"])["merged"]),
             "mounted": self.rootfs.is_mounted(record["container_id"])}
            for record in self.store.list_containers()
        ]


def build(config: Config, server: RpcServer) -> ImageDaemon:
    daemon = ImageDaemon(config)
    daemon.register(server)
    return daemon
