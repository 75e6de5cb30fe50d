"""Security settings of a container: capabilities, seccomp, AppArmor and the
masked and read-only /proc and /sys paths."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from common.errors import InvalidArgument
from services.shimd.request_files import read_regular_file

SECCOMP_DEFAULT_PROFILE = Path(__file__).with_name("seccomp_default.json")
# The moby default profile is ~25 KB of JSON; a profile 40 times that is no
# profile, and reading it unbounded let one request take the node's memory.
MAX_SECCOMP_PROFILE_BYTES = 1 << 20

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


def seccomp_profile(security: dict[str, Any], caps: list[str]) -> dict[str, Any] | None:
    if security.get("privileged"):
        return None
    profile = security.get("seccomp")
    if profile is not None:
        kind = int(profile.get("profile_type", SECCOMP_RUNTIME_DEFAULT))
        localhost = profile.get("localhost_ref", "")
    else:
        legacy = security.get("seccomp_profile_path", "")
        if legacy in ("", "runtime/default", "docker/default"):
            kind, localhost = SECCOMP_RUNTIME_DEFAULT, ""
        elif legacy == "unconfined":
            kind, localhost = SECCOMP_UNCONFINED, ""
        elif legacy.startswith("localhost/"):
            kind, localhost = SECCOMP_LOCALHOST, legacy[len("localhost/") :]
        else:
            raise InvalidArgument(f"unknown seccomp profile {legacy!r}")
    if kind == SECCOMP_UNCONFINED:
        return None
    if kind == SECCOMP_LOCALHOST:
        if not localhost or not os.path.isabs(localhost):
            raise InvalidArgument(f"seccomp Localhost profile needs an absolute path, got {localhost!r}")
        data = read_regular_file(localhost, MAX_SECCOMP_PROFILE_BYTES, "seccomp Localhost profile")
        try:
            raw = json.loads(data)
        except ValueError as exc:
            raise InvalidArgument(f"seccomp profile {localhost} is not valid JSON: {exc}") from None
    else:
        raw = json.loads(SECCOMP_DEFAULT_PROFILE.read_text())
    return _profile_for(raw, caps)


def _profile_for(raw: dict[str, Any], caps: list[str]) -> dict[str, Any]:
    """An OCI seccomp object from a moby-style profile, for this container's caps."""
    syscalls = []
    for rule in raw.get("syscalls") or []:
        excluded = (rule.get("excludes") or {}).get("caps") or []
        included = (rule.get("includes") or {}).get("caps") or []
        if excluded and any(cap in caps for cap in excluded):
            continue
        if included and not all(cap in caps for cap in included):
            continue
        names = rule.get("names") or ([rule["name"]] if rule.get("name") else [])
        entry: dict[str, Any] = {"names": names, "action": rule["action"]}
        for key in ("args", "errnoRet"):
            if key in rule:
                entry[key] = rule[key]
        syscalls.append(entry)
    result: dict[str, Any] = {"defaultAction": raw.get("defaultAction", "SCMP_ACT_ERRNO"), "syscalls": syscalls}
    architectures = list(raw.get("architectures") or [])
    for arch_map in raw.get("archMap") or []:
        architectures.append(arch_map["architecture"])
        architectures.extend(arch_map.get("subArchitectures") or [])
    if architectures:
        result["architectures"] = architectures
    if "defaultErrnoRet" in raw:
        result["defaultErrnoRet"] = raw["defaultErrnoRet"]
    return result


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
