"""The real kubelet (cgroupDriver: systemd) runs pyrio's pods on a systemd, pure cgroup v2 node."""

from __future__ import annotations

import json

from tests.node.conftest import Node


def test_guest_is_a_systemd_cgroup2_node(guest) -> None:
    assert guest.run(["ps", "-p", "1", "-o", "comm="], check=True).stdout.strip() == "systemd"
    assert guest.run(["stat", "-f", "-c", "%T", "/sys/fs/cgroup"], check=True).stdout.strip() == "cgroup2fs"
    controllers = set(guest.read_file("/sys/fs/cgroup/cgroup.controllers").split())
    assert {"cpuset", "cpu", "io", "memory", "hugetlb", "pids"} <= controllers


def test_kubelet_takes_the_systemd_driver_from_the_runtime(static_pods: Node) -> None:
    assert static_pods.guest.run(["systemctl", "is-active", "pyrio.service"]).stdout.strip() == "active"
    log = static_pods.guest.run("journalctl -u kubelet.service --no-pager", timeout=300, check=True).stdout
    # RuntimeConfig answers SYSTEMD; the kubelet says which driver it took.
    assert 'cgroupDriver="systemd"' in log


def test_two_container_pod_is_reachable_on_its_pod_ip(static_pods: Node) -> None:
    web = next(p for p in static_pods.pods() if p["metadata"]["name"].startswith("web"))
    ip = static_pods.crictl_json("inspectp", web["id"])["status"]["network"]["ip"]
    assert ip
    page = static_pods.guest.run(["busybox", "wget", "-qO-", f"http://{ip}:8080/"], timeout=120, check=True)
    assert page.stdout.strip() == "pyrio-node"


def test_failing_exec_liveness_probe_restarts_the_container(static_pods: Node) -> None:
    def restarted() -> bool:
        return any(c["metadata"]["attempt"] >= 1 for c in static_pods.containers("liveness", all_states=True))
    static_pods.wait(restarted, 900, "the kubelet to restart the liveness container")


def test_container_over_its_memory_limit_ends_oomkilled(static_pods: Node) -> None:
    def exited() -> dict | None:
        for entry in static_pods.containers("hog", all_states=True):
            if entry["state"] == "CONTAINER_EXITED":
                return static_pods.inspect(entry["id"])["status"]
        return None
    status = static_pods.wait(exited, 900, "the memory hog to exit")
    assert status["reason"] == "OOMKilled"
    assert status["exitCode"] == 137


def cgroup_of(node: Node, pid: int) -> str:
    return "/sys/fs/cgroup" + node.guest.read_file(f"/proc/{pid}/cgroup").strip().split("::", 1)[1]


def test_requests_and_limits_are_in_the_v2_files_of_the_units(static_pods: Node) -> None:
    pids = static_pods.container_pids()
    server = cgroup_of(static_pods, pids["server"])
    sidecar = cgroup_of(static_pods, pids["sidecar"])
    # Containers in transient scopes inside the pod's slice (kubepods-...-pod<uid>.slice).
    assert server.endswith(".scope") and ".slice/" in server
    pod_slice = server.rsplit("/", 1)[0]
    assert pod_slice.endswith(".slice") and "-pod" in pod_slice
    read = static_pods.guest.read_file
    assert read(f"{server}/memory.max").strip() == str(64 * 1024 * 1024)
    assert read(f"{server}/cpu.max").strip() == "50000 100000"
    assert read(f"{sidecar}/memory.max").strip() == str(32 * 1024 * 1024)
    assert read(f"{sidecar}/cpu.max").strip() == "10000 100000"
    # The pod's slice: the sums (the kubelet writes it through systemd).
    assert read(f"{pod_slice}/memory.max").strip() == str(96 * 1024 * 1024)
    assert read(f"{pod_slice}/cpu.max").strip() == "60000 100000"
    # cpu.weight from the 500m request (cpu.shares 512 -> weight 20, as runc converts).
    assert int(read(f"{server}/cpu.weight")) == 1 + ((512 - 2) * 9999) // 262142


def test_stats_summary_has_cpu_and_memory_of_the_containers(static_pods: Node) -> None:
    script = ("import json, ssl, urllib.request; "
              "print(urllib.request.urlopen('https://127.0.0.1:10250/stats/summary', "
              "context=ssl._create_unverified_context(), timeout=60).read().decode())")

    def summary() -> dict | None:
        data = json.loads(static_pods.guest.run(["python3", "-c", script], timeout=120, check=True).stdout)
        web = [p for p in data.get("pods", []) if p["podRef"]["name"].startswith("web")]
        containers = {c["name"]: c for pod in web for c in pod.get("containers", [])}
        ready = all(containers.get(n, {}).get("cpu", {}).get("usageCoreNanoSeconds") is not None
                    and containers.get(n, {}).get("memory", {}).get("workingSetBytes") is not None
                    for n in ("server", "sidecar"))
        return containers if ready else None

    containers = static_pods.wait(summary, 600, "CPU and memory of the web pod's containers in /stats/summary")
    assert containers["server"]["memory"]["workingSetBytes"] > 0
    assert containers["server"]["cpu"]["usageCoreNanoSeconds"] > 0


def test_crun_runs_a_container_as_a_second_runtime_handler(node: Node) -> None:
    guest = node.guest
    work = "/root/crun-test"
    pod = {"metadata": {"name": "crun-pod", "namespace": "default", "uid": "crun-pod-uid"},
           "log_directory": f"{work}/logs", "linux": {"cgroup_parent": "kubepods.slice"}}
    ctr = {"metadata": {"name": "crun-sleeper"}, "image": {"image": "127.0.0.1:5000/busybox:latest"},
           "command": ["sh", "-c", "echo from-crun > /tmp/mark; exec sleep 100000"], "log_path": "crun.log"}
    guest.write_file(f"{work}/pod.json", json.dumps(pod).encode())
    guest.write_file(f"{work}/ctr.json", json.dumps(ctr).encode())
    pod_id = node.crictl("runp", "--runtime", "crun", f"{work}/pod.json").strip()
    try:
        ctr_id = node.crictl("create", pod_id, f"{work}/ctr.json", f"{work}/pod.json").strip()
        node.crictl("start", ctr_id)
        assert node.crictl("exec", ctr_id, "cat", "/tmp/mark").strip() == "from-crun"
        # crun's own state has the container (runc's has not): crun really runs it.
        assert ctr_id in guest.run(["crun", "--root", "/run/pyrio/runtimes/crun", "list"], check=True).stdout
        assert ctr_id not in guest.run(["runc", "--root", "/run/pyrio/runtimes/runc", "list"]).stdout
    finally:
        node.crictl("stopp", pod_id, check=False)
        node.crictl("rmp", pod_id, check=False)
