"""Volumes with the newer mount semantics, through the socket: propagation
(Bidirectional, HostToContainer) and recursive read-only mounts.

Each test makes its host mounts (a shared bind mount, tmpfs submounts) in the
stack's temp root and unmounts every one of them, also when it fails.
"""

from __future__ import annotations

import subprocess
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator

import grpc
import pytest
from cri_api.v1 import api_pb2

from common.mounts import is_mount_point, umount_all_under
from common.runtime_features import handler_features
from tests.fixtures_containers import Containers, wait_for_log
from tests.fixtures_pods import pod_config
from tests.harness import wait_until
from tests.test_containers import hybrid_host_laid_out_for_crun


def run_mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True)


@contextmanager
def host_directory(containers: Containers, name: str, shared: bool = False) -> Iterator[Path]:
    """A directory of the test's temp root; with `shared`, a bind mount of
    itself made shared (the host's / here is private, as on many nodes)."""
    directory = containers.stack.root / "mount-features" / name
    directory.mkdir(parents=True, exist_ok=True)
    try:
        if shared:
            run_mount("--bind", str(directory), str(directory))
            run_mount("--make-shared", str(directory))
        yield directory
    finally:
        # Stopping containers first lets their propagated mounts go with them.
        for container_id in reversed(containers.container_ids):
            try:
                containers.stop(container_id, 0)
            except grpc.RpcError:
                pass
        umount_all_under(str(directory))


def privileged_pod(containers: Containers) -> tuple[str, api_pb2.PodSandboxConfig]:
    config = pod_config(log_directory=str(containers.log_root / f"priv{len(containers.pod_ids)}"))
    config.linux.security_context.privileged = True
    reply = containers.runtime.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=config), timeout=120)
    containers.pod_ids.append(reply.pod_sandbox_id)
    return reply.pod_sandbox_id, config


def with_mount(containers: Containers, name: str, command: list[str], mount: api_pb2.Mount,
               privileged: bool = False) -> api_pb2.ContainerConfig:
    config = containers.config(name, command=command)
    config.mounts.append(mount)
    config.linux.security_context.privileged = privileged
    return config


def rpc_error(call, *args) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call(*args)
    return caught.value


# --- propagation ---------------------------------------------------------------------


def mounting_container(containers: Containers, volume: Path, propagation: int) -> str:
    """A privileged container that mounts a tmpfs (with a file) at /vol/from-ctr of its volume."""
    pod = privileged_pod(containers)
    mount = api_pb2.Mount(container_path="/vol", host_path=str(volume), propagation=propagation)
    script = "mkdir -p /vol/from-ctr && mount -t tmpfs from-ctr /vol/from-ctr && echo ctr > /vol/from-ctr/f && echo mounted; sleep 300"
    container_id = containers.create(pod, with_mount(containers, "mounting", ["sh", "-c", script], mount, privileged=True))
    containers.start(container_id)
    wait_for_log(containers, container_id, "mounted")
    return container_id


def assert_a_host_mount_reaches(containers: Containers, container_id: str, volume: Path) -> None:
    """A mount the host makes in the volume after the container started appears in it."""
    (volume / "from-host").mkdir(exist_ok=True)
    run_mount("-t", "tmpfs", "from-host", str(volume / "from-host"))
    (volume / "from-host" / "g").write_text("host\n")
    assert containers.exec(container_id, "cat", "/vol/from-host/g").stdout == b"host\n"


def test_bidirectional_mount_reaches_the_host_and_back(containers: Containers) -> None:
    with host_directory(containers, "bidirectional", shared=True) as volume:
        container_id = mounting_container(containers, volume, api_pb2.PROPAGATION_BIDIRECTIONAL)
        # The container's mount appeared on the host.
        wait_until(lambda: is_mount_point(str(volume / "from-ctr")), timeout=10, what="the container's mount on the host")
        assert (volume / "from-ctr" / "f").read_text() == "ctr\n"
        assert_a_host_mount_reaches(containers, container_id, volume)
        assert containers.info(container_id)["runtime_spec"]["linux"]["rootfsPropagation"] == "rshared"


def test_host_to_container_mount_reaches_the_container_only(containers: Containers) -> None:
    with host_directory(containers, "host-to-container", shared=True) as volume:
        container_id = mounting_container(containers, volume, api_pb2.PROPAGATION_HOST_TO_CONTAINER)
        assert_a_host_mount_reaches(containers, container_id, volume)
        # A slave mount does not send the container's mounts back.
        assert not is_mount_point(str(volume / "from-ctr"))
        assert containers.info(container_id)["runtime_spec"]["linux"]["rootfsPropagation"] == "rslave"


@pytest.mark.parametrize("propagation", [api_pb2.PROPAGATION_BIDIRECTIONAL, api_pb2.PROPAGATION_HOST_TO_CONTAINER])
def test_propagation_from_a_private_host_mount_is_refused(containers: Containers, propagation: int) -> None:
    with host_directory(containers, f"private-{propagation}") as volume:
        pod = privileged_pod(containers)
        mount = api_pb2.Mount(container_path="/vol", host_path=str(volume), propagation=propagation)
        error = rpc_error(containers.create, pod, with_mount(containers, "private", ["sleep", "300"], mount, privileged=True))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "not a shared" in error.details() or "neither a shared" in error.details()
        assert "mount --make-rshared" in error.details()
        listed = containers.runtime.ListContainers(api_pb2.ListContainersRequest(
            filter=api_pb2.ContainerFilter(pod_sandbox_id=pod[0])))
        assert list(listed.containers) == []


# --- recursive read-only ------------------------------------------------------------


def runtime_handlers(containers: Containers) -> dict[str, api_pb2.RuntimeHandlerFeatures]:
    status = containers.runtime.Status(api_pb2.StatusRequest(), timeout=20)
    return {handler.name: handler.features for handler in status.runtime_handlers}


def test_status_advertises_recursive_read_only_where_the_runtime_has_rro(containers: Containers) -> None:
    handlers = runtime_handlers(containers)
    for name, path in (("runc", "/usr/sbin/runc"), ("crun", "/usr/bin/crun")):
        if name in handlers:
            assert handlers[name].recursive_read_only_mounts == handler_features(path).recursive_read_only_mounts
    # runc 1.1 lists rro in `runc features`; this host's kernel has mount_setattr.
    runc_features = subprocess.run(["runc", "features"], capture_output=True, text=True)
    if runc_features.returncode == 0 and '"rro"' in runc_features.stdout:
        assert handlers["runc"].recursive_read_only_mounts and handlers[""].recursive_read_only_mounts


@pytest.mark.parametrize("handler", ["", "crun"])
def test_a_submount_of_a_recursive_read_only_volume_is_read_only(containers: Containers, handler: str) -> None:
    if not runtime_handlers(containers)[handler].recursive_read_only_mounts:
        pytest.skip(f"runtime handler {handler or 'default'!r} does not support recursive read-only mounts here")
    layout = hybrid_host_laid_out_for_crun(containers.stack.root) if handler == "crun" else nullcontext()
    with layout, host_directory(containers, f"rro-{handler or 'default'}") as volume:
        (volume / "sub").mkdir(exist_ok=True)
        run_mount("-t", "tmpfs", "rro-sub", str(volume / "sub"))
        script = ("touch /vol/top 2>&1; touch /vol/sub/inner 2>&1; "
                  "touch /plain/sub/inner && echo plain-sub-writable; sleep 300")
        config = containers.config("rro", command=["sh", "-c", script])
        config.mounts.append(api_pb2.Mount(container_path="/vol", host_path=str(volume), readonly=True,
                                           recursive_read_only=True))
        # Plain readonly is not recursive: the submount stays writable.
        config.mounts.append(api_pb2.Mount(container_path="/plain", host_path=str(volume), readonly=True))
        container_id = containers.create(containers.pod(runtime_handler=handler), config)
        containers.start(container_id)
        text = wait_for_log(containers, container_id, "plain-sub-writable")
        assert "/vol/top: Read-only file system" in text
        assert "/vol/sub/inner: Read-only file system" in text
        assert (volume / "sub" / "inner").exists() and not (volume / "top").exists()
        containers.stop(container_id, 0)
        containers.remove(container_id)


@pytest.mark.parametrize("fields, needle", [
    ({"readonly": False}, "needs readonly"),
    ({"readonly": True, "propagation": api_pb2.PROPAGATION_HOST_TO_CONTAINER}, "needs private propagation"),
])
def test_recursive_read_only_misuse_is_invalid(containers: Containers, fields: dict, needle: str) -> None:
    with host_directory(containers, "rro-invalid") as volume:
        config = containers.config("rro-bad", command=["sleep", "300"])
        config.mounts.append(api_pb2.Mount(container_path="/vol", host_path=str(volume), recursive_read_only=True, **fields))
        error = rpc_error(containers.create, containers.pod(), config)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in error.details()
