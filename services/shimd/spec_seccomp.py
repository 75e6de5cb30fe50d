"""A container's linux.seccomp: the CRI's seccomp choice, and a moby-style
profile (seccomp_default.json or a Localhost file) made concrete for one
container, as moby's and containers-common's translation does: a rule's
includes/excludes are matched against the container's capabilities (its
bounding set), the node's architecture and kernel version, and archMap
contributes the node architecture's entry only."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

from common.errors import InvalidArgument
from services.shimd.request_files import read_regular_file
from services.shimd.spec_security import SECCOMP_LOCALHOST, SECCOMP_RUNTIME_DEFAULT, SECCOMP_UNCONFINED

SECCOMP_DEFAULT_PROFILE = Path(__file__).with_name("seccomp_default.json")
# The default profile is ~25 KB of JSON; a profile 40 times that is no
# profile, and reading it unbounded let one request take the node's memory.
MAX_SECCOMP_PROFILE_BYTES = 1 << 20

# uname machine -> (libseccomp's name, moby's Go-arch name used by includes/excludes.arches)
_ARCHES = {
    "x86_64": ("SCMP_ARCH_X86_64", "amd64"), "aarch64": ("SCMP_ARCH_AARCH64", "arm64"),
    "armv7l": ("SCMP_ARCH_ARM", "arm"), "i686": ("SCMP_ARCH_X86", "386"), "s390x": ("SCMP_ARCH_S390X", "s390x"),
    "ppc64le": ("SCMP_ARCH_PPC64LE", "ppc64le"), "riscv64": ("SCMP_ARCH_RISCV64", "riscv64"),
    "mips64": ("SCMP_ARCH_MIPS64", "mips64"), "mips64el": ("SCMP_ARCH_MIPSEL64", "mips64le"),
}


def seccomp_profile(security: dict[str, Any], caps: list[str]) -> dict[str, Any] | None:
    """linux.seccomp for a container, or None when it runs unconfined.

    As the CRI says, RuntimeDefault applies only when asked for: with
    `seccomp` unset and the deprecated `seccomp_profile_path` empty the
    container is unconfined (the kubelet always sends an explicit profile)."""
    if security.get("privileged"):
        return None
    profile = security.get("seccomp")
    if profile is not None:
        kind = int(profile.get("profile_type", SECCOMP_RUNTIME_DEFAULT))
        localhost = profile.get("localhost_ref", "")
    else:
        legacy = security.get("seccomp_profile_path", "")
        if legacy in ("runtime/default", "docker/default"):
            kind, localhost = SECCOMP_RUNTIME_DEFAULT, ""
        elif legacy in ("", "unconfined"):
            kind, localhost = SECCOMP_UNCONFINED, ""
        elif legacy.startswith("localhost/"):
            kind, localhost = SECCOMP_LOCALHOST, legacy[len("localhost/") :]
        else:
            raise InvalidArgument(f"unknown seccomp_profile_path {legacy[:200]!r}: use runtime/default, unconfined or localhost/<path>")
    if kind == SECCOMP_UNCONFINED:
        return None
    if kind == SECCOMP_LOCALHOST:
        if not localhost or not os.path.isabs(localhost):
            raise InvalidArgument(f"seccomp Localhost profile needs an absolute path, got {localhost[:200]!r}")
        data = read_regular_file(localhost, MAX_SECCOMP_PROFILE_BYTES, "seccomp Localhost profile")
        try:
            raw = json.loads(data)
        except ValueError as exc:
            raise InvalidArgument(f"seccomp profile {localhost} is not valid JSON: {exc}") from None
        where = f"seccomp profile {localhost}"
    elif kind == SECCOMP_RUNTIME_DEFAULT:
        raw = runtime_default()
        where = "the RuntimeDefault seccomp profile"
    else:
        raise InvalidArgument(f"unknown seccomp profile_type {kind}")
    try:
        return profile_for(raw, caps)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise InvalidArgument(f"{where} is not a valid seccomp profile: {type(exc).__name__}: {exc}") from None


def runtime_default() -> dict[str, Any]:
    return json.loads(SECCOMP_DEFAULT_PROFILE.read_text())


def profile_for(raw: dict[str, Any], caps: list[str], machine: str = "", kernel: str = "") -> dict[str, Any]:
    """An OCI seccomp object from a moby-style profile, for a container with
    bounding set `caps` on a node of `machine` (uname -m) and `kernel`."""
    if not isinstance(raw, dict):
        raise TypeError("the profile must be a JSON object")
    machine = machine or platform.machine()
    kernel = kernel or os.uname().release
    native, go_arch = _ARCHES.get(machine, ("", machine))
    syscalls = []
    for rule in raw.get("syscalls") or []:
        if not _applies(rule, caps, go_arch, kernel):
            continue
        names = rule.get("names") or ([rule["name"]] if rule.get("name") else [])
        if not names or not all(isinstance(name, str) for name in names):
            raise ValueError(f"a rule has no syscall names: {json.dumps(rule)[:200]}")
        entry: dict[str, Any] = {"names": list(names), "action": str(rule["action"])}
        if rule.get("args"):
            entry["args"] = [dict(arg) for arg in rule["args"]]
        if "errnoRet" in rule:
            entry["errnoRet"] = int(rule["errnoRet"])
        syscalls.append(entry)
    result: dict[str, Any] = {"defaultAction": str(raw.get("defaultAction", "SCMP_ACT_ERRNO")), "syscalls": syscalls}
    architectures = [str(arch) for arch in raw.get("architectures") or []]
    for arch_map in raw.get("archMap") or []:
        if arch_map["architecture"] == native:
            architectures.append(native)
            architectures.extend(arch_map.get("subArchitectures") or [])
    if architectures:
        result["architectures"] = architectures
    if "defaultErrnoRet" in raw:
        result["defaultErrnoRet"] = int(raw["defaultErrnoRet"])
    return result


def _applies(rule: dict[str, Any], caps: list[str], go_arch: str, kernel: str) -> bool:
    excludes = rule.get("excludes") or {}
    includes = rule.get("includes") or {}
    if go_arch in (excludes.get("arches") or []):
        return False
    if any(cap in caps for cap in excludes.get("caps") or []):
        return False
    if excludes.get("minKernel") and _kernel_at_least(kernel, excludes["minKernel"]):
        return False
    if includes.get("arches") and go_arch not in includes["arches"]:
        return False
    if not all(cap in caps for cap in includes.get("caps") or []):
        return False
    if includes.get("minKernel") and not _kernel_at_least(kernel, includes["minKernel"]):
        return False
    return True


def _kernel_at_least(release: str, minimum: str) -> bool:
    def version(text: str) -> tuple[int, ...]:
        parts = []
        for piece in text.split("-")[0].split(".")[:3]:
            digits = "".join(ch for ch in piece if ch.isdigit())
            parts.append(int(digits or 0))
        return tuple(parts)

    return version(release) >= version(str(minimum))
