"""What a runtime handler (its OCI runtime binary) and this kernel support.

crigw advertises these in Status (runtime_handlers[].features) and shimd
refuses a container that asks for a feature its handler lacks. The answer comes
from `<runtime> features` (runc >= 1.1, crun >= 1.9): `rro` in mountOptions,
`linux.mountExtensions.idmap.enabled` for idmapped mounts. crun 1.8 has no
`features` command; what it supports was tested on a bundle (docs/host-features.md):
both `rro` and idmapped mounts (the `idmap` option and mounts[].uidMappings).
A feature also needs the kernel's mount_setattr(2) (Linux 5.12).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import json
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

SYS_MOUNT_SETATTR = 442  # x86_64 and arm64 (the unified syscall table since 5.12)
# crun versions without `features` whose support was tested for real.
CRUN_TESTED = {"rro": (1, 8), "idmap": (1, 8)}
PROBE_TIMEOUT_SECONDS = 10.0


@dataclass(frozen=True)
class HandlerFeatures:
    recursive_read_only_mounts: bool = False
    idmapped_mounts: bool = False
    user_namespaces: bool = False
    evidence: str = ""


@functools.lru_cache(maxsize=1)
def kernel_has_mount_setattr() -> bool:
    """mount_setattr exists: called with a bad fd it fails EBADF/EINVAL, not ENOSYS."""
    libc = ctypes.CDLL(None, use_errno=True)
    result = libc.syscall(SYS_MOUNT_SETATTR, -1, b"", 0, None, 0)
    return not (result == -1 and ctypes.get_errno() == errno.ENOSYS)


def kernel_has_user_namespaces() -> bool:
    try:
        return int(Path("/proc/sys/user/max_user_namespaces").read_text()) > 0
    except (OSError, ValueError):
        return False


def _version(text: str) -> tuple[int, ...]:
    found = re.search(r"version (\d+)\.(\d+)(?:\.(\d+))?", text)
    return tuple(int(part) for part in found.groups() if part is not None) if found else ()


def _run(path: str, *args: str) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run([path, *args], capture_output=True, text=True, timeout=PROBE_TIMEOUT_SECONDS)
    except (OSError, subprocess.TimeoutExpired):
        return None


@functools.lru_cache(maxsize=16)
def _probe(path: str, mtime: float) -> HandlerFeatures:
    rro = idmap = False
    evidence = ""
    answer = _run(path, "features")
    if answer is not None and answer.returncode == 0:
        try:
            features = json.loads(answer.stdout)
        except ValueError:
            features = {}
        rro = "rro" in (features.get("mountOptions") or [])
        idmap = bool((((features.get("linux") or {}).get("mountExtensions") or {}).get("idmap") or {}).get("enabled"))
        evidence = f"{path} features"
    else:
        version_answer = _run(path, "--version")
        text = version_answer.stdout if version_answer is not None else ""
        if text.startswith("crun"):
            version = _version(text)
            rro = version >= CRUN_TESTED["rro"]
            idmap = version >= CRUN_TESTED["idmap"]
            evidence = f"crun {'.'.join(map(str, version))} (no features command; tested versions)"
    mount_setattr = kernel_has_mount_setattr()
    return HandlerFeatures(
        recursive_read_only_mounts=rro and mount_setattr,
        idmapped_mounts=idmap and mount_setattr,
        user_namespaces=idmap and mount_setattr and kernel_has_user_namespaces(),
        evidence=evidence,
    )


def handler_features(runtime_path: str) -> HandlerFeatures:
    """The features of the runtime at `runtime_path` (probed once per binary version)."""
    try:
        mtime = os.stat(runtime_path).st_mtime
    except OSError:
        return HandlerFeatures(evidence=f"{runtime_path} does not exist")
    return _probe(runtime_path, mtime)
