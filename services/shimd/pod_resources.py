"""A pod's own cgroup: its resources (UpdatePodSandboxResources, the
kubelet's in-place pod resize) and its figures (PodSandboxStats).

The pod's cgroup is its linux.cgroup_parent, which holds its containers'
cgroups. No runtime owns it, so its limits are written as cgroup files through
the host's cgroup manager. A pod without a cgroup_parent of its own shares the
node's default parent with other pods: pyrio refuses to put one pod's limits
there.
"""

from __future__ import annotations

from typing import Any

from common.cgroups import CgroupManager
from common.config import Config
from common.errors import FailedPrecondition
from services.shimd import spec_resources, spec_validation

# Fields that add up when the pod's overhead is added to its containers' sum.
ADDITIVE_FIELDS = ("cpu_shares", "cpu_quota", "memory_limit_in_bytes", "memory_swap_limit_in_bytes")


def own_parent(config: Config, sandbox: dict[str, Any]) -> str:
    """The pod's own cgroup parent, "" when it uses the node's default one."""
    parent = spec_resources.pod_cgroup_parent(config, sandbox)
    return "" if parent == config.runtime.cgroup_parent else parent


def pod_limits(resources: dict[str, Any], overhead: dict[str, Any]) -> dict[str, Any]:
    """The pod cgroup's limits: its containers' sum plus its overhead, as the
    kubelet sizes a pod cgroup (an unlimited side keeps the total unlimited)."""
    combined = dict(resources)
    for field in ADDITIVE_FIELDS:
        mine, extra = int(resources.get(field) or 0), int(overhead.get(field) or 0)
        if mine > 0 and extra > 0:
            combined[field] = mine + extra
    return combined


def update(config: Config, cgroups: CgroupManager, sandbox: dict[str, Any],
           resources: dict[str, Any], overhead: dict[str, Any]) -> dict[str, Any]:
    spec_validation.validate_resources(resources, "resources")
    spec_validation.validate_resources(overhead, "overhead")
    parent = own_parent(config, sandbox)
    if not parent:
        raise FailedPrecondition(
            f"pod sandbox {sandbox['id'][:12]} has no cgroup of its own (its config has no linux.cgroup_parent; "
            f"its containers are under the node's {config.runtime.cgroup_parent}): cannot set pod-level resources"
        )
    limits = pod_limits(resources, overhead)
    cgroups.set(parent, limits)
    return limits


def stats(config: Config, cgroups: CgroupManager, sandbox: dict[str, Any]) -> dict[str, Any]:
    """The pod cgroup's cpu and memory figures ({} for a pod without a cgroup of its own)."""
    parent = own_parent(config, sandbox)
    if not parent:
        return {}
    return cgroups.layout.usage(cgroups.parent_cgroup(parent))
