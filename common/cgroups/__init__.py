"""Cgroups behind one interface, for v1, hybrid and v2 hierarchies and both drivers.

As youki's libcgroups: one `CgroupManager`, chosen once from the config
(`runtime.cgroup_manager`) and the hierarchy detected at start, with
- the names: the OCI cgroupsPath of a container (runc/crun create its cgroup and
  apply its resources; `oci_resources` converts CRI resources for them), and the
  cgroup a cgroupsPath or a pod parent is in the tree;
- `apply`: a process pyrio starts (a shim, a pod's PID holder) into a cgroup of
  its own under a pod parent: a directory with cgroupfs, a transient scope over
  D-Bus with systemd;
- `set`: CRI resources written to a pod's cgroup (no runtime owns it);
- `stats`, `process_count`, `oom_files`/`oom_kills`: read from the v1 or v2 files;
- `remove`: a cgroup or unit pyrio made.
"""

from common.cgroups import systemd, systemd_dbus
from common.cgroups.hierarchy import CGROUP_ROOT, HYBRID, V1, V2, Hierarchy, detect
from common.cgroups.manager import CGROUPFS, CONTAINER_PREFIX, SYSTEMD, CgroupManager, manager_for
from common.cgroups.resources import check_unified, cpu_weight

__all__ = [
    "CGROUP_ROOT", "CGROUPFS", "CONTAINER_PREFIX", "SYSTEMD", "V1", "V2", "HYBRID", "CgroupManager", "Hierarchy",
    "check_unified", "cpu_weight", "detect", "manager_for", "systemd", "systemd_dbus",
]
