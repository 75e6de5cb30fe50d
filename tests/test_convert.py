"""CRI messages to plain dicts and back, as crigw sends them to the daemons."""

from __future__ import annotations

from cri_api.v1 import api_pb2

from services.crigw.convert import dict_to_message, message_to_dict


def test_round_trip_keeps_int64_maps_enums_and_repeated() -> None:
    request = api_pb2.CreateContainerRequest(
        pod_sandbox_id="a" * 64,
        config=api_pb2.ContainerConfig(
            metadata=api_pb2.ContainerMetadata(name="c", attempt=3),
            image=api_pb2.ImageSpec(image="busybox"),
            command=["sh", "-c"],
            envs=[api_pb2.KeyValue(key="A", value="1")],
            labels={"app": "x"},
            mounts=[api_pb2.Mount(container_path="/d", host_path="/tmp", propagation=api_pb2.PROPAGATION_HOST_TO_CONTAINER)],
            linux=api_pb2.LinuxContainerConfig(
                resources=api_pb2.LinuxContainerResources(memory_limit_in_bytes=3 << 40, cpu_quota=-1),
            ),
        ),
    )
    as_dict = message_to_dict(request)
    limits = as_dict["config"]["linux"]["resources"]
    assert limits["memory_limit_in_bytes"] == 3 << 40 and isinstance(limits["memory_limit_in_bytes"], int)
    assert limits["cpu_quota"] == -1
    assert as_dict["config"]["mounts"][0]["propagation"] == api_pb2.PROPAGATION_HOST_TO_CONTAINER
    assert as_dict["config"]["labels"] == {"app": "x"}
    assert dict_to_message(as_dict, api_pb2.CreateContainerRequest) == request


def test_unset_fields_are_absent_and_unknown_keys_ignored() -> None:
    assert message_to_dict(api_pb2.PodSandboxMetadata(name="p")) == {"name": "p"}
    built = dict_to_message({"name": "p", "not_a_field": 1}, api_pb2.PodSandboxMetadata)
    assert built == api_pb2.PodSandboxMetadata(name="p")


def test_bytes_fields() -> None:
    reply = api_pb2.ExecSyncResponse(stdout=b"\x00\xffhi", exit_code=3)
    as_dict = message_to_dict(reply)
    assert as_dict["stdout"] == b"\x00\xffhi"
    assert dict_to_message(as_dict, api_pb2.ExecSyncResponse) == reply
