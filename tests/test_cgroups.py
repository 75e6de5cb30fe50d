"""common.cgroups: the hierarchy found at start, CRI resources as OCI and as v1/v2 files,
stats and OOM counts from fake v1 and v2 trees, the systemd driver's names, and (where the host
has them) real cgroup v2 files and real systemd units over D-Bus.

Tests that need a pure cgroup v2 host or systemd as PID 1 skip elsewhere with the reason; the
node lane (a systemd guest on cgroup v2) runs them.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from common.cgroups import CGROUPFS, SYSTEMD, CgroupManager, Hierarchy, detect, manager_for, systemd, systemd_dbus
from common.cgroups.hierarchy import CGROUP2_SUPER_MAGIC, HYBRID, TMPFS_MAGIC, V1, V2, filesystem_type
from common.cgroups.resources import cpu_weight, file_values, oci_resources
from common.config import ConfigError, load_config
from common.errors import FailedPrecondition, InvalidArgument
from tests import fake_systemd_bus
from tests.fake_systemd_bus import FakeSystemd
from tests.fixtures_containers import Containers
from tests.harness import Stack, wait_until

HOST = detect()
needs_v2 = pytest.mark.skipif(not HOST.unified, reason=f"needs a pure cgroup v2 host; this one is {HOST.mode}")
needs_systemd = pytest.mark.skipif(not systemd_dbus.systemd_booted(), reason="needs systemd as PID 1 (no /run/systemd/system)")


def fake_v2(root: Path, controllers: str = "cpuset cpu io memory hugetlb pids") -> Hierarchy:
    root.mkdir(parents=True, exist_ok=True)
    (root / "cgroup.controllers").write_text(controllers + "\n")
    return Hierarchy.at(root, V2)


def fake_v1(root: Path, controllers: tuple[str, ...] = ("cpu", "cpuacct", "memory", "pids")) -> Hierarchy:
    for controller in controllers:
        (root / controller).mkdir()
    return Hierarchy.at(root, V1)


# --- the hierarchy ------------------------------------------------------------------------


def test_detect_agrees_with_statfs() -> None:
    kind = filesystem_type(Path("/sys/fs/cgroup"))
    assert kind in (CGROUP2_SUPER_MAGIC, TMPFS_MAGIC)
    assert (HOST.mode == V2) == (kind == CGROUP2_SUPER_MAGIC)
    if HOST.mode == HYBRID:
        assert filesystem_type(Path("/sys/fs/cgroup/unified")) == CGROUP2_SUPER_MAGIC
    assert HOST.has("memory") and HOST.has("pids")


def test_detect_refuses_a_tree_that_is_no_cgroup_mount(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="neither cgroup2 nor a tmpfs"):
        detect(Path("/proc"))


# --- CRI resources ------------------------------------------------------------------------


def test_cpu_weight_converts_shares_as_runc_and_the_kubelet() -> None:
    # weight = 1 + ((shares - 2) * 9999) / 262142
    assert [cpu_weight(shares) for shares in (2, 512, 1024, 262144)] == [1, 20, 39, 10000]
    assert cpu_weight(1) == 1 and cpu_weight(10**7) == 10000 and cpu_weight(0) == 0


def test_v2_files_of_cri_resources(tmp_path: Path) -> None:
    hierarchy = fake_v2(tmp_path)
    (tmp_path / "memory.swap.max").write_text("max\n")
    resources = {"cpu_shares": 1024, "cpu_quota": 20000, "cpu_period": 100000, "cpuset_cpus": "0", "cpuset_mems": "0",
                 "memory_limit_in_bytes": 64 << 20, "hugepage_limits": [{"page_size": "2MB", "limit": 2 << 20}],
                 "unified": {"memory.high": "50000000", "pids.max": "100", "io.weight": "default 200"}}
    files = file_values(resources, hierarchy)
    assert files == {
        "cpu.weight": "39", "cpu.max": "20000 100000", "cpuset.cpus": "0", "cpuset.mems": "0",
        "memory.max": str(64 << 20), "memory.swap.max": "0", "hugetlb.2MB.max": str(2 << 20),
        "memory.high": "50000000", "pids.max": "100", "io.weight": "default 200",
    }
    assert file_values({"cpu_period": 50000}, hierarchy) == {"cpu.max": "max 50000"}
    swap = file_values({"memory_limit_in_bytes": 100, "memory_swap_limit_in_bytes": 300}, hierarchy)
    assert swap["memory.swap.max"] == "200"
    with pytest.raises(InvalidArgument, match="must not be below"):
        file_values({"memory_limit_in_bytes": 300, "memory_swap_limit_in_bytes": 100}, hierarchy)


def test_v2_refuses_unified_keys_of_absent_controllers(tmp_path: Path) -> None:
    hierarchy = fake_v2(tmp_path, "cpu memory pids")
    with pytest.raises(InvalidArgument, match="needs the io controller"):
        oci_resources({"unified": {"io.weight": "100"}}, hierarchy)
    with pytest.raises(InvalidArgument, match="not a cgroup v2 file name"):
        oci_resources({"unified": {"../memory.max": "1"}}, hierarchy)
    with pytest.raises(InvalidArgument, match="not one a container may set"):
        oci_resources({"unified": {"cgroup.procs": "1"}}, hierarchy)
    # The kubelet's group OOM kill (memory.oom.group = 1 on v2) passes through to the runtime.
    assert oci_resources({"unified": {"memory.oom.group": "1"}}, hierarchy)["unified"] == {"memory.oom.group": "1"}


def test_v1_files_and_refusals(tmp_path: Path) -> None:
    hierarchy = fake_v1(tmp_path)
    assert not hierarchy.unified and not hierarchy.has("hugetlb")
    files = file_values({"cpu_shares": 512, "cpu_quota": 20000, "cpu_period": 100000, "memory_limit_in_bytes": 1 << 26,
                         "hugepage_limits": [{"page_size": "2MB", "limit": 1 << 21}]}, hierarchy)
    # No memsw file in the fake tree: no swap limit; no hugetlb controller: the kubelet's limits dropped.
    assert files == {"cpu/cpu.shares": "512", "cpu/cpu.cfs_period_us": "100000", "cpu/cpu.cfs_quota_us": "20000",
                     "memory/memory.limit_in_bytes": str(1 << 26)}
    with pytest.raises(InvalidArgument, match="need a cgroup v2 host"):
        oci_resources({"unified": {"memory.high": "1"}}, hierarchy)


# --- stats and OOM from fake trees -------------------------------------------------------


def test_v2_stats_and_oom_kills(tmp_path: Path) -> None:
    manager = CgroupManager(fake_v2(tmp_path), CGROUPFS)
    container = tmp_path / "kubepods" / "pyrio-abc"
    container.mkdir(parents=True)
    (container / "cpu.stat").write_text("usage_usec 1500\nuser_usec 1000\nsystem_usec 500\n")
    (container / "memory.current").write_text("10485760\n")
    (container / "memory.max").write_text("20971520\n")
    (container / "memory.peak").write_text("12000000\n")
    (container / "memory.swap.current").write_text("4096\n")
    (container / "memory.swap.max").write_text("max\n")
    (container / "memory.stat").write_text("anon 4194304\ninactive_file 2097152\npgfault 77\npgmajfault 3\n")
    (container / "memory.events").write_text("low 0\nhigh 0\nmax 2\noom 1\noom_kill 1\n")
    (container / "cgroup.procs").write_text("10\n11\n")
    usage = manager.stats("/kubepods/pyrio-abc")
    assert usage["cpu"]["usage_core_nano_seconds"]["value"] == 1_500_000
    memory = usage["memory"]
    assert memory["working_set_bytes"]["value"] == 10485760 - 2097152
    assert memory["available_bytes"]["value"] == 20971520 - (10485760 - 2097152)
    assert memory["rss_bytes"]["value"] == 4194304 and memory["major_page_faults"]["value"] == 3
    assert usage["swap"]["swap_usage_bytes"]["value"] == 4096 and "swap_available_bytes" not in usage["swap"]
    assert manager.layout.peak("/kubepods/pyrio-abc") == 12000000
    assert manager.oom_files("/kubepods/pyrio-abc") == [str(container / "memory.events")]
    assert manager.oom_kills("/kubepods/pyrio-abc") == 1
    assert manager.process_count("/kubepods/pyrio-abc") == 2
    assert manager.stats("/kubepods/gone") == {} and manager.process_count("/kubepods/gone") is None


def test_v1_stats_and_oom_kills(tmp_path: Path) -> None:
    manager = CgroupManager(fake_v1(tmp_path), CGROUPFS)
    for controller in ("cpuacct", "memory", "pids"):
        (tmp_path / controller / "pod" / "c").mkdir(parents=True)
    (tmp_path / "cpuacct" / "pod" / "c" / "cpuacct.usage").write_text("123456\n")
    memory = tmp_path / "memory" / "pod" / "c"
    (memory / "memory.usage_in_bytes").write_text("8192\n")
    (memory / "memory.limit_in_bytes").write_text(f"{(1 << 63) - 4096}\n")  # unlimited
    (memory / "memory.stat").write_text("total_inactive_file 4096\ntotal_rss 1000\n")
    (memory / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    (tmp_path / "pids" / "pod" / "c" / "cgroup.procs").write_text("7\n")
    usage = manager.stats("/pod/c")
    assert usage["cpu"]["usage_core_nano_seconds"]["value"] == 123456
    assert usage["memory"]["working_set_bytes"]["value"] == 4096 and "available_bytes" not in usage["memory"]
    assert manager.oom_kills("/pod/c") == 2 and manager.process_count("/pod/c") == 1


# --- pod cgroups and processes with cgroupfs (fake trees) -------------------------------------


def test_set_pod_resources_on_v2_enables_controllers(tmp_path: Path) -> None:
    manager = CgroupManager(fake_v2(tmp_path, "cpu memory pids"), CGROUPFS)
    manager.set("/kubepods/pod1", {"cpu_shares": 2, "memory_limit_in_bytes": 1 << 30})
    pod = tmp_path / "kubepods" / "pod1"
    assert (pod / "cpu.weight").read_text() == "1" and (pod / "memory.max").read_text() == str(1 << 30)
    assert (tmp_path / "cgroup.subtree_control").read_text() == "+cpu +memory +pids"
    assert (tmp_path / "kubepods" / "cgroup.subtree_control").read_text() == "+cpu +memory +pids"
    assert manager.apply(4242, "/kubepods/pod1", "holder") == "/kubepods/pod1/holder"
    assert (pod / "holder" / "cgroup.procs").read_text() == "4242"
    (pod / "holder" / "cgroup.procs").unlink()  # a real cgroup's files go with its rmdir
    manager.remove("/kubepods/pod1/holder")
    assert not (pod / "holder").exists()


def test_set_pod_resources_on_v1(tmp_path: Path) -> None:
    manager = CgroupManager(fake_v1(tmp_path), CGROUPFS)
    manager.set("/kubepods/pod1", {"cpu_shares": 256, "memory_limit_in_bytes": 1 << 30})
    assert (tmp_path / "cpu" / "kubepods" / "pod1" / "cpu.shares").read_text() == "256"
    assert (tmp_path / "memory" / "kubepods" / "pod1" / "memory.limit_in_bytes").read_text() == str(1 << 30)
    assert manager.apply(4242, "/kubepods/pod1", "holder") == "/kubepods/pod1/holder"
    assert (tmp_path / "pids" / "kubepods" / "pod1" / "holder" / "cgroup.procs").read_text() == "4242"


# --- names of the two drivers -------------------------------------------------------------------


def test_systemd_slices_expand_as_runc_does() -> None:
    assert systemd.expand_slice("kubepods-burstable-pod12ab.slice") == \
        "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod12ab.slice"
    assert systemd.expand_slice("system.slice") == "/system.slice"
    assert systemd.expand_slice("-.slice") == "/"
    for bad in ("kubepods", "/kubepods.slice", "a--b.slice", "-a.slice", "a-.slice", ".slice", "a b.slice"):
        with pytest.raises(InvalidArgument):
            systemd.expand_slice(bad)


def test_container_cgroups_paths_of_each_driver(tmp_path: Path) -> None:
    hierarchy = fake_v2(tmp_path)
    with_systemd = CgroupManager(hierarchy, SYSTEMD)
    path = with_systemd.container_cgroups_path("kubepods-besteffort-pod1.slice", "abc")
    assert path == "kubepods-besteffort-pod1.slice:pyrio:abc"
    assert with_systemd.cgroup_of(path) == "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1.slice/pyrio-abc.scope"
    assert with_systemd.oom_files(path) == [str(tmp_path / with_systemd.cgroup_of(path).lstrip("/") / "memory.events")]
    # A cgroupfs-style parent is converted, as CRI allows and as the kubelet converts its own.
    assert with_systemd.container_cgroups_path("/kubepods/burstable/pod-1", "abc") == "kubepods-burstable-pod_1.slice:pyrio:abc"
    assert with_systemd.parent_cgroup("/kubepods/besteffort") == "/kubepods.slice/kubepods-besteffort.slice"
    # The kubelet's systemd driver sends the slice's expanded path: its last part is the slice.
    kubelet_parent = "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1.slice"
    assert with_systemd.container_cgroups_path(kubelet_parent, "abc") == "kubepods-besteffort-pod1.slice:pyrio:abc"
    assert with_systemd.parent_cgroup(kubelet_parent) == kubelet_parent
    with pytest.raises(InvalidArgument, match="is not the path of slice"):
        with_systemd.container_cgroups_path("/other.slice/kubepods-besteffort-pod1.slice", "abc")
    with pytest.raises(InvalidArgument, match="neither a systemd slice name"):
        with_systemd.container_cgroups_path("kubepods", "abc")
    with pytest.raises(InvalidArgument, match="not a valid slice name"):
        with_systemd.container_cgroups_path("kubepods--x.slice", "abc")
    with_cgroupfs = CgroupManager(hierarchy, CGROUPFS)
    assert with_cgroupfs.container_cgroups_path("/kubepods/pod1/", "abc") == "/kubepods/pod1/pyrio-abc"
    with pytest.raises(InvalidArgument, match="needs runtime.cgroup_manager"):
        with_cgroupfs.container_cgroups_path("kubepods.slice", "abc")
    with pytest.raises(InvalidArgument, match="absolute cgroup path"):
        with_cgroupfs.container_cgroups_path("/kubepods/../x", "abc")


def test_systemd_unit_properties_of_cri_resources(tmp_path: Path) -> None:
    properties = dict(systemd.unit_properties(
        {"cpu_shares": 1024, "cpu_quota": 1234, "cpu_period": 100000, "memory_limit_in_bytes": 1 << 30}, fake_v2(tmp_path)))
    assert properties["CPUWeight"] == ("t", 39)
    # 12.34 ms per second, rounded up to systemd's 10 ms steps.
    assert properties["CPUQuotaPerSecUSec"] == ("t", 20000) and properties["CPUQuotaPeriodUSec"] == ("t", 100000)
    assert properties["MemoryMax"] == ("t", 1 << 30)


def test_systemd_driver_refused_without_systemd() -> None:
    if systemd_dbus.systemd_booted():
        assert manager_for(SYSTEMD).systemd
    else:
        with pytest.raises(FailedPrecondition, match="systemd is not PID 1"):
            manager_for(SYSTEMD)


def test_config_takes_either_driver_and_a_matching_parent(tmp_path: Path) -> None:
    path = tmp_path / "pyrio.toml"
    path.write_text('[runtime]\ncgroup_manager = "systemd"\n')
    config = load_config(str(path))
    assert config.runtime.cgroup_manager == "systemd" and config.runtime.cgroup_parent == "pyrio.slice"
    path.write_text("")
    assert load_config(str(path)).runtime.cgroup_parent == "/pyrio"
    for text, message in (
        ('cgroup_manager = "systemd"\ncgroup_parent = "/pyrio"', "must be a systemd slice name"),
        ('cgroup_parent = "pyrio.slice"', "must be an absolute cgroup path"),
        ('cgroup_manager = "both"', 'must be "cgroupfs" or "systemd"'),
    ):
        path.write_text(f"[runtime]\n{text}\n")
        with pytest.raises(ConfigError, match=message):
            load_config(str(path))


# --- real cgroup v2 files -----------------------------------------------------------------------


@needs_v2
def test_real_v2_pod_cgroup_gets_resources_and_a_process() -> None:
    manager = CgroupManager(HOST, CGROUPFS)
    parent = f"/pyrio-cgtest-{os.getpid()}"
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        manager.set(parent, {"cpu_shares": 512, "cpu_quota": 50000, "cpu_period": 100000, "memory_limit_in_bytes": 256 << 20})
        directory = HOST.root / parent.strip("/")
        assert (directory / "cpu.weight").read_text().strip() == str(cpu_weight(512))
        assert (directory / "cpu.max").read_text().split() == ["50000", "100000"]
        assert int((directory / "memory.max").read_text()) == 256 << 20
        cgroup = manager.apply(sleeper.pid, parent, "holder")
        assert Path(f"/proc/{sleeper.pid}/cgroup").read_text().strip() == f"0::{cgroup}"
        assert manager.process_count(cgroup) == 1 and "memory" in manager.stats(cgroup)
    finally:
        sleeper.kill()
        sleeper.wait()
        time.sleep(0.1)
        manager.remove(parent)
    assert not (HOST.root / parent.strip("/")).exists()


# --- real systemd units over D-Bus -------------------------------------------------------------


@needs_systemd
def test_real_systemd_scope_for_a_process_in_a_slice_with_resources() -> None:
    manager = manager_for(SYSTEMD)
    parent = f"pyrio_cgtest{os.getpid()}.slice"
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        manager.set(parent, {"cpu_shares": 512, "memory_limit_in_bytes": 256 << 20})
        cgroup = manager.apply(sleeper.pid, parent, f"pyrio-test-{os.getpid()}", "pyrio test scope")
        assert cgroup == f"/{parent}/pyrio-test-{os.getpid()}.scope"
        membership = Path(f"/proc/{sleeper.pid}/cgroup").read_text()
        assert cgroup in membership, membership
        if HOST.unified:
            slice_dir = HOST.root / parent
            assert int((slice_dir / "memory.max").read_text()) == 256 << 20
            assert (slice_dir / "cpu.weight").read_text().strip() == str(cpu_weight(512))
        with pytest.raises(FailedPrecondition, match="systemd StartTransientUnit"):
            manager.apply(sleeper.pid, parent, f"pyrio-test-{os.getpid()}")  # the unit exists already
    finally:
        sleeper.kill()
        sleeper.wait()
        systemd_dbus.stop_unit(parent)
    assert not (HOST.root / parent).exists() or not HOST.unified
    systemd_dbus.stop_unit("pyrio-never-started-unit.scope")  # a unit systemd does not know is stopped


# --- the systemd driver's D-Bus calls, through a real bus daemon --------------------------------


@pytest.fixture
def fake_systemd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeSystemd]:
    if not fake_systemd_bus.available():
        pytest.skip("dbus-daemon is not installed")
    with fake_systemd_bus.FakeSystemdBus(tmp_path) as fake:
        monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", fake.address)
        yield fake


def test_systemd_driver_starts_a_scope_for_a_process_over_dbus(tmp_path: Path, fake_systemd: FakeSystemd) -> None:
    manager = CgroupManager(fake_v2(tmp_path / "tree"), SYSTEMD)
    cgroup = manager.apply(4242, "/kubepods/burstable/pod1", "pyrio-shim-abc", "pyrio shim of container abc")
    assert cgroup == "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice/pyrio-shim-abc.scope"
    properties = dict(fake_systemd.units["pyrio-shim-abc.scope"])
    assert properties["PIDs"] == ("au", [4242]) and properties["Slice"] == ("s", "kubepods-burstable-pod1.slice")
    assert properties["Description"] == ("s", "pyrio shim of container abc")
    with pytest.raises(FailedPrecondition, match="UnitExists"):
        manager.apply(4242, "kubepods-burstable-pod1.slice", "pyrio-shim-abc")
    fake_systemd.results["pyrio-shim-bad.scope"] = "failed"
    with pytest.raises(FailedPrecondition, match="job failed"):
        manager.apply(4243, "kubepods-burstable-pod1.slice", "pyrio-shim-bad")
    manager.remove(cgroup)
    assert "pyrio-shim-abc.scope" not in fake_systemd.units
    systemd_dbus.stop_unit("pyrio-shim-abc.scope")  # one systemd does not know is stopped already


def test_systemd_driver_sets_a_pod_slice_properties_and_files(tmp_path: Path, fake_systemd: FakeSystemd) -> None:
    manager = CgroupManager(fake_v2(tmp_path, "cpu memory pids"), SYSTEMD)
    fake_systemd.cgroup_root = tmp_path
    # A slice systemd has not loaded is started with the properties.
    manager.set("pyrio_pod-x1.slice", {"cpu_shares": 1024, "memory_limit_in_bytes": 1 << 30})
    assert dict(fake_systemd.units["pyrio_pod-x1.slice"])["CPUWeight"] == ("t", 39)
    assert (tmp_path / "pyrio_pod.slice" / "pyrio_pod-x1.slice" / "memory.max").read_text() == str(1 << 30)
    manager.set("pyrio_pod-x1.slice", {"memory_limit_in_bytes": 1 << 29})
    assert [call[0] for call in fake_systemd.calls[-2:]] == ["SetUnitProperties", "StartUnit"]
    # systemd enables the slice's controllers: pyrio writes no subtree_control with this driver.
    assert not (tmp_path / "cgroup.subtree_control").exists()
    assert dict(fake_systemd.units["pyrio_pod-x1.slice"])["MemoryMax"] == ("t", 1 << 29)


def test_systemd_driver_without_a_bus_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", f"unix:path={tmp_path}/absent")
    with pytest.raises(FailedPrecondition, match="cannot reach systemd over D-Bus"):
        CgroupManager(fake_v2(tmp_path), SYSTEMD).apply(1, "pyrio.slice", "x")


# --- a stack's containers and shims in their cgroups ---------------------------------------------


def process_cgroups(pid: int) -> str:
    return Path(f"/proc/{pid}/cgroup").read_text()


def test_container_cgroup_is_named_after_the_driver(containers: Containers) -> None:
    stack = containers.stack
    container_id = containers.run(command=["sleep", "300"])
    info = containers.info(container_id)
    manager = CgroupManager(HOST, stack.cgroup_manager)
    if stack.cgroup_manager == SYSTEMD:
        assert info["cgroups_path"] == f"{stack.cgroup_parent}:pyrio:{container_id}"
        scope = f"{systemd.expand_slice(stack.cgroup_parent)}/pyrio-{container_id}.scope"
        assert manager.cgroup_of(info["cgroups_path"]) == scope
        assert scope in process_cgroups(info["pid"])
        # The shim left shimd's cgroup (the pyrio service's) for a scope of its own in the pod's slice.
        shim_scope = f"{systemd.expand_slice(stack.cgroup_parent)}/pyrio-shim-{container_id}.scope"
        assert shim_scope in process_cgroups(info["shim_pid"])
        assert process_cgroups(info["shim_pid"]) != process_cgroups(stack.service_pid("shimd"))
    else:
        assert info["cgroups_path"] == f"{stack.cgroup_parent}/pyrio-{container_id}"
        assert f"{stack.cgroup_parent}/pyrio-{container_id}" in process_cgroups(info["pid"])
    assert manager.process_count(info["cgroups_path"]) == 1
    containers.stop(container_id)


def test_shimd_refuses_the_systemd_driver_without_systemd() -> None:
    if systemd_dbus.systemd_booted():
        pytest.skip("systemd is PID 1 here: the systemd driver is available")
    stack = Stack({"runtime": {"cgroup_manager": "systemd", "cgroup_parent": "pyrio_refused.slice"}})
    try:
        stack.start(wait=False)
        wait_until(lambda: "refusing to start" in stack.logs("shimd"), 30, what="shimd's refusal")
        assert "systemd is not PID 1" in stack.logs("shimd")
    finally:
        stack.stop()
