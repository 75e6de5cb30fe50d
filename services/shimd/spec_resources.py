"""Cgroup side of a container's spec: linux.cgroupsPath and linux.resources,
through the host's cgroup manager (common.cgroups: v1 or v2, cgroupfs or systemd)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from common.cgroups import CgroupManager
from common.config import Config


def own_oom_score_adj() -> int:
    try:
        return int(Path("/proc/self/oom_score_adj").read_text())
    except (OSError, ValueError):
        return 0


def pod_cgroup_parent(config: Config, sandbox: dict[str, Any]) -> str:
    return sandbox.get("cgroup_parent") or config.runtime.cgroup_parent


def cgroups_path(config: Config, cgroups: CgroupManager, sandbox: dict[str, Any], container_id: str) -> str:
    """The OCI cgroupsPath: <parent>/pyrio-<id> (cgroupfs) or <slice>:pyrio:<id> (systemd: pyrio-<id>.scope)."""
    return cgroups.container_cgroups_path(pod_cgroup_parent(config, sandbox), container_id)

