"""The container's users through the socket: SupplementalGroupsPolicy and the
effective user ContainerStatus reports."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from cri_api.v1 import api_pb2

from common.runtime_features import handler_features
from tests.fixtures_containers import Containers
from tests.node_tools import find_tool
from tests.test_crictl import crictl
from tests.oci_images import File, PushedImage, build_and_push, busybox_layer, tar_layer


@pytest.fixture(scope="session")
def grouped_image(registry: Any) -> PushedImage:
    """busybox whose /etc/group puts `app` (uid 1000) in groups 2001 and 2002."""
    groups = File("etc/group", b"root:x:0:\napp:x:1000:\nextra1:x:2001:app\nextra2:x:2002:root,app\nnogroup:x:65534:\n")
    return build_and_push(registry, "pyrio/grouped", "v1", layers=[busybox_layer(), tar_layer([groups])],
                          config={"Cmd": ["sh"]})


def run_as_app(containers: Containers, image: PushedImage, name: str, policy: int) -> str:
    linux = api_pb2.LinuxContainerConfig()
    context = linux.security_context
    context.namespace_options.pid = api_pb2.CONTAINER
    context.run_as_user.value = 1000
    context.supplemental_groups.extend([3000])
    context.supplemental_groups_policy = policy
    return containers.run(name=name, image=image.reference, command=["id", "-G"], linux=linux)


def test_status_advertises_supplemental_groups_policy(containers: Containers) -> None:
    status = containers.runtime.Status(api_pb2.StatusRequest(), timeout=20)
    assert status.features.supplemental_groups_policy


def test_merge_adds_the_image_groups_and_strict_ignores_them(containers: Containers, grouped_image: PushedImage) -> None:
    merge = run_as_app(containers, grouped_image, "merge", api_pb2.Merge)
    strict = run_as_app(containers, grouped_image, "strict", api_pb2.Strict)
    assert sorted(map(int, containers.output(merge).split())) == [1000, 2001, 2002, 3000]
    assert sorted(map(int, containers.output(strict).split())) == [1000, 3000]
    # ContainerStatus reports the effective user (the kubelet shows it in the pod's status).
    merged_user = containers.status(merge).status.user.linux
    assert (merged_user.uid, merged_user.gid) == (1000, 1000)
    assert sorted(merged_user.supplemental_groups) == [1000, 2001, 2002, 3000]
    strict_user = containers.status(strict).status.user.linux
    assert (strict_user.uid, strict_user.gid, sorted(strict_user.supplemental_groups)) == (1000, 1000, [1000, 3000])


def test_unknown_supplemental_groups_policy_is_invalid(containers: Containers, grouped_image: PushedImage) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        run_as_app(containers, grouped_image, "bad-policy", 7)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "supplemental_groups_policy" in caught.value.details()


def test_crictl_shows_the_features_and_the_effective_user(containers: Containers, grouped_image: PushedImage) -> None:
    """What an operator sees: `crictl info` lists the features per handler, `crictl inspect` the user."""
    find_tool("crictl")
    info = crictl(containers, "info")
    # crictl prints these as the proto names them.
    assert info["features"]["supplemental_groups_policy"] is True
    handlers = {handler.get("name", ""): handler["features"] for handler in info["runtimeHandlers"]}
    runc = handler_features("/usr/sbin/runc")
    assert handlers["runc"].get("recursive_read_only_mounts", False) is runc.recursive_read_only_mounts
    assert handlers["runc"].get("user_namespaces", False) is False
    assert handlers["crun"].get("user_namespaces", False) is handler_features("/usr/bin/crun").user_namespaces
    strict = run_as_app(containers, grouped_image, "strict-crictl", api_pb2.Strict)
    containers.wait_exited(strict)
    user = crictl(containers, "inspect", strict)["status"]["user"]["linux"]
    assert int(user["uid"]) == 1000 and int(user["gid"]) == 1000
    groups = user.get("supplementalGroups") or user.get("supplemental_groups")
    assert sorted(int(group) for group in groups) == [1000, 3000]
