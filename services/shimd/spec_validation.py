"""Checks of the values a CRI container config hands on to the runtime.

Each is decided before anything is made (no rootfs, record or cgroup yet) so
a value runc or the kernel would refuse is INVALID_ARGUMENT naming the CRI
field, never an INTERNAL from deep inside `runc create`. Bounds are the
kernel's own (cpu.shares 2..262144, CFS period 1 ms..1 s, quota at least
1 ms, uid_t, oom_score_adj) or, where the kernel has none that helps, those
of CRI-O (a 12 MiB memory minimum) and execve (the argument and environment
sizes a process can be started with).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

from common.errors import InvalidArgument

MIN_CPU_SHARES, MAX_CPU_SHARES = 2, 262144
MIN_CPU_PERIOD, MAX_CPU_PERIOD = 1000, 1000000  # µs: the kernel's CFS period bounds
MIN_CPU_QUOTA, MAX_CPU_QUOTA = 1000, (1 << 44) - 1  # µs; -1 is "no limit"
# CRI-O's minimum: below it runc's init and the container cannot even start.
MIN_MEMORY_LIMIT = 12 << 20
MAX_ID = (1 << 32) - 2  # (uid_t)-1 means "unchanged" to setuid, not a user
# execve takes at most a quarter of the stack rlimit (2 MiB under the usual
# 8 MiB) for arguments and environment, and 128 KiB per string; stay under it
# so a container that starts here starts anywhere.
MAX_EXEC_STRING = 128 << 10
MAX_EXEC_BYTES = 1 << 20
MAX_ENV_ENTRIES = 32768

CPU_ONLINE = Path("/sys/devices/system/cpu/online")
NODE_ONLINE = Path("/sys/devices/system/node/online")


def validate_container_config(config: dict[str, Any]) -> None:
    """InvalidArgument naming the field for the first value of `config` (a CRI
    ContainerConfig) that the runtime could not apply."""
    linux = config.get("linux") or {}
    security = linux.get("security_context") or {}
    _validate_user(security)
    working_dir = config.get("working_dir") or ""
    if working_dir and (not os.path.isabs(working_dir) or "\0" in working_dir):
        raise InvalidArgument(f"working_dir must be an absolute path, got {working_dir[:200]!r}")
    validate_resources(linux.get("resources") or {}, "linux.resources")
    validate_process_size([*(config.get("command") or []), *(config.get("args") or [])],
                          [f"{env.get('key', '')}={env.get('value', '')}" for env in config.get("envs") or []], "the config's")


def _validate_user(security: dict[str, Any]) -> None:
    field = "linux.security_context"
    if "run_as_group" in security and "run_as_user" not in security and not security.get("run_as_username"):
        # The CRI: run_as_group "should only be specified when run_as_user or
        # run_as_username is specified; otherwise, the runtime MUST error".
        raise InvalidArgument(f"{field}.run_as_group is set but neither {field}.run_as_user nor {field}.run_as_username is")
    for key in ("run_as_user", "run_as_group"):
        if key in security:
            _check_id(int((security[key] or {}).get("value", 0)), f"{field}.{key}")
    for group in security.get("supplemental_groups") or []:
        _check_id(int(group), f"{field}.supplemental_groups")


def _check_id(value: int, field: str) -> None:
    if not 0 <= value <= MAX_ID:
        raise InvalidArgument(f"{field} must be between 0 and {MAX_ID}, got {value}")


def validate_resources(resources: dict[str, Any], field: str) -> None:
    """The CRI LinuxContainerResources of a create or UpdateContainerResources."""
    shares = int(resources.get("cpu_shares") or 0)
    if shares and not MIN_CPU_SHARES <= shares <= MAX_CPU_SHARES:
        raise InvalidArgument(f"{field}.cpu_shares must be between {MIN_CPU_SHARES} and {MAX_CPU_SHARES}, got {shares}")
    period = int(resources.get("cpu_period") or 0)
    if period and not MIN_CPU_PERIOD <= period <= MAX_CPU_PERIOD:
        raise InvalidArgument(f"{field}.cpu_period must be between {MIN_CPU_PERIOD} and {MAX_CPU_PERIOD} µs, got {period}")
    quota = int(resources.get("cpu_quota") or 0)
    if quota and quota != -1 and not MIN_CPU_QUOTA <= quota <= MAX_CPU_QUOTA:
        raise InvalidArgument(f"{field}.cpu_quota must be -1 (no limit) or between {MIN_CPU_QUOTA} and {MAX_CPU_QUOTA} µs, got {quota}")
    for key, online in (("cpuset_cpus", CPU_ONLINE), ("cpuset_mems", NODE_ONLINE)):
        if resources.get(key):
            _check_cpuset(str(resources[key]), online, f"{field}.{key}")
    limit = int(resources.get("memory_limit_in_bytes") or 0)
    if limit and not limit >= MIN_MEMORY_LIMIT:
        raise InvalidArgument(f"{field}.memory_limit_in_bytes must be 0 (no limit) or at least {MIN_MEMORY_LIMIT} bytes "
                              f"(12 MiB), got {limit}")
    swap = int(resources.get("memory_swap_limit_in_bytes") or 0)
    if swap and swap != -1 and (swap < 0 or (limit and swap < limit)):
        raise InvalidArgument(f"{field}.memory_swap_limit_in_bytes must be -1, 0 or at least memory_limit_in_bytes, got {swap}")
    oom = int(resources.get("oom_score_adj") or 0)
    if not -1000 <= oom <= 1000:
        raise InvalidArgument(f"{field}.oom_score_adj must be between -1000 and 1000, got {oom}")


def _check_cpuset(text: str, online: Path, field: str) -> None:
    """A cpuset list ("0-3,6") whose every member this node has online."""
    available = _parse_cpuset(_read_online(online), field) if online.exists() else None
    wanted = _parse_cpuset(text, field)
    if available is not None and not wanted <= available:
        missing = ",".join(str(member) for member in sorted(wanted - available)[:8])
        raise InvalidArgument(f"{field} {text[:100]!r} names {missing}, not online on this node (online: {_read_online(online)})")


def _read_online(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _parse_cpuset(text: str, field: str) -> set[int]:
    members: set[int] = set()
    for part in text.strip().split(","):
        low, dash, high = part.strip().partition("-")
        if not low.isdigit() or (dash and not high.isdigit()) or len(part) > 12:
            raise InvalidArgument(f"{field} must be a list like 0-3,6, got {text[:100]!r}")
        first, last = int(low), int(high) if dash else int(low)
        if first > last or last >= 1 << 16:
            raise InvalidArgument(f"{field} has a bad range {part!r} in {text[:100]!r}")
        members.update(range(first, last + 1))
    return members


def validate_process_size(args: list[str], env: list[str], whose: str) -> None:
    """The argv and environment a container process starts with fit execve."""
    if len(env) > MAX_ENV_ENTRIES:
        raise InvalidArgument(f"{whose} environment has {len(env)} entries; at most {MAX_ENV_ENTRIES} are allowed")
    total = 0
    for kind, strings in (("argument", args), ("environment entry", env)):
        for value in strings:
            size = len(value.encode(errors="surrogateescape")) + 1
            if size > MAX_EXEC_STRING:
                raise InvalidArgument(f"{whose} {kind} {value[:40]!r}... is {size} bytes; at most {MAX_EXEC_STRING} are allowed")
            total += size
    if total > MAX_EXEC_BYTES:
        raise InvalidArgument(f"{whose} command and environment are {total} bytes together; at most {MAX_EXEC_BYTES} are allowed")


def validate_log_path(log_path: str) -> None:
    """The shim appends the container's output to log_path: it must be a
    regular file or not exist yet. A FIFO would block the shim's open, and a
    device (log_directory /dev, log_path sda) would take the output onto it."""
    try:
        info = os.lstat(log_path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise InvalidArgument(f"log_path {log_path[:200]} cannot be used: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        kind = "a symlink" if stat.S_ISLNK(info.st_mode) else "not a regular file"
        raise InvalidArgument(f"log_path {log_path[:200]} (log_directory + log_path) is {kind}: "
                              "container logs go only to a regular file or a new one")
