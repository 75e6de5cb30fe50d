"""Run IN the node guest (from /root/pyrio with its venv): the test registry
and the kubelet, as systemd services, with the lane's static pods.

    python -m tests.node.provision registry   # docker-registry on 127.0.0.1:5000 with busybox
    python -m tests.node.provision kubelet    # kubelet.service (cgroupDriver: systemd) + static pods

Both are units so that a guest reboot brings them back by themselves.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.oci_images import push_busybox, wait_for_registry

REGISTRY_HOST = "127.0.0.1:5000"
IMAGE = f"{REGISTRY_HOST}/busybox:latest"
KUBELET_BINARY = os.environ.get("PYRIO_KUBELET", "/mnt/shared-bin/kubelet")
KUBELET_DIR = Path("/var/lib/kubelet")
MANIFESTS = Path("/etc/kubernetes/manifests")
KUBELET_CONFIG = Path("/etc/kubernetes/kubelet.yaml")
SOCKET = "unix:///run/pyrio/pyrio.sock"

REGISTRY_UNIT = """\
[Unit]
Description=the node lane's image registry (127.0.0.1:5000)
[Service]
ExecStart=/usr/bin/docker-registry serve /etc/pyrio-node/registry.yml
[Install]
WantedBy=multi-user.target
"""

KUBELET_UNIT = f"""\
[Unit]
Description=kubelet (standalone, static pods) on pyrio
After=pyrio.service
Wants=pyrio.service
[Service]
ExecStart={KUBELET_BINARY} --config={KUBELET_CONFIG} --container-runtime-endpoint={SOCKET} \\
  --root-dir={KUBELET_DIR} --cert-dir={KUBELET_DIR}/pki --volume-plugin-dir={KUBELET_DIR}/volume-plugins \\
  --hostname-override=pyrio-node --node-ip=127.0.0.1 --v=2
Restart=always
RestartSec=2
[Install]
WantedBy=multi-user.target
"""

# cgroupDriver systemd and the default failCgroupV1 (true): a v1 host is refused.
KUBELET_YAML = {
    "apiVersion": "kubelet.config.k8s.io/v1beta1",
    "kind": "KubeletConfiguration",
    "cgroupDriver": "systemd",
    "address": "127.0.0.1",
    "healthzBindAddress": "127.0.0.1",
    "readOnlyPort": 0,
    "staticPodPath": str(MANIFESTS),
    "fileCheckFrequency": "2s",
    "syncFrequency": "5s",
    "authentication": {"anonymous": {"enabled": True}, "webhook": {"enabled": False}},
    "authorization": {"mode": "AlwaysAllow"},
    "failSwapOn": False,
    "enforceNodeAllocatable": ["pods"],
    "evictionHard": {"memory.available": "1Mi", "nodefs.available": "1%", "imagefs.available": "1%"},
    "imageGCHighThresholdPercent": 100,
    "imageGCLowThresholdPercent": 99,
    "serializeImagePulls": False,
}


def pod(name: str, containers: list[dict], **spec: object) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "default"},
            "spec": {"containers": containers, "terminationGracePeriodSeconds": 2, **spec}}


def container(name: str, script: str, memory: str = "32Mi", cpu: str = "100m", **extra: object) -> dict:
    return {"name": name, "image": IMAGE, "imagePullPolicy": "IfNotPresent", "command": ["sh", "-c", script],
            "resources": {"requests": {"cpu": cpu, "memory": memory}, "limits": {"cpu": cpu, "memory": memory}},
            **extra}


# The lane's static pods: what tests/node/test_*.py check.
STATIC_PODS = {
    "web": pod("web", [
        container("server", "mkdir -p /www && echo pyrio-node > /www/index.html && exec httpd -f -p 8080 -h /www",
                  memory="64Mi", cpu="500m"),
        container("sidecar", "exec sleep 1000000", memory="32Mi", cpu="100m"),
    ]),
    "probe": pod("probe", [
        container("liveness", "touch /tmp/healthy; sleep 40; rm /tmp/healthy; exec sleep 1000000",
                  livenessProbe={"exec": {"command": ["cat", "/tmp/healthy"]}, "initialDelaySeconds": 5,
                                 "periodSeconds": 5, "failureThreshold": 2, "timeoutSeconds": 30}),
    ]),
    "oom": pod("oom", [
        container("hog", "head -c 200m /dev/zero | tail; exec sleep 1000000", memory="32Mi"),
    ], restartPolicy="Never"),
}


class AnonymousRegistry:
    host = REGISTRY_HOST

    def auth_header(self) -> str | None:
        return None


def systemctl(*args: str) -> None:
    subprocess.run(["systemctl", *args], check=True)


def provision_registry() -> None:
    storage = Path("/var/lib/pyrio-node-registry")
    storage.mkdir(parents=True, exist_ok=True)
    Path("/etc/pyrio-node").mkdir(exist_ok=True)
    Path("/etc/pyrio-node/registry.yml").write_text(
        "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\n"
        f"storage:\n  filesystem:\n    rootdirectory: {storage}\nhttp:\n  addr: {REGISTRY_HOST}\n")
    Path("/etc/systemd/system/pyrio-node-registry.service").write_text(REGISTRY_UNIT)
    systemctl("daemon-reload")
    systemctl("enable", "--now", "pyrio-node-registry.service")
    wait_for_registry(REGISTRY_HOST, timeout=120)

    push_busybox(AnonymousRegistry())


def provision_kubelet() -> None:
    for directory in (MANIFESTS, KUBELET_DIR / "pki", KUBELET_DIR / "volume-plugins"):
        directory.mkdir(parents=True, exist_ok=True)
    # JSON is YAML: no YAML writer needed.
    KUBELET_CONFIG.write_text(json.dumps(KUBELET_YAML, indent=1))
    for name, manifest in STATIC_PODS.items():
        partial = MANIFESTS / f".{name}.json.tmp"
        partial.write_text(json.dumps(manifest, indent=1))
        partial.rename(MANIFESTS / f"{name}.json")  # the kubelet may read a half-written file
    Path("/etc/systemd/system/kubelet.service").write_text(KUBELET_UNIT)
    systemctl("daemon-reload")
    systemctl("enable", "--now", "kubelet.service")


def main(argv: list[str]) -> int:
    steps = {"registry": provision_registry, "kubelet": provision_kubelet}
    for step in argv or steps:
        steps[step]()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
