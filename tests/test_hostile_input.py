"""Hostile or careless CRI input through the real socket (issue 15 items 11, 12):
overlong ids and names, echoed values, and pod files written from the config."""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import pytest
from cri_api.v1 import api_pb2

from services.crigw.status import bounded_message
from tests.fixtures_pods import Pods, pod_config, sandbox_info
from tests.harness import Stack

# Far past the gRPC client's default 8 KiB metadata limit once echoed.
HUGE = 3 << 20


def rpc_error(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call(*args, **kwargs)
    return caught.value


def test_bounded_message_cuts_only_overlong_values() -> None:
    assert bounded_message("container 'abc' not found") == "container 'abc' not found"
    cut = bounded_message(f"image {'x' * 100_000!r} is bad")
    assert cut.startswith("image 'xxxx") and "(100002 chars)" in cut and cut.endswith(" is bad")
    assert len(cut) < 200
    assert len(bounded_message("word " * 100_000)) < 4200


@pytest.mark.parametrize("call, request_", [
    ("ContainerStatus", api_pb2.ContainerStatusRequest(container_id="a" * HUGE)),
    ("StopContainer", api_pb2.StopContainerRequest(container_id="a" * 65)),
    ("ExecSync", api_pb2.ExecSyncRequest(container_id="f" * (64 << 10), cmd=["true"])),
    ("PodSandboxStatus", api_pb2.PodSandboxStatusRequest(pod_sandbox_id="b" * (64 << 10))),
    ("ListContainers", api_pb2.ListContainersRequest(filter=api_pb2.ContainerFilter(id="c" * 1000))),
    ("ImageStatus", api_pb2.ImageStatusRequest(image=api_pb2.ImageSpec(image="r/" + "n" * HUGE))),
])
def test_overlong_ids_are_invalid_argument_without_echo(stack: Stack, call: str, request_) -> None:
    service = stack.images if call == "ImageStatus" else stack.runtime
    error = rpc_error(getattr(service, call), request_, timeout=20)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    assert "characters long; at most" in error.details()
    assert len(error.details()) < 300


def test_full_length_unknown_id_is_still_not_found(stack: Stack) -> None:
    error = rpc_error(stack.runtime.ContainerStatus, api_pb2.ContainerStatusRequest(container_id="0" * 64), timeout=10)
    assert error.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("field, length", [("name", 254), ("namespace", 64), ("uid", 64 << 10)])
def test_overlong_pod_names_refused(stack: Stack, pods: Pods, field: str, length: int) -> None:
    config = pod_config()
    setattr(config.metadata, field, "p" * length)
    error = rpc_error(pods.run, config)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"metadata.{field} is {length} characters long" in error.details()


@pytest.mark.parametrize("field, value", [("uid", "a\x00b"), ("namespace", "id\x00"), ("name", "a\nb")])
def test_control_characters_in_pod_names_refused(stack: Stack, pods: Pods, field: str, value: str) -> None:
    """The fuzz bench's NUL in a pod's uid reached CNI's arguments and came back INTERNAL."""
    config = pod_config()
    setattr(config.metadata, field, value)
    error = rpc_error(pods.run, config)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    assert f"metadata.{field} contains a control character" in error.details()


def test_longest_names_kubernetes_allows_are_accepted(stack: Stack, pods: Pods) -> None:
    config = pod_config(name="p" * 253, namespace="n" * 63)
    sandbox_id = pods.run(config)
    assert pods.status(sandbox_id).status.metadata.name == "p" * 253


def test_echoed_value_is_cut_in_grpc_message(stack: Stack, pods: Pods) -> None:
    """A huge value that no length limit covers still comes back cut, with
    its real code (not RESOURCE_EXHAUSTED from the client's metadata limit)."""
    error = rpc_error(pods.run, pod_config(sysctls={"vm." + "x" * HUGE: "1"}))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    assert "chars)" in error.details() and len(error.details()) < 4500


# --- pod files (issue 15 item 12) --------------------------------------------------


def node_traces(stack: Stack) -> tuple[set[str], set[str], set[str]]:
    """What a RunPodSandbox leaves: records, pod file directories, pinned namespaces."""
    netd = stack.state_dir / "netd"
    listed = {pod.id for pod in stack.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=10).items}
    pod_dirs = {path.name for path in (netd / "pods").glob("*")} if (netd / "pods").exists() else set()
    pins = {str(path) for path in (stack.run_dir / "netns").glob("*")} if (stack.run_dir / "netns").exists() else set()
    return listed, pod_dirs, pins


def test_pod_file_validators() -> None:
    from common.errors import InvalidArgument
    from services.netd import pod_files

    for good in ("web-1", "a", "Node1.example.com", "x" * 63):
        pod_files.validate_hostname(good)
    for bad in ("web\n10.9.9.9 kubernetes.default.svc", "a b", "-web", "web-", "a..b", "x" * 64 + ".y", "w\0"):
        with pytest.raises(InvalidArgument):
            pod_files.validate_hostname(bad)
    pod_files.validate_dns_config({"servers": ["10.96.0.10", "fd00::10", "fe80::1%eth0"], "options": ["ndots:5"]})
    for bad in ({"servers": ["dns.example"]}, {"servers": ["10.0.0.1\nnameserver 6.6.6.6"]},
                {"options": ["ndots:5\0"]}, {"searches": ["svc\x1b.local"]}, {"searches": [""]}):
        with pytest.raises(InvalidArgument):
            pod_files.validate_dns_config(bad)


def test_hostname_with_newline_refused_and_nothing_created(stack: Stack, pods: Pods) -> None:
    before = node_traces(stack)
    error = rpc_error(pods.run, pod_config(hostname="web\n10.9.9.9 kubernetes.default.svc"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "RFC 1123" in error.details()
    assert node_traces(stack) == before


@pytest.mark.parametrize("dns, needle", [
    ({"servers": ["not-an-ip"]}, "not an IP address"),
    ({"servers": ["10.96.0.10"], "options": ["ndots:5\0evil"]}, "control character"),
    ({"servers": ["10.96.0.10"], "searches": ["svc.local\nnameserver 6.6.6.6"]}, "whitespace"),
])
def test_bad_dns_config_refused(stack: Stack, pods: Pods, dns: dict, needle: str) -> None:
    before = node_traces(stack)
    error = rpc_error(pods.run, pod_config(dns=dns))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in error.details()
    assert node_traces(stack) == before


def test_port_mapping_host_ip_must_be_an_ip(stack: Stack, pods: Pods) -> None:
    config = pod_config()
    config.port_mappings.append(api_pb2.PortMapping(protocol=api_pb2.TCP, container_port=80, host_port=0, host_ip="localhost"))
    before = node_traces(stack)
    error = rpc_error(pods.run, config)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "host_ip 'localhost' is not an IP address" in error.details()
    assert node_traces(stack) == before


def test_relative_log_directory_refused(stack: Stack, pods: Pods) -> None:
    netd_cwd = Path(os.readlink(f"/proc/{stack.service_pid('netd')}/cwd"))
    before = node_traces(stack)
    error = rpc_error(pods.run, pod_config(log_directory="relative-pod-logs"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "must be an absolute path" in error.details()
    assert node_traces(stack) == before
    assert not (netd_cwd / "relative-pod-logs").exists()


def test_valid_pod_files_still_written(stack: Stack, pods: Pods) -> None:
    sandbox_id = pods.run(pod_config(hostname="web-2", dns={"servers": ["fd00::10"], "options": ["ndots:2"]}))
    info = sandbox_info(stack, sandbox_id)
    assert Path(info["files"]["hosts"]).read_text().count("\n") == 3
    assert Path(info["files"]["resolv_conf"]).read_text() == "nameserver fd00::10\noptions ndots:2\n"
