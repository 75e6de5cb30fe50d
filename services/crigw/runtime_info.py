"""Version, Status and RuntimeConfig: what the kubelet asks about the runtime itself."""

from __future__ import annotations

import json

from cri_api.v1 import api_pb2

import pyrio
from common.runtime_features import handler_features
from services.crigw.gateway import Gateway
from services.crigw.handlers import cri_handler

CRI_API_VERSION = "v1"


@cri_handler("Version")
def version(gateway: Gateway, request: api_pb2.VersionRequest) -> api_pb2.VersionResponse:
    return api_pb2.VersionResponse(
        version="0.1.0",
        runtime_name="pyrio",
        runtime_version=pyrio.__version__,
        runtime_api_version=CRI_API_VERSION,
    )


def _condition(kind: str, answers: list[dict], reason_if_not: str) -> api_pb2.RuntimeCondition:
    problems = [answer.get("reason") or f"{answer.get('service')} is not ready" for answer in answers if not answer.get("ready")]
    if not problems:
        return api_pb2.RuntimeCondition(type=kind, status=True)
    return api_pb2.RuntimeCondition(type=kind, status=False, reason=reason_if_not, message="; ".join(problems))


def _runtime_handler(gateway: Gateway, name: str) -> api_pb2.RuntimeHandler:
    """A handler with the features its runtime and this kernel really have."""
    features = handler_features(gateway.config.runtime_handler(name).path)
    return api_pb2.RuntimeHandler(name=name, features=api_pb2.RuntimeHandlerFeatures(
        recursive_read_only_mounts=features.recursive_read_only_mounts,
        user_namespaces=features.user_namespaces,
    ))


@cri_handler("Status")
def status(gateway: Gateway, request: api_pb2.StatusRequest) -> api_pb2.StatusResponse:
    health = gateway.health_of_daemons()
    runtime_ready = _condition("RuntimeReady", [health["shimd"], health["imaged"]], "RuntimeDaemonsNotReady")
    netd = health["netd"]
    # netd answers for both its own liveness and the CNI configuration.
    network_answer = dict(netd)
    if netd.get("ready") and not netd.get("network_ready", False):
        network_answer = {"ready": False, "reason": netd.get("network_reason") or "no valid CNI configuration"}
    network_ready = _condition("NetworkReady", [network_answer], "NetworkPluginNotReady")
    response = api_pb2.StatusResponse(
        status=api_pb2.RuntimeStatus(conditions=[runtime_ready, network_ready]),
        runtime_handlers=[_runtime_handler(gateway, name) for name in ["", *sorted(gateway.config.runtime.runtimes)]],
        # Strict is applied by shimd and ContainerStatus reports user.linux.
        features=api_pb2.RuntimeFeatures(supplemental_groups_policy=True),
    )
    if request.verbose:
        for service, answer in health.items():
            response.info[service] = json.dumps(answer, sort_keys=True, default=str)
    return response


@cri_handler("RuntimeConfig")
def runtime_config(gateway: Gateway, request: api_pb2.RuntimeConfigRequest) -> api_pb2.RuntimeConfigResponse:
    # The kubelet (1.28+) takes its cgroup driver from this answer.
    driver = api_pb2.SYSTEMD if gateway.config.runtime.cgroup_manager == "systemd" else api_pb2.CGROUPFS
    return api_pb2.RuntimeConfigResponse(linux=api_pb2.LinuxRuntimeConfiguration(cgroup_driver=driver))


@cri_handler("UpdateRuntimeConfig")
def update_runtime_config(
    gateway: Gateway, request: api_pb2.UpdateRuntimeConfigRequest
) -> api_pb2.UpdateRuntimeConfigResponse:
    # The kubelet sends the pod CIDR here; pyrio takes pod addressing from the
    # CNI configuration (as CRI-O does), so there is nothing to apply.
    return api_pb2.UpdateRuntimeConfigResponse()
