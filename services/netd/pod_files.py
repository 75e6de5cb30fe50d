"""Per-pod files the containers mount: resolv.conf, hostname, hosts, /dev/shm.

They live in `<state_dir>/netd/pods/<sandbox_id>/`; the shm directory there
is a tmpfs of `runtime.shm_size` bytes for pods with their own IPC
namespace (a hostIPC pod uses the node's /dev/shm).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from common import mounts
from common.errors import InvalidArgument
from common.state import atomic_write_bytes

HOST_RESOLV_CONF = "/etc/resolv.conf"
HOST_SHM = "/dev/shm"


def resolv_conf_text(dns_config: dict[str, Any] | None) -> str:
    """resolv.conf from a CRI DNSConfig; the node's own when none is given."""
    servers = list((dns_config or {}).get("servers", []))
    searches = list((dns_config or {}).get("searches", []))
    options = list((dns_config or {}).get("options", []))
    if not (servers or searches or options):
        try:
            return Path(HOST_RESOLV_CONF).read_text()
        except FileNotFoundError:
            return ""
    for item in servers + searches + options:
        if not item or any(char.isspace() for char in item):
            raise InvalidArgument(f"DNS config entry {item!r} is empty or contains whitespace")
    lines = [f"nameserver {server}" for server in servers]
    if searches:
        lines.append("search " + " ".join(searches))
    if options:
        lines.append("options " + " ".join(options))
    return "\n".join(lines) + "\n"


def hosts_text(hostname: str, ip: str) -> str:
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    if ip and hostname:
        lines.append(f"{ip}\t{hostname}")
    return "\n".join(lines) + "\n"


def pod_dir(state_dir: Path, sandbox_id: str) -> Path:
    return state_dir / "pods" / sandbox_id


def write_pod_files(directory: Path, hostname: str, dns_config: dict[str, Any] | None) -> dict[str, str]:
    directory.mkdir(parents=True, exist_ok=True, mode=0o711)
    files = {
        "resolv_conf": str(directory / "resolv.conf"),
        "hostname": str(directory / "hostname"),
        "hosts": str(directory / "hosts"),
    }
    atomic_write_bytes(files["resolv_conf"], resolv_conf_text(dns_config).encode(), 0o644)
    atomic_write_bytes(files["hostname"], f"{hostname}\n".encode(), 0o644)
    atomic_write_bytes(files["hosts"], hosts_text(hostname, "").encode(), 0o644)
    return files


def write_hosts(path: str, hostname: str, ip: str) -> None:
    atomic_write_bytes(path, hosts_text(hostname, ip).encode(), 0o644)


def mount_shm(directory: Path, size: int) -> str:
    target = directory / "shm"
    target.mkdir(parents=True, exist_ok=True)
    if mounts.is_mount_point(str(target)):
        return str(target)
    options = "mode=1777" + (f",size={size}" if size else "")
    mounts.mount("shm", str(target), "tmpfs", mounts.MS_NOSUID | mounts.MS_NODEV | mounts.MS_NOEXEC, options)
    return str(target)


def remove_pod_files(directory: Path) -> None:
    """Unmount the pod's shm and delete its files; fine when already gone."""
    if not directory.exists():
        return
    mounts.umount_all_under(str(directory))
    if mounts.mounts_under(str(directory)):
        raise OSError(f"cannot unmount everything under {directory}")
    shutil.rmtree(directory, ignore_errors=True)
    if os.path.exists(directory):
        raise OSError(f"cannot remove {directory}")


def unmount_shm(directory: Path) -> None:
    mounts.umount_all_under(str(directory / "shm"))
