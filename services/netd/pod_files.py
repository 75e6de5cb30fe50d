"""Per-pod files the containers mount: resolv.conf, hostname, hosts, /dev/shm.

They live in `<state_dir>/netd/pods/<sandbox_id>/`; the shm directory there
is a tmpfs of `runtime.shm_size` bytes for pods with their own IPC
namespace (a hostIPC pod uses the node's /dev/shm).
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
from pathlib import Path
from typing import Any

from common import mounts
from common.errors import InvalidArgument
from common.state import atomic_write_bytes

HOST_RESOLV_CONF = "/etc/resolv.conf"
HOST_SHM = "/dev/shm"
# Linux's HOST_NAME_MAX; the kubelet sends a DNS label (63) for pod networks,
# the node's own name for hostNetwork pods.
MAX_HOSTNAME_LENGTH = 64
# An RFC 1123 label: letters, digits and inner hyphens, 1-63 characters.
_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def validate_hostname(hostname: str) -> None:
    """InvalidArgument unless `hostname` is an RFC 1123 subdomain that fits a UTS name.

    The kubelet validates a pod's hostname as a DNS label; a hostNetwork
    pod's is the node's, which may have dots and capitals (RFC 1123 allows
    both). Anything else (a newline, a space) would reach /etc/hosts.
    """
    if len(hostname) > MAX_HOSTNAME_LENGTH:
        raise InvalidArgument(f"hostname {hostname!r} is longer than {MAX_HOSTNAME_LENGTH} characters")
    if not all(_LABEL.fullmatch(label) for label in hostname.split(".")):
        raise InvalidArgument(
            f"hostname {hostname!r} is not an RFC 1123 name: dot-separated labels of letters, digits "
            "and inner hyphens, each 1-63 characters"
        )


def _is_ip_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def validate_dns_config(dns_config: dict[str, Any] | None) -> None:
    """InvalidArgument for a DNS server that is not an IP address, or a
    search or option that is empty or holds whitespace or a control character."""
    config = dns_config or {}
    for server in config.get("servers", []):
        if not _is_ip_address(server):
            raise InvalidArgument(f"DNS server {server!r} is not an IP address")
    for kind in ("searches", "options"):
        for item in config.get(kind, []):
            if not item or any(char.isspace() or ord(char) < 0x20 or ord(char) == 0x7F for char in item):
                raise InvalidArgument(f"DNS config {kind} entry {item!r} is empty or holds whitespace or a control character")


def validate_log_directory(log_directory: str) -> None:
    """The kubelet's pod log directory must be absolute: a relative one
    would land in the daemon's working directory."""
    if not log_directory:
        return
    if not os.path.isabs(log_directory) or any(char in log_directory for char in "\0\n"):
        raise InvalidArgument(f"log_directory {log_directory!r} must be an absolute path without NUL or newline")


def validate_host_ip(host_ip: str) -> None:
    if host_ip and not _is_ip_address(host_ip):
        raise InvalidArgument(f"port mapping host_ip {host_ip!r} is not an IP address")


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
    validate_dns_config(dns_config)
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
