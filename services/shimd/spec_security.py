"""Security settings of a container: capabilities, AppArmor and the masked and
read-only /proc and /sys paths (seccomp has its own module, spec_seccomp)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from common.errors import InvalidArgument

# CRI SecurityProfile.ProfileType (seccomp and AppArmor share it).
SECCOMP_RUNTIME_DEFAULT, SECCOMP_UNCONFINED, SECCOMP_LOCALHOST = 0, 1, 2

ALL_CAPABILITIES = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE", "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_IPC_LOCK", "CAP_IPC_OWNER",
    "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT", "CAP_SYS_PTRACE", "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE", "CAP_SYS_RESOURCE", "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE", "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP", "CAP_MAC_OVERRIDE", "CAP_MAC_ADMIN", "CAP_SYSLOG", "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ", "CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE",
]

DEFAULT_MASKED_PATHS = [
    "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
    "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi",
    "/sys/firmware", "/sys/devices/virtual/powercap",
]
DEFAULT_READONLY_PATHS = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]


def host_capabilities() -> list[str]:
    """The capabilities this process may hand on (its bounding set): a
    privileged container gets all of them, not ones the node itself lacks
    (runc fails to apply a capability outside its own bounding set)."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("CapBnd:"):
                    mask = int(line.split()[1], 16)
                    return [cap for bit, cap in enumerate(ALL_CAPABILITIES) if mask & (1 << bit)]
    except (OSError, ValueError):
        pass
    return list(ALL_CAPABILITIES)


def _cap_name(name: str) -> str:
    upper = name.upper()
    return upper if upper.startswith("CAP_") else f"CAP_{upper}"


def capabilities(default: list[str], security: dict[str, Any]) -> list[str]:
    if security.get("privileged"):
        return host_capabilities()
    requested = security.get("capabilities") or {}
    add = [_cap_name(cap) for cap in requested.get("add_capabilities") or []]
    drop = [_cap_name(cap) for cap in requested.get("drop_capabilities") or []]
    for cap in add + drop:
        if cap != "CAP_ALL" and cap not in ALL_CAPABILITIES:
            raise InvalidArgument(f"unknown capability {cap!r}")
    caps = [_cap_name(cap) for cap in default]
    # CRI-O's order: add ALL, drop ALL, then the named ones.
    if "CAP_ALL" in add:
        caps = host_capabilities()
    if "CAP_ALL" in drop:
        caps = []
    for cap in add:
        if cap != "CAP_ALL" and cap not in caps:
            caps.append(cap)
    caps = [cap for cap in caps if cap not in drop]
    return caps


def apparmor_profile(security: dict[str, Any]) -> str:
    enabled = Path("/sys/module/apparmor/parameters/enabled")
    try:
        if enabled.read_text().strip() != "Y":
            return ""
    except OSError:
        return ""
    profile = security.get("apparmor") or {}
    if profile:
        kind = int(profile.get("profile_type", 0))
        if kind == SECCOMP_UNCONFINED:
            return "unconfined"
        if kind == SECCOMP_LOCALHOST:
            return profile.get("localhost_ref", "")
        return ""
    legacy = security.get("apparmor_profile", "")
    return legacy[len("localhost/") :] if legacy.startswith("localhost/") else ("unconfined" if legacy == "unconfined" else "")
