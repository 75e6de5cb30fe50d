"""Mounts and devices of a container: the standard /proc, /dev, /sys mounts,
the CRI config's volumes and devices, the termination-message file and the
image's VOLUMEs."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import Any

from common.errors import FailedPrecondition, InvalidArgument, NotFound
from common.mounts import mount_of
from common.runtime_features import HandlerFeatures

log = logging.getLogger("pyrio.shimd.spec")

# CRI MountPropagation -> the OCI mount option.
PROPAGATION_PRIVATE, PROPAGATION_HOST_TO_CONTAINER, PROPAGATION_BIDIRECTIONAL = 0, 1, 2
PROPAGATION_OPTIONS = {PROPAGATION_PRIVATE: "rprivate", PROPAGATION_HOST_TO_CONTAINER: "rslave",
                       PROPAGATION_BIDIRECTIONAL: "rshared"}

# The devices every container gets (runc's defaults), as OCI device entries.
DEFAULT_DEVICE_RULES = [
    {"allow": False, "access": "rwm"},
    {"allow": True, "type": "c", "major": 1, "minor": 3, "access": "rwm"},  # null
    {"allow": True, "type": "c", "major": 1, "minor": 5, "access": "rwm"},  # zero
    {"allow": True, "type": "c", "major": 1, "minor": 7, "access": "rwm"},  # full
    {"allow": True, "type": "c", "major": 1, "minor": 8, "access": "rwm"},  # random
    {"allow": True, "type": "c", "major": 1, "minor": 9, "access": "rwm"},  # urandom
    {"allow": True, "type": "c", "major": 5, "minor": 0, "access": "rwm"},  # tty
    {"allow": True, "type": "c", "major": 5, "minor": 2, "access": "rwm"},  # ptmx
    {"allow": True, "type": "c", "major": 136, "access": "rwm"},  # pts
]


def standard_mounts(privileged: bool, shm_path: str, shm_size: int) -> list[dict[str, Any]]:
    sys_options = ["nosuid", "noexec", "nodev", "rw" if privileged else "ro"]
    mounts = [
        {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": sys_options},
        {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
         "options": ["nosuid", "noexec", "nodev", "relatime", "rw" if privileged else "ro"]},
    ]
    if shm_path:
        mounts.append({"destination": "/dev/shm", "type": "bind", "source": shm_path, "options": ["rbind", "rprivate", "rw"]})
    else:
        mounts.append({"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
                       "options": ["nosuid", "noexec", "nodev", "mode=1777", f"size={shm_size}"]})
    return mounts


def image_volume_images(config: dict[str, Any]) -> list[str]:
    """The images the config mounts as volumes (CRI Mount.image), in mount order."""
    return [image for mount in config.get("mounts") or [] if (image := (mount.get("image") or {}).get("image", ""))]


def cri_mounts(config: dict[str, Any], features: HandlerFeatures, image_volumes: list[str] | None = None) -> list[dict[str, Any]]:
    """The config's volumes as OCI bind mounts, each checked against the
    host (propagation) and the handler (recursive read-only). `image_volumes`
    are where imaged mounted the images of image_volume_images(config)."""
    mounts = []
    volume_paths = iter(image_volumes or [])
    for mount in config.get("mounts") or []:
        destination = mount.get("container_path", "")
        source = mount.get("host_path", "")
        if not destination or not os.path.isabs(destination):
            raise InvalidArgument(f"mount container_path must be an absolute path, got {destination!r}")
        if (mount.get("image") or {}).get("image"):
            mounts.append(_image_mount(mount, destination, next(volume_paths, ""), features))
            continue
        if not source or not os.path.isabs(source):
            raise InvalidArgument(f"mount host_path must be an absolute path, got {source!r}")
        if not os.path.exists(source):
            # As CRI-O does: a missing hostPath directory is created.
            try:
                os.makedirs(source, exist_ok=True)
            except OSError as exc:
                raise InvalidArgument(f"mount host_path {source} does not exist and cannot be created: {exc}") from None
        propagation = int(mount.get("propagation", 0))
        if propagation not in PROPAGATION_OPTIONS:
            raise InvalidArgument(f"unknown mount propagation {propagation}")
        source = os.path.realpath(source)
        if mount.get("recursive_read_only"):
            _check_recursive_read_only(mount, destination, features)
        _check_host_propagation(source, destination, propagation)
        options = ["rbind", PROPAGATION_OPTIONS[propagation], "ro" if mount.get("readonly") else "rw"]
        if mount.get("recursive_read_only"):
            options.append("rro")
        mounts.append({"destination": destination, "type": "bind", "source": source, "options": options})
    return mounts


def _image_mount(mount: dict[str, Any], destination: str, volume: str, features: HandlerFeatures) -> dict[str, Any]:
    """An image volume: imaged's read-only overlay of the image (or a
    directory of it, image_sub_path), read-only and noexec as the CRI says."""
    if mount.get("host_path"):
        raise InvalidArgument(f"mount {destination}: host_path and image are mutually exclusive")
    if not volume:
        raise InvalidArgument(f"mount {destination}: the image volume was not prepared")
    source = volume
    sub_path = mount.get("image_sub_path", "")
    if sub_path:
        if os.path.isabs(sub_path) or ".." in Path(sub_path).parts:
            raise InvalidArgument(f"mount {destination}: image_sub_path {sub_path!r} must be a relative path inside the image")
        # realpath follows the image's symlinks from the host's /: one that leaves the image is refused.
        source = os.path.realpath(os.path.join(volume, sub_path))
        if source != volume and not source.startswith(volume + "/"):
            raise InvalidArgument(f"mount {destination}: image_sub_path {sub_path!r} leads out of the image")
        if not os.path.exists(source):
            raise NotFound(f"mount {destination}: image_sub_path {sub_path!r} does not exist in image "
                           f"{(mount.get('image') or {}).get('image', '')}")
    options = ["rbind", "rprivate", "ro", "nosuid", "nodev", "noexec"]
    if mount.get("recursive_read_only"):
        _check_recursive_read_only(mount, destination, features)
        options.append("rro")
    return {"destination": destination, "type": "bind", "source": source, "options": options}


def _check_host_propagation(source: str, destination: str, propagation: int) -> None:
    """As CRI-O: Bidirectional needs the host path on a shared mount (else the
    container's mounts could not reach the host), HostToContainer on a shared
    or slave one (else the host's could not reach the container)."""
    if propagation == PROPAGATION_PRIVATE:
        return
    host_mount = mount_of(source)
    if propagation == PROPAGATION_BIDIRECTIONAL and not host_mount.shared:
        raise FailedPrecondition(
            f"mount {source} -> {destination} asks for Bidirectional propagation but {source} is on mount "
            f"{host_mount.mount_point}, which is not a shared mount (make it one: mount --make-rshared "
            f"{host_mount.mount_point})"
        )
    if propagation == PROPAGATION_HOST_TO_CONTAINER and not (host_mount.shared or host_mount.slave):
        raise FailedPrecondition(
            f"mount {source} -> {destination} asks for HostToContainer propagation but {source} is on mount "
            f"{host_mount.mount_point}, which is neither a shared nor a slave mount (make it one: mount "
            f"--make-rshared {host_mount.mount_point})"
        )


def _check_recursive_read_only(mount: dict[str, Any], destination: str, features: HandlerFeatures) -> None:
    # The CRI comments' rules for recursive_read_only.
    if not mount.get("readonly"):
        raise InvalidArgument(f"mount {destination}: recursive_read_only needs readonly to be true as well")
    if int(mount.get("propagation", 0)) != PROPAGATION_PRIVATE:
        raise InvalidArgument(f"mount {destination}: recursive_read_only needs private propagation (PROPAGATION_PRIVATE)")
    if not features.recursive_read_only_mounts:
        raise InvalidArgument(
            f"mount {destination}: recursive_read_only is not supported by this runtime handler "
            "(its runtime lacks the rro mount option or the kernel mount_setattr; see Status runtime_handlers)"
        )


def rootfs_propagation(mounts: list[dict[str, Any]]) -> str:
    """linux.rootfsPropagation a container's mounts need ("" for the
    runtime's default): rshared for a Bidirectional one, rslave for a
    HostToContainer one, as containerd and CRI-O set it."""
    options = {option for mount in mounts for option in mount.get("options") or []}
    if "rshared" in options:
        return "rshared"
    if "rslave" in options:
        return "rslave"
    return ""


def device_entries(config: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(linux.devices, resources.devices rules) for the config's Device entries."""
    devices, rules = [], []
    for device in config.get("devices") or []:
        host_path = device.get("host_path", "")
        container_path = device.get("container_path", "") or host_path
        permissions = device.get("permissions", "") or "rwm"
        try:
            info = os.stat(host_path)
        except OSError as exc:
            raise InvalidArgument(f"device {host_path!r}: {exc.strerror}") from None
        if stat.S_ISCHR(info.st_mode):
            kind = "c"
        elif stat.S_ISBLK(info.st_mode):
            kind = "b"
        else:
            raise InvalidArgument(f"{host_path} is not a device")
        major, minor = os.major(info.st_rdev), os.minor(info.st_rdev)
        devices.append({"path": container_path, "type": kind, "major": major, "minor": minor,
                        "fileMode": stat.S_IMODE(info.st_mode), "uid": info.st_uid, "gid": info.st_gid})
        rules.append({"allow": True, "type": kind, "major": major, "minor": minor, "access": permissions})
    return devices, rules


def host_devices() -> list[dict[str, Any]]:
    """Every device node of the host's /dev, for privileged containers."""
    devices = []
    for directory, subdirs, files in os.walk("/dev"):
        subdirs[:] = [name for name in subdirs if name not in ("pts", "shm", "mqueue", "fd")]
        for name in files:
            path = os.path.join(directory, name)
            try:
                info = os.lstat(path)
            except OSError:
                continue
            if stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode):
                if path in ("/dev/console", "/dev/ptmx", "/dev/tty"):
                    continue
                devices.append({"path": path, "type": "c" if stat.S_ISCHR(info.st_mode) else "b",
                                "major": os.major(info.st_rdev), "minor": os.minor(info.st_rdev),
                                "fileMode": stat.S_IMODE(info.st_mode), "uid": info.st_uid, "gid": info.st_gid})
    return devices


def termination_log_path(container_dir: Path) -> Path:
    return container_dir / "termination-log"


def termination_message_source(cri: dict[str, Any], container_dir: Path) -> Path | None:
    """The host file holding the termination message: the kubelet's own mount
    at terminationMessagePath when it made one, else the file pyrio mounted."""
    path = termination_message_path(cri)
    if not path:
        return None
    for mount in cri.get("mounts") or []:
        if mount.get("container_path") == path:
            return Path(mount.get("host_path", ""))
    return termination_log_path(container_dir)


def termination_message_path(cri: dict[str, Any]) -> str:
    # The kubelet passes it as an annotation; CRI-O reads the same one.
    path = (cri.get("annotations") or {}).get("io.kubernetes.container.terminationMessagePath", "")
    return path if path and os.path.isabs(path) else ""


def make_image_volumes(rootfs: str, image_config: dict[str, Any]) -> None:
    # CRI-O's default image_volumes=mkdir: the image's VOLUMEs are plain
    # directories in the writable layer.
    for volume in (image_config.get("Volumes") or {}):
        target = Path(rootfs) / volume.lstrip("/")
        try:
            resolved = target.resolve()
            if Path(rootfs).resolve() in resolved.parents:
                resolved.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            log.warning("cannot create image volume", extra={"volume": volume, "error": str(exc)})
