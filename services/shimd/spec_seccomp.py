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

# What runc's libseccomp takes (OCI runtime spec, config-linux.md#seccomp):
# anything else would fail deep inside `runc create`.
ACTIONS = {"SCMP_ACT_KILL", "SCMP_ACT_KILL_PROCESS", "SCMP_ACT_KILL_THREAD", "SCMP_ACT_TRAP", "SCMP_ACT_ERRNO",
           "SCMP_ACT_TRACE", "SCMP_ACT_ALLOW", "SCMP_ACT_LOG"}
OPERATORS = {"SCMP_CMP_NE", "SCMP_CMP_LT", "SCMP_CMP_LE", "SCMP_CMP_EQ", "SCMP_CMP_GE", "SCMP_CMP_GT", "SCMP_CMP_MASKED_EQ"}

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
        entry: dict[str, Any] = {"names": list(names), "action": _known(str(rule["action"]), ACTIONS, "action")}
        if rule.get("args"):
            entry["args"] = [_argument(arg) for arg in rule["args"]]
        if "errnoRet" in rule:
            entry["errnoRet"] = int(rule["errnoRet"])
        syscalls.append(entry)
    default_action = _known(str(raw.get("defaultAction", "SCMP_ACT_ERRNO")), ACTIONS, "defaultAction")
    result: dict[str, Any] = {"defaultAction": default_action, "syscalls": syscalls}
    architectures = [str(arch) for arch in raw.get("architectures") or []]
    if any(not arch.startswith("SCMP_ARCH_") for arch in architectures):
        raise ValueError(f"architectures must be SCMP_ARCH_* names, got {architectures[:8]}")
    for arch_map in raw.get("archMap") or []:
        if arch_map["architecture"] == native:
            architectures.append(native)
            architectures.extend(arch_map.get("subArchitectures") or [])
    if architectures:
        result["architectures"] = architectures
    if "defaultErrnoRet" in raw:
        result["defaultErrnoRet"] = int(raw["defaultErrnoRet"])
    return result


def _known(value: str, allowed: set[str], what: str) -> str:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value[:60]!r} (one of {', '.join(sorted(allowed))})")
    return value


def _argument(arg: dict[str, Any]) -> dict[str, Any]:
    """One syscall argument comparison, with the integer ranges the kernel filter takes."""
    result = {"index": int(arg["index"]), "value": int(arg.get("value", 0)), "valueTwo": int(arg.get("valueTwo", 0)),
              "op": _known(str(arg["op"]), OPERATORS, "op")}
    if not 0 <= result["index"] <= 5:
        raise ValueError(f"argument index must be 0-5, got {result['index']}")
    for key in ("value", "valueTwo"):
        if not 0 <= result[key] < 1 << 64:
            raise ValueError(f"argument {key} must fit 64 unsigned bits, got {result[key]}")
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
