"""Values a CRI container config hands on to the runtime are checked before
anything is made: INVALID_ARGUMENT naming the field, and nothing left behind
(no record, no cgroup in any hierarchy, no rootfs). A create that fails
inside the runtime removes what it made too. Also the CRI's idempotent
StopContainer and its run_as_group rule.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import grpc
import pytest
from cri_api.v1 import api_pb2

from common.cgroups import CGROUPFS, CgroupManager, detect
from common.cgroups.parent_check import check_cgroup_parent
from common.errors import InvalidArgument
from tests.fixtures_containers import Containers
from tests.fixtures_pods import pod_config
from tests.oci_images import push_busybox

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _hierarchies() -> list[Path]:
    return sorted(entry for entry in CGROUP_ROOT.iterdir() if entry.is_dir() and not entry.is_symlink())


def _container_cgroups(parent: str) -> set[str]:
    """Every container cgroup under `parent`, in every hierarchy."""
    found = set()
    for hierarchy in _hierarchies():
        directory = hierarchy / parent.strip("/")
        if directory.is_dir():
            found.update(f"{hierarchy.name}:{entry.name}" for entry in directory.iterdir()
                         if entry.is_dir() and entry.name.startswith("pyrio-"))
    return found


def _entries(directory: Path) -> set[Path]:
    return set(directory.iterdir()) if directory.is_dir() else set()


def _resources(**fields) -> api_pb2.LinuxContainerConfig:
    return api_pb2.LinuxContainerConfig(resources=api_pb2.LinuxContainerResources(**fields))


def _security(**ids) -> api_pb2.LinuxContainerConfig:
    linux = api_pb2.LinuxContainerConfig()
    for key, value in ids.items():
        if key == "run_as_username":
            linux.security_context.run_as_username = value
        else:
            getattr(linux.security_context, key).value = value
    return linux


BAD_CONFIGS = {
    "cpu_shares too small": ({"linux": _resources(cpu_shares=1)}, "linux.resources.cpu_shares"),
    "cpu_shares too large": ({"linux": _resources(cpu_shares=300000)}, "linux.resources.cpu_shares"),
    "cpu_period too small": ({"linux": _resources(cpu_period=100)}, "linux.resources.cpu_period"),
    "cpu_period too large": ({"linux": _resources(cpu_period=2_000_000)}, "linux.resources.cpu_period"),
    "cpu_quota too small": ({"linux": _resources(cpu_quota=5, cpu_period=100000)}, "linux.resources.cpu_quota"),
    "cpu_quota negative": ({"linux": _resources(cpu_quota=-2)}, "linux.resources.cpu_quota"),
    "cpuset_cpus garbage": ({"linux": _resources(cpuset_cpus="zero-two")}, "linux.resources.cpuset_cpus"),
    "cpuset_cpus open range": ({"linux": _resources(cpuset_cpus="0-")}, "linux.resources.cpuset_cpus"),
    "cpuset_cpus offline": ({"linux": _resources(cpuset_cpus="4000")}, "linux.resources.cpuset_cpus"),
    "cpuset_mems garbage": ({"linux": _resources(cpuset_mems="0;1")}, "linux.resources.cpuset_mems"),
    "memory below minimum": ({"linux": _resources(memory_limit_in_bytes=4096)}, "linux.resources.memory_limit_in_bytes"),
    "oom_score_adj too high": ({"linux": _resources(oom_score_adj=1001)}, "linux.resources.oom_score_adj"),
    "oom_score_adj too low": ({"linux": _resources(oom_score_adj=-1001)}, "linux.resources.oom_score_adj"),
    "run_as_user negative": ({"linux": _security(run_as_user=-1)}, "run_as_user"),
    "run_as_user too large": ({"linux": _security(run_as_user=1 << 32)}, "run_as_user"),
    "run_as_group alone": ({"linux": _security(run_as_group=1000)}, "run_as_group"),
    "relative working_dir": ({"working_dir": "relative/dir"}, "working_dir"),
    "too many envs": ({"envs": [api_pb2.KeyValue(key=f"K{index}", value="v") for index in range(40000)]}, "environment"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_runtime_values_are_invalid_argument_and_leave_nothing(containers: Containers, case: str) -> None:
    fields, named = BAD_CONFIGS[case]
    pod = containers.pod()
    parent = containers.stack.cgroup_parent
    before = _container_cgroups(parent)
    with pytest.raises(grpc.RpcError) as caught:
        containers.create(pod, containers.config("bad", **fields))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert named in caught.value.details()
    listed = containers.runtime.ListContainers(api_pb2.ListContainersRequest(), timeout=20).containers
    assert not [container for container in listed if container.pod_sandbox_id == pod[0]]
    assert _container_cgroups(parent) == before


def test_run_as_group_error_names_both_user_fields(containers: Containers) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        containers.create(containers.pod(), containers.config("group-only", linux=_security(run_as_group=7)))
    details = caught.value.details()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "run_as_group" in details and "run_as_user" in details and "run_as_username" in details
    # With a user, run_as_group applies.
    container_id = containers.run(name="with-user", command=["id", "-g"], linux=_security(run_as_user=1000, run_as_group=7))
    assert containers.output(container_id) == "7"


def test_stop_container_of_unknown_id_succeeds(containers: Containers) -> None:
    containers.runtime.StopContainer(api_pb2.StopContainerRequest(container_id="e" * 64, timeout=0), timeout=20)
    with pytest.raises(grpc.RpcError) as caught:  # an empty id is still a bad request
        containers.runtime.StopContainer(api_pb2.StopContainerRequest(container_id=""), timeout=20)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("parent", ["{root}/../escape", "{root}/a\nb", "{root}/nul\0byte", "relative/parent"])
def test_bad_cgroup_parent_is_refused_and_makes_no_cgroup(containers: Containers, parent: str) -> None:
    parent = parent.format(root=containers.stack.cgroup_parent)
    config = pod_config(log_directory=str(containers.log_root / f"cg-{uuid.uuid4().hex[:6]}"), cgroup_parent=parent)
    with pytest.raises(grpc.RpcError) as caught:
        reply = containers.runtime.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=config), timeout=120)
        containers.pod_ids.append(reply.pod_sandbox_id)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "cgroup_parent" in caught.value.details()
    assert not any((hierarchy / "escape").exists() for hierarchy in _hierarchies())
    assert not any((hierarchy / "relative").exists() for hierarchy in _hierarchies())


def test_cgroup_parent_must_stay_inside_the_configured_root() -> None:
    manager = CgroupManager(detect(), CGROUPFS)
    check_cgroup_parent("/kubepods/burstable/pod1", manager, "/kubepods")
    check_cgroup_parent("/kubepods", manager, "/kubepods")
    check_cgroup_parent("/anywhere", manager, "")
    for outside in ("/kubepods2/pod1", "/system.slice", "/"):
        with pytest.raises(InvalidArgument, match="outside"):
            check_cgroup_parent(outside, manager, "/kubepods")


def test_failed_runtime_create_removes_its_cgroups_and_parents(containers: Containers) -> None:
    """runc makes the container's cgroups (and a missing pod parent) in every
    hierarchy before it finds the command missing: all of it goes."""
    pod_parent = f"{containers.stack.cgroup_parent}/podfail-{uuid.uuid4().hex[:8]}"
    config = pod_config(log_directory=str(containers.log_root / "podfail"), cgroup_parent=pod_parent)
    reply = containers.runtime.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=config), timeout=120)
    containers.pod_ids.append(reply.pod_sandbox_id)
    state = containers.stack.state_dir
    dirs_before = {*_entries(state / "shimd" / "containers"), *_entries(state / "imaged" / "rootfs")}
    with pytest.raises(grpc.RpcError) as caught:
        containers.create((reply.pod_sandbox_id, config), containers.config("missing-binary", command=["/does/not/exist"]))
    assert caught.value.code() != grpc.StatusCode.OK
    # Its state directory and its rootfs are gone too.
    assert {*_entries(state / "shimd" / "containers"), *_entries(state / "imaged" / "rootfs")} <= dirs_before
    leftovers = [str(hierarchy / pod_parent.strip("/")) for hierarchy in _hierarchies()
                 if (hierarchy / pod_parent.strip("/")).exists()]
    assert leftovers == []
    listed = containers.runtime.ListContainers(api_pb2.ListContainersRequest(
        filter=api_pb2.ContainerFilter(pod_sandbox_id=reply.pod_sandbox_id)), timeout=20).containers
    assert list(listed) == []


def test_image_with_a_huge_environment_is_invalid_argument(containers: Containers, registry) -> None:
    image = push_busybox(registry, "pyrio/huge-env", "v1", {"Env": [f"E{index}=x" for index in range(250000)]})
    rootfs_dir = containers.stack.state_dir / "imaged" / "rootfs"
    before = _entries(rootfs_dir)
    with pytest.raises(grpc.RpcError) as caught:
        containers.create(containers.pod(), containers.config("huge-env", image=image.reference))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "250001 entries" in caught.value.details() or "250000" in caught.value.details(), caught.value.details()
    assert _entries(rootfs_dir) <= before  # the rootfs imaged prepared for it is gone


def test_update_container_resources_checks_values_before_the_runtime(containers: Containers) -> None:
    container_id = containers.run(name="update", command=["sleep", "300"], linux=_resources(cpu_shares=512))
    for resources, named in ((api_pb2.LinuxContainerResources(cpu_shares=1), "linux.cpu_shares"),
                             (api_pb2.LinuxContainerResources(cpuset_cpus="0-"), "linux.cpuset_cpus"),
                             (api_pb2.LinuxContainerResources(memory_limit_in_bytes=1024), "linux.memory_limit_in_bytes")):
        with pytest.raises(grpc.RpcError) as caught:
            containers.runtime.UpdateContainerResources(
                api_pb2.UpdateContainerResourcesRequest(container_id=container_id, linux=resources), timeout=20)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and named in caught.value.details()
    assert containers.status(container_id).status.resources.linux.cpu_shares == 512  # unchanged


def test_command_missing_from_the_image_is_failed_precondition_and_leaves_nothing(containers: Containers) -> None:
    """runc cannot exec it: the image's fault, not the runtime's (the fuzz bench saw INTERNAL)."""
    pod = containers.pod()
    before = _container_cgroups(containers.stack.cgroup_parent)
    with pytest.raises(grpc.RpcError) as caught:
        containers.create(pod, containers.config("missing", command=["no-such-command-in-busybox"]))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION, caught.value.details()
    assert "cannot be run" in caught.value.details() and "no-such-command-in-busybox" in caught.value.details()
    listed = containers.runtime.ListContainers(api_pb2.ListContainersRequest(), timeout=20).containers
    assert not [container for container in listed if container.pod_sandbox_id == pod[0]]
    assert _container_cgroups(containers.stack.cgroup_parent) == before
