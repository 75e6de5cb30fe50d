"""A real kubelet in standalone mode (static pods, no API server) on a stack,
for the Evented PLEG and CRI stats checks (issue 13).

As /work/shared/bin/README.md says: everything in the test's own directory,
served on 127.0.0.1 only on free ports, readOnlyPort 0, cgroup v1 allowed
(failCgroupV1: false), cgroupfs driver, no QoS cgroups of its own (so it
makes no cgroup outside pyrio's parent), and stopped by its PID.
"""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.harness import Stack, free_tcp_port
from tests.node_tools import find_tool


class Kubelet:
    def __init__(self, stack: Stack, feature_gates: dict[str, bool]) -> None:
        self.binary = find_tool("kubelet")
        self.stack = stack
        self.root = Path(tempfile.mkdtemp(prefix="pyrio-kubelet-", dir="/tmp"))
        self.manifests = self.root / "manifests"
        self.manifests.mkdir()
        self.port, self.healthz_port = free_tcp_port(), free_tcp_port()
        self.log_path = self.root / "kubelet.log"
        (self.root / "resolv.conf").write_text("nameserver 127.0.0.1\n")
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": "127.0.0.1",
            "port": self.port,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": self.healthz_port,
            "staticPodPath": str(self.manifests),
            "fileCheckFrequency": "1s",
            "containerRuntimeEndpoint": f"unix://{stack.socket}",
            "cgroupDriver": "cgroupfs",
            "cgroupsPerQOS": False,
            "enforceNodeAllocatable": [],
            "failCgroupV1": False,
            "failSwapOn": False,
            "resolvConf": str(self.root / "resolv.conf"),
            "podLogsDir": str(self.root / "pod-logs"),
            "evictionHard": {"memory.available": "1Ki", "nodefs.available": "1%", "imagefs.available": "1%"},
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "authentication": {"anonymous": {"enabled": True}, "webhook": {"enabled": False}},
            "authorization": {"mode": "AlwaysAllow"},
            "featureGates": feature_gates,
            # With CRI stats the kubelet has cadvisor collect filesystem usage only when
            # this is on; off, the root cgroup has no filesystems and /stats/summary
            # answers 500 "failed to get rootFs info: cannot find filesystem info".
            "localStorageCapacityIsolation": True,
            "syncFrequency": "10s",
        }
        self.config_path = self.root / "kubelet.json"
        self.config_path.write_text(json.dumps(config))
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [self.binary, f"--config={self.config_path}", f"--root-dir={self.root / 'root'}",
             f"--cert-dir={self.root / 'pki'}", f"--volume-plugin-dir={self.root / 'volume-plugins'}",
             "--hostname-override=pyrio-test-node", "--v=4"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()

    def add_manifest(self, name: str, pod: dict[str, Any]) -> Path:
        # Renamed into place: the kubelet may read a half-written file.
        temporary = self.root / f".{name}.json"
        temporary.write_text(json.dumps(pod))
        final = self.manifests / f"{name}.json"
        os.rename(temporary, final)
        return final

    def get(self, path: str) -> bytes:
        context = ssl._create_unverified_context()  # the kubelet's self-signed serving certificate
        try:
            with urllib.request.urlopen(f"https://127.0.0.1:{self.port}{path}", timeout=30, context=context) as reply:
                return reply.read()
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"kubelet {path}: {exc.code} {exc.read()[:500]!r}") from None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(30)
        # The kubelet bind-mounts its root dir onto itself (and mounts volumes under it).
        root_dir = self.root / "root"
        mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()
                  if line.split()[1] == str(root_dir) or line.split()[1].startswith(f"{root_dir}/")]
        for mount in sorted(mounts, key=len, reverse=True):
            subprocess.run(["umount", "-l", mount], check=False)
        subprocess.run(["rm", "-rf", "--one-file-system", str(self.root)], check=False)
