"""User namespaces (hostUsers: false) through the socket, with the handler
that supports them on this host (crun: idmapped mounts; runc 1.1 has none,
see docs/host-features.md)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import grpc
import pytest
from cri_api.v1 import api_pb2

from tests.fixtures_containers import Containers, wait_for_log
from tests.harness import Stack
from tests.oci_images import PushedImage
from tests.test_image_volumes import content_image, image_id  # noqa: F401 - content_image is a fixture
from tests.test_containers import hybrid_host_laid_out_for_crun

HOST_BASE, SIZE = 3 * 65536, 65536


def user_namespace(host_id: int = HOST_BASE, length: int = SIZE, container_id: int = 0) -> api_pb2.UserNamespace:
    mapping = api_pb2.IDMapping(host_id=host_id, container_id=container_id, length=length)
    return api_pb2.UserNamespace(mode=api_pb2.POD, uids=[mapping], gids=[mapping])


def userns_pod(containers: Containers, userns: api_pb2.UserNamespace, handler: str = "crun") -> tuple[str, api_pb2.PodSandboxConfig]:
    from tests.fixtures_pods import pod_config

    config = pod_config(log_directory=str(containers.log_root / f"userns{len(containers.pod_ids)}"))
    config.linux.security_context.namespace_options.userns_options.CopyFrom(userns)
    reply = containers.runtime.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=config, runtime_handler=handler), timeout=120)
    containers.pod_ids.append(reply.pod_sandbox_id)
    return reply.pod_sandbox_id, config


def userns_config(containers: Containers, name: str, command: list[str], userns: api_pb2.UserNamespace | None) -> api_pb2.ContainerConfig:
    config = containers.config(name, command=command)
    if userns is not None:
        config.linux.security_context.namespace_options.userns_options.CopyFrom(userns)
    return config


def crun_supports_user_namespaces(containers: Containers) -> bool:
    status = containers.runtime.Status(api_pb2.StatusRequest(), timeout=20)
    return any(handler.name == "crun" and handler.features.user_namespaces for handler in status.runtime_handlers)


@pytest.fixture(scope="module")
def crun_host(stack: Stack) -> Iterator[None]:
    """The host laid out for crun once for the module (each layout's undo waits for the kernel)."""
    with hybrid_host_laid_out_for_crun(stack.root):
        yield


@pytest.fixture
def volume_dir() -> Iterator[Path]:
    """A host volume on a traversable path (as the kubelet's pod volume dirs are)."""
    directory = Path(tempfile.mkdtemp(prefix="pyrio-userns-vol-", dir="/tmp"))
    directory.chmod(0o711)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_status_advertises_user_namespaces_only_for_idmapping_handlers(containers: Containers) -> None:
    status = containers.runtime.Status(api_pb2.StatusRequest(), timeout=20)
    features = {handler.name: handler.features for handler in status.runtime_handlers}
    assert not features["runc"].user_namespaces  # runc 1.1 ignores idmapped mount options
    assert features["crun"].user_namespaces == crun_supports_user_namespaces(containers)


def test_a_pod_in_its_own_user_namespace(containers: Containers, volume_dir: Path, crun_host: None) -> None:
    if not crun_supports_user_namespaces(containers):
        pytest.skip("no runtime handler with idmapped mounts on this host")
    (volume_dir / "f").write_text("from the host\n")
    userns = user_namespace()
    pod = userns_pod(containers, userns)
    options = containers.runtime.PodSandboxStatus(api_pb2.PodSandboxStatusRequest(pod_sandbox_id=pod[0]),
                                                  timeout=20).status.linux.namespaces.options
    assert options.userns_options == userns
    script = ("cat /proc/self/uid_map /proc/self/gid_map; id -u; stat -c 'busybox %u %g' /bin/busybox; "
              "stat -c 'vol %u %g' /vol/f; touch /vol/made-inside /made-in-rootfs && echo wrote; sleep 300")
    config = userns_config(containers, "userns", ["sh", "-c", script], userns)
    config.mounts.append(api_pb2.Mount(container_path="/vol", host_path=str(volume_dir)))
    container_id = containers.create(pod, config)
    containers.start(container_id)
    text = wait_for_log(containers, container_id, "wrote")
    lines = [line.split(":", 1)[1].split() for line in containers.log_contents(container_id)]
    assert lines[:2] == [["0", str(HOST_BASE), str(SIZE)]] * 2  # uid_map and gid_map
    assert lines[2] == ["0"]  # id -u
    # The image's files are root's inside, the volume's host-root files too (idmapped mounts).
    assert "busybox 0 0" in text and "vol 0 0" in text
    pid = containers.info(container_id)["pid"]
    # Outside, the container's root is the mapped host id, and so are the image's files through its root.
    status = Path(f"/proc/{pid}/status").read_text()
    assert f"Uid:\t{HOST_BASE}\t{HOST_BASE}" in status
    assert os.stat(f"/proc/{pid}/root/bin/busybox").st_uid == HOST_BASE
    # What the container's root writes into the volume is the host's root's.
    assert os.stat(volume_dir / "made-inside").st_uid == 0
    # The pod's network namespace belongs to its user namespace.
    assert containers.exec(container_id, "cat", "/proc/self/uid_map").stdout.split() == [b"0", str(HOST_BASE).encode(), str(SIZE).encode()]
    containers.stop(container_id)
    containers.remove(container_id)
    assert not (containers.stack.root / "run" / "userns" / container_id).exists()


def test_an_image_volume_in_a_user_namespaced_pod(containers: Containers, content_image: PushedImage, crun_host: None) -> None:  # noqa: F811
    if not crun_supports_user_namespaces(containers):
        pytest.skip("no runtime handler with idmapped mounts on this host")
    volume_image = image_id(containers, content_image.reference)
    userns = user_namespace(host_id=6 * 65536)
    pod = userns_pod(containers, userns)
    script = "stat -c 'owner %u %g' /img/data/hello.txt; cat /img/data/hello.txt; touch /img/x 2>&1; echo done; sleep 300"
    config = userns_config(containers, "imgvol", ["sh", "-c", script], userns)
    config.mounts.append(api_pb2.Mount(container_path="/img", image=api_pb2.ImageSpec(image=volume_image)))
    container_id = containers.create(pod, config)
    containers.start(container_id)
    text = wait_for_log(containers, container_id, "done")
    # imaged idmapped the volume's layers too: the image's files are root's inside.
    assert "owner 0 0" in text and "hello from the image" in text and "Read-only file system" in text
    containers.stop(container_id)
    containers.remove(container_id)


def test_user_namespace_mismatch_and_invalid_mappings(containers: Containers, crun_host: None) -> None:
    if not crun_supports_user_namespaces(containers):
        pytest.skip("no runtime handler with idmapped mounts on this host")
    userns = user_namespace(host_id=4 * 65536)
    pod = userns_pod(containers, userns)
    for name, given in (("other-mapping", user_namespace(host_id=5 * 65536)), ("node-userns", None)):
        with pytest.raises(grpc.RpcError) as caught:
            containers.create(pod, userns_config(containers, name, ["true"], given))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
        assert "userns_options" in caught.value.details()
    for bad, needle in ((user_namespace(length=0), "positive length"), (user_namespace(container_id=1), "container_id 0"),
                        (api_pb2.UserNamespace(mode=api_pb2.POD), "needs uids")):
        with pytest.raises(grpc.RpcError) as caught:
            userns_pod(containers, bad)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in caught.value.details()
    overlapping = user_namespace()
    overlapping.uids.append(api_pb2.IDMapping(host_id=HOST_BASE + 10, container_id=SIZE, length=10))
    with pytest.raises(grpc.RpcError) as caught:
        userns_pod(containers, overlapping)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "overlap" in caught.value.details()


def test_a_handler_without_idmapped_mounts_refuses_user_namespaces(containers: Containers) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        userns_pod(containers, user_namespace(), handler="runc")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "does not support user namespaces" in caught.value.details()
