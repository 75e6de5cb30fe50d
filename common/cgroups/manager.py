"""CgroupManager: the one object a service asks about cgroups (see common/cgroups/__init__.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from common.cgroups import systemd, systemd_dbus
from common.cgroups.files import read_keyed
from common.cgroups.hierarchy import Hierarchy, detect
from common.cgroups.resources import file_values, oci_resources
from common.cgroups.v1 import V1Layout
from common.cgroups.v2 import V2Layout
from common.errors import FailedPrecondition, InvalidArgument

CGROUPFS, SYSTEMD = "cgroupfs", "systemd"
# The prefix of every unit and cgroup pyrio names: pyrio-<container id>(.scope).
CONTAINER_PREFIX = "pyrio"


class CgroupManager:
    def __init__(self, hierarchy: Hierarchy, driver: str = CGROUPFS) -> None:
        if driver not in (CGROUPFS, SYSTEMD):
            raise InvalidArgument(f"unknown cgroup driver {driver!r} (cgroupfs or systemd)")
        self.hierarchy = hierarchy
        self.driver = driver
        self.layout: V1Layout | V2Layout = V2Layout(hierarchy) if hierarchy.unified else V1Layout(hierarchy)

    @property
    def systemd(self) -> bool:
        return self.driver == SYSTEMD

    # --- names ----------------------------------------------------------------

    def pod_parent(self, parent: str) -> str:
        """A pod's cgroup parent in this driver's form (InvalidArgument when it has none): with systemd a
        slice name (a cgroupfs-style path is converted, as CRI allows), with cgroupfs an absolute path."""
        if self.systemd:
            return systemd.slice_of(parent)
        if not parent.startswith("/") or any(part in (".", "..") for part in parent.split("/")):
            raise InvalidArgument(
                f"cgroup parent {parent!r} must be an absolute cgroup path like /kubepods/burstable/pod<uid> "
                "with the cgroupfs driver" + (" (a .slice name needs runtime.cgroup_manager = \"systemd\")"
                                              if parent.endswith(".slice") else "")
            )
        return "/" + parent.strip("/")

    def validate_parent(self, parent: str) -> None:
        """InvalidArgument when `parent` is no cgroup parent this driver takes."""
        self.pod_parent(parent)

    def container_cgroups_path(self, parent: str, container_id: str) -> str:
        """linux.cgroupsPath of a container: runc/crun make the cgroup (or the scope) from it."""
        parent = self.pod_parent(parent)
        if self.systemd:
            return systemd.runc_cgroups_path(parent, CONTAINER_PREFIX, container_id)
        return f"{parent.rstrip('/')}/{CONTAINER_PREFIX}-{container_id}"

    def cgroup_of(self, cgroups_path: str) -> str:
        """Where a container's cgroupsPath is in the hierarchy ("/kubepods.slice/.../pyrio-<id>.scope")."""
        if self.systemd and ":" in cgroups_path:
            return systemd.cgroup_of(cgroups_path)
        return "/" + cgroups_path.strip("/")

    def parent_cgroup(self, parent: str) -> str:
        """Where a pod's cgroup parent is in the hierarchy."""
        parent = self.pod_parent(parent)
        return systemd.expand_slice(parent) if self.systemd else parent

    def directories(self, cgroup: str) -> dict[str, Path]:
        """controller (or "unified") -> the cgroup's directory."""
        return self.layout.directories(cgroup)

    # --- resources -----------------------------------------------------------

    def oci_resources(self, resources: dict[str, Any]) -> dict[str, Any]:
        """linux.resources for the runtime from CRI LinuxContainerResources."""
        return oci_resources(resources, self.hierarchy)

    def set(self, parent: str, resources: dict[str, Any]) -> None:
        """Give a pod's cgroup CRI resources (the pod's own limits: UpdatePodSandboxResources)."""
        parent = self.pod_parent(parent)
        files = file_values(resources, self.hierarchy)
        if self.systemd:
            properties = systemd.unit_properties(resources, self.hierarchy)
            try:
                systemd_dbus.set_unit_properties(parent, properties)
            except FailedPrecondition as exc:
                if systemd_dbus.NO_SUCH_UNIT not in str(exc):
                    raise
                systemd_dbus.start_transient_unit(parent, [("Description", ("s", "pyrio pod slice")), *properties])
            # systemd makes the slice's cgroup (and enables its controllers) when it starts.
            systemd_dbus.start_unit(parent)
        cgroup = self.parent_cgroup(parent)
        try:
            self.layout.write(cgroup, files, create=not self.systemd)
        except OSError as exc:
            raise FailedPrecondition(f"cannot set the resources of cgroup {cgroup}: {exc}") from None

    # --- processes ------------------------------------------------------------

    def apply(self, pid: int, parent: str, name: str, description: str = "") -> str:
        """Put process `pid` in a cgroup of its own named `name` under `parent` (a scope `name`.scope with
        systemd, started over D-Bus). Returns the cgroup."""
        parent = self.pod_parent(parent)
        if self.systemd:
            unit = f"{name}.scope"
            systemd_dbus.start_transient_unit(unit, [
                ("Description", ("s", description or f"pyrio {name}")),
                ("Slice", ("s", parent)),
                ("PIDs", ("au", [pid])),
                # Not stopped in the shutdown ordering of other units, as CRI-O's conmon scopes.
                ("DefaultDependencies", ("b", False)),
                ("CollectMode", ("s", "inactive-or-failed")),
            ])
            return f"{self.parent_cgroup(parent).rstrip('/')}/{unit}"
        cgroup = f"{parent.rstrip('/')}/{name}"
        try:
            self.layout.create(cgroup, pid)
        except OSError as exc:
            raise FailedPrecondition(f"cannot move process {pid} into cgroup {cgroup}: {exc}") from None
        return cgroup

    def remove(self, cgroup: str) -> None:
        """Remove a cgroup `apply` made (stop its scope with systemd); its processes must be gone."""
        if self.systemd:
            unit = cgroup.rstrip("/").rsplit("/", 1)[-1]
            if unit.endswith((".scope", ".slice")):
                systemd_dbus.stop_unit(unit)
                return
        self.layout.remove(cgroup)

    # --- figures -----------------------------------------------------------

    def stats(self, cgroups_path: str) -> dict[str, Any]:
        """CRI ContainerStats' cpu and memory (and swap on v2); {} when the cgroup is gone."""
        return self.layout.usage(self.cgroup_of(cgroups_path))

    def process_count(self, cgroups_path: str) -> int | None:
        try:
            return len(self.layout.procs_file(self.cgroup_of(cgroups_path)).read_text().split())
        except OSError:
            return None

    def oom_files(self, cgroups_path: str) -> list[str]:
        """The files whose `oom_kill` counts the cgroup's OOM kills (memory.events on v2)."""
        return self.layout.oom_files(self.cgroup_of(cgroups_path))

    def oom_kills(self, cgroups_path: str) -> int:
        return max((read_keyed(Path(path)).get("oom_kill", 0) for path in self.oom_files(cgroups_path)), default=0)


def manager_for(driver: str, hierarchy: Hierarchy | None = None) -> CgroupManager:
    """The manager of this host for a configured driver (`runtime.cgroup_manager`)."""
    if driver == SYSTEMD and not systemd_dbus.systemd_booted():
        raise FailedPrecondition(
            'runtime.cgroup_manager = "systemd" but systemd is not PID 1 on this host (no /run/systemd/system): '
            'use "cgroupfs"'
        )
    return CgroupManager(hierarchy or detect(), driver)
