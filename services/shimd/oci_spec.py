"""The OCI runtime spec of a container, from its CRI config, its sandbox and its image.

Semantics follow CRI-O's server/container_create*.go: command and args merge
with the image's Entrypoint and Cmd the way Kubernetes defines, env is the
image's overridden by the config's, the user comes from run_as_user /
run_as_username / the image's User resolved in the container's own
/etc/passwd and /etc/group, and the pod's namespaces are joined through the
paths netd pinned.

This is the one place where a CRI config becomes an OCI spec (build_spec);
each concern lives in its own module: spec_users (the process user),
spec_security (capabilities, AppArmor, masked paths), spec_seccomp (the
seccomp profile), spec_mounts (mounts, devices, termination log) and
spec_resources (cgroups path; the resources come from the host's
common.cgroups manager).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.cgroups import CgroupManager, manager_for
from common.config import Config
from common.errors import InvalidArgument
from common.runtime_features import handler_features
from services.shimd.spec_mounts import (
    DEFAULT_DEVICE_RULES, cri_mounts, device_entries, host_devices, make_image_volumes, rootfs_propagation,
    standard_mounts, termination_log_path, termination_message_path,
)
from services.shimd.spec_resources import cgroups_path, own_oom_score_adj
from services.shimd.spec_security import (
    DEFAULT_MASKED_PATHS, DEFAULT_READONLY_PATHS, apparmor_profile, capabilities,
)
from services.shimd.spec_seccomp import seccomp_profile
from services.shimd import spec_userns
from services.shimd.spec_users import resolve_user
from services.shimd.spec_validation import validate_process_size

# CRI NamespaceMode.
NAMESPACE_POD, NAMESPACE_CONTAINER, NAMESPACE_NODE, NAMESPACE_TARGET = 0, 1, 2, 3
DEFAULT_PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass
class SpecInputs:
    container_id: str
    config: dict[str, Any]  # CRI ContainerConfig as a dict
    sandbox: dict[str, Any]  # netd's Sandbox record
    sandbox_config: dict[str, Any]  # CRI PodSandboxConfig as a dict
    image_config: dict[str, Any]  # the OCI image config's `config` object
    rootfs: str
    container_dir: Path  # shimd's directory for this container (termination log)
    image_name: str = ""
    image_volumes: list[str] = field(default_factory=list)  # imaged's mounts of the config's image volumes


# --- command and env ----------------------------------------------------------


def process_args(config: dict[str, Any], image_config: dict[str, Any]) -> list[str]:
    """Kubernetes' rule: command replaces the Entrypoint and drops the image
    Cmd; args replace the Cmd."""
    command = list(config.get("command") or [])
    args = list(config.get("args") or [])
    entrypoint = list(image_config.get("Entrypoint") or [])
    image_cmd = list(image_config.get("Cmd") or [])
    if command:
        result = command + args
    elif args:
        result = entrypoint + args
    else:
        result = entrypoint + image_cmd
    if not result:
        raise InvalidArgument("no command specified: the config has no command or args and the image no Entrypoint or Cmd")
    return result


def merge_env(image_env: list[str], config_envs: list[dict[str, Any]]) -> list[str]:
    merged: dict[str, str] = {}
    for entry in image_env:
        key, _, value = entry.partition("=")
        merged[key] = value
    for entry in config_envs:
        merged[entry.get("key", "")] = entry.get("value", "")
    if "PATH" not in merged:
        merged["PATH"] = DEFAULT_PATH_ENV.split("=", 1)[1]
    return [f"{key}={value}" for key, value in merged.items() if key]


# --- the spec ------------------------------------------------------------


def _sandbox_mode(sandbox: dict[str, Any], kind: str) -> str:
    """The pod's mode for a namespace netd manages ("POD" or "NODE")."""
    mode = (sandbox.get("namespace_options") or {}).get(kind, "POD")
    if isinstance(mode, int):
        mode = {NAMESPACE_POD: "POD", NAMESPACE_CONTAINER: "CONTAINER", NAMESPACE_NODE: "NODE"}.get(mode, "POD")
    return str(mode)


def _namespaces(sandbox: dict[str, Any], security: dict[str, Any]) -> list[dict[str, Any]]:
    """Network, IPC and UTS are the pod's (joined through netd's pins, or the
    node's); the PID namespace follows the container's own option."""
    pinned = sandbox.get("namespaces") or {}
    namespaces: list[dict[str, Any]] = [{"type": "mount"}]
    for kind, mode_key in (("network", "network"), ("ipc", "ipc"), ("uts", "network")):
        if _sandbox_mode(sandbox, mode_key) == "NODE":
            continue
        path = pinned.get(kind, "")
        namespaces.append({"type": kind, "path": path} if path else {"type": kind})
    options = security.get("namespace_options") or {}
    pid_mode = int(options.get("pid", NAMESPACE_POD))
    if pid_mode == NAMESPACE_TARGET:
        raise InvalidArgument("PID namespace mode TARGET is not supported by pyrio")
    if pid_mode == NAMESPACE_POD and pinned.get("pid"):
        namespaces.append({"type": "pid", "path": pinned["pid"]})
    elif pid_mode != NAMESPACE_NODE:
        namespaces.append({"type": "pid"})
    return namespaces


def build_spec(config: Config, inputs: SpecInputs, cgroups: CgroupManager | None = None) -> dict[str, Any]:
    cgroups = cgroups or manager_for(config.runtime.cgroup_manager)
    cri = inputs.config
    sandbox = inputs.sandbox
    linux = cri.get("linux") or {}
    security = linux.get("security_context") or {}
    resources = linux.get("resources") or {}
    privileged = bool(security.get("privileged"))
    image_config = inputs.image_config or {}
    if privileged and not ((inputs.sandbox_config.get("linux") or {}).get("security_context") or {}).get("privileged"):
        raise InvalidArgument("a privileged container needs a privileged pod sandbox")

    userns = spec_userns.container_user_namespace(sandbox, security)
    user = resolve_user(inputs.rootfs, security, image_config.get("User", ""))
    env = merge_env(image_config.get("Env") or [], cri.get("envs") or [])
    args = process_args(cri, image_config)
    # The image's Env and Cmd count too: 250,000 image Env entries once made runc create hang 60 s.
    validate_process_size(args, env, "the container's (image and config)")
    if not any(entry.startswith("HOME=") for entry in env):
        env.append(f"HOME={user.home}")
    hostname = sandbox.get("hostname") or (inputs.sandbox_config.get("hostname") or "")
    if hostname and not any(entry.startswith("HOSTNAME=") for entry in env):
        env.append(f"HOSTNAME={hostname}")
    caps = capabilities(config.runtime.default_capabilities, security)
    requested_oom = int(resources.get("oom_score_adj") or 0)
    oom_score_adj = requested_oom
    if config.runtime.restrict_oom_score_adj:
        oom_score_adj = max(requested_oom, own_oom_score_adj())

    process: dict[str, Any] = {
        "terminal": bool(cri.get("tty")),
        "user": {"uid": user.uid, "gid": user.gid, "additionalGids": user.additional_gids},
        "args": args,
        "env": env,
        "cwd": cri.get("working_dir") or image_config.get("WorkingDir") or "/",
        "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
        "noNewPrivileges": bool(security.get("no_new_privs")),
        "oomScoreAdj": oom_score_adj,
    }
    if security.get("apparmor") or security.get("apparmor_profile"):
        profile = apparmor_profile(security)
        if profile:
            process["apparmorProfile"] = profile

    files = sandbox.get("files") or {}
    features = handler_features(config.runtime_handler(sandbox.get("runtime_handler") or "").path)
    user_mounts = cri_mounts(cri, features, inputs.image_volumes)
    user_destinations = {mount["destination"] for mount in user_mounts}
    mounts = [
        mount for mount in standard_mounts(privileged, files.get("shm", ""), config.runtime.shm_size)
        if mount["destination"] not in user_destinations
    ]
    readonly_rootfs = bool(security.get("readonly_rootfs"))
    pod_file_mode = "ro" if readonly_rootfs else "rw"
    for destination, key in (("/etc/resolv.conf", "resolv_conf"), ("/etc/hostname", "hostname"), ("/etc/hosts", "hosts")):
        if files.get(key) and destination not in user_destinations:
            mounts.append({"destination": destination, "type": "bind", "source": files[key],
                           "options": ["rbind", "rprivate", pod_file_mode]})
    termination_path = termination_message_path(cri)
    if termination_path and termination_path not in user_destinations:
        host_file = termination_log_path(inputs.container_dir)
        host_file.touch(mode=0o666, exist_ok=True)
        os.chmod(host_file, 0o666)  # any container user must be able to write it
        mounts.append({"destination": termination_path, "type": "bind", "source": str(host_file),
                       "options": ["rbind", "rprivate", "rw"]})
    mounts.extend(user_mounts)
    # Parents before children, as CRI-O sorts them (the sort is stable).
    mounts.sort(key=lambda mount: len(Path(mount["destination"]).parts))
    make_image_volumes(inputs.rootfs, image_config)

    devices, device_rules = device_entries(cri)
    oci_linux: dict[str, Any] = {
        "namespaces": _namespaces(sandbox, security),
        "cgroupsPath": cgroups_path(config, cgroups, sandbox, inputs.container_id),
        "resources": cgroups.oci_resources(resources),
    }
    propagation = rootfs_propagation(user_mounts)
    if propagation:
        oci_linux["rootfsPropagation"] = propagation
    if privileged:
        oci_linux["resources"]["devices"] = [{"allow": True, "access": "rwm"}]
        oci_linux["devices"] = host_devices()
    else:
        oci_linux["resources"]["devices"] = DEFAULT_DEVICE_RULES + device_rules
        oci_linux["devices"] = devices
        masked = list(security.get("masked_paths") or DEFAULT_MASKED_PATHS)
        readonly = list(security.get("readonly_paths") or DEFAULT_READONLY_PATHS)
        oci_linux["maskedPaths"] = masked
        oci_linux["readonlyPaths"] = readonly
        profile = seccomp_profile(security, caps)
        if profile is not None:
            oci_linux["seccomp"] = profile
    # The pod's sysctls are set by netd in the namespaces it pins, which
    # every container joins: nothing to repeat here.

    metadata = cri.get("metadata") or {}
    sandbox_metadata = sandbox.get("metadata") or {}
    annotations = dict(cri.get("annotations") or {})
    annotations.update({
        "io.kubernetes.cri.container-type": "container",
        "io.kubernetes.cri.container-name": metadata.get("name", ""),
        "io.kubernetes.cri.sandbox-id": sandbox.get("id", ""),
        "io.kubernetes.cri.sandbox-name": sandbox_metadata.get("name", ""),
        "io.kubernetes.cri.sandbox-namespace": sandbox_metadata.get("namespace", ""),
        "io.kubernetes.cri.image-name": inputs.image_name,
    })
    spec: dict[str, Any] = {
        "ociVersion": "1.0.2",
        "process": process,
        "root": {"path": inputs.rootfs, "readonly": readonly_rootfs},
        "mounts": mounts,
        "annotations": annotations,
        "linux": oci_linux,
    }
    if hostname and any(ns["type"] == "uts" and not ns.get("path") for ns in oci_linux["namespaces"]):
        spec["hostname"] = hostname
    if userns is not None:
        # Host volumes get idmapped; an image volume (an overlay, which cannot be) is read-only anyway.
        host_volumes = {mount.get("container_path", "") for mount in cri.get("mounts") or [] if not mount.get("image")}
        spec_userns.apply(spec, sandbox, userns, host_volumes)
    return spec
