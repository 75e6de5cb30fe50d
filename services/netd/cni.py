"""CNI 1.0 plugin execution: ADD, CHECK and DEL of a pod's attachment.

Each plugin of the conflist is executed as the spec says: the network config
on stdin (with `name`, `cniVersion`, `prevResult` and the `runtimeConfig` of
the capabilities it declares), the standard CNI_* environment, a JSON result
or error on stdout. What the attachment was made with (the whole conflist,
netns, ifname, args, runtime config) is cached in the state dir *before* ADD
and the result after it, so DEL tears down with the same config after any
restart or config change, as libcni's cache does.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from pathlib import Path
from typing import Any

from common import mounts
from common.config import Config
from common.errors import Internal
from common.state import atomic_write_json, read_json, remove_file, remove_stale_temp_files
from services.netd.cni_config import NetworkConfig, find_plugin

log = logging.getLogger("pyrio.netd.cni")

IFNAME = "eth0"
PLUGIN_TIMEOUT_SECONDS = 120.0
PROTOCOL_NAMES = {0: "tcp", 1: "udp", 2: "sctp"}


class CniPluginError(Internal):
    """A plugin failed; the message carries its own words verbatim."""


def cni_args(metadata: dict[str, Any], sandbox_id: str) -> str:
    pairs = [
        ("IgnoreUnknown", "1"),
        ("K8S_POD_NAMESPACE", metadata.get("namespace", "")),
        ("K8S_POD_NAME", metadata.get("name", "")),
        ("K8S_POD_INFRA_CONTAINER_ID", sandbox_id),
        ("K8S_POD_UID", metadata.get("uid", "")),
    ]
    return ";".join(f"{key}={value}" for key, value in pairs)


def runtime_config(port_mappings: list[dict[str, Any]], dns_config: dict[str, Any] | None) -> dict[str, Any]:
    """The values of the CNI capabilities pyrio provides, by capability name."""
    mappings = []
    for mapping in port_mappings:
        # Only ports published on the node are the portmap plugin's business.
        if not mapping.get("host_port"):
            continue
        entry = {
            "hostPort": int(mapping["host_port"]),
            "containerPort": int(mapping.get("container_port", 0)),
            "protocol": PROTOCOL_NAMES.get(int(mapping.get("protocol", 0)), "tcp"),
        }
        if mapping.get("host_ip"):
            entry["hostIP"] = mapping["host_ip"]
        mappings.append(entry)
    dns = dns_config or {}
    return {
        "portMappings": mappings,
        "dns": {
            "servers": list(dns.get("servers", [])),
            "searches": list(dns.get("searches", [])),
            "options": list(dns.get("options", [])),
        },
    }


def _version_tuple(version: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in version.split("."))
    except ValueError:
        return (0,)


def pod_ips(result: dict[str, Any] | None) -> list[str]:
    """Addresses of the pod's interfaces in a CNI result, IPv4 first."""
    if not result:
        return []
    addresses: list[str] = []
    if "ips" in result:
        interfaces = result.get("interfaces") or []
        for entry in result["ips"]:
            index = entry.get("interface")
            if index is not None and 0 <= index < len(interfaces) and not interfaces[index].get("sandbox"):
                continue  # a host-side address (the bridge), not the pod's
            address = str(entry.get("address", "")).split("/")[0]
            if address:
                addresses.append(address)
    else:  # CNI 0.1/0.2 results
        for key in ("ip4", "ip6"):
            address = str((result.get(key) or {}).get("ip", "")).split("/")[0]
            if address:
                addresses.append(address)
    return sorted(addresses, key=lambda address: ":" in address)


class CniRunner:
    def __init__(self, config: Config, cache_dir: Path) -> None:
        self.config = config
        self.cache_dir = cache_dir
        # A netd killed mid-write leaves the temp file of the atomic write.
        remove_stale_temp_files(cache_dir)

    def cache_path(self, sandbox_id: str) -> Path:
        return self.cache_dir / f"{sandbox_id}.json"

    def cached(self, sandbox_id: str) -> dict[str, Any] | None:
        return read_json(self.cache_path(sandbox_id))

    # --- plugin execution ----------------------------------------------------

    def _exec(self, command: str, plugin: dict[str, Any], entry: dict[str, Any], prev_result: Any) -> Any:
        network = entry["network"]
        plugin_type = plugin["type"]
        path = find_plugin(plugin_type, self.config.network.cni_plugin_dirs)
        what = f'plugin type="{plugin_type}" name="{network["name"]}" failed ({command.lower()})'
        if path is None:
            raise CniPluginError(f"{what}: plugin not found in {', '.join(self.config.network.cni_plugin_dirs)}")
        stdin = dict(plugin)
        stdin["name"] = network["name"]
        stdin["cniVersion"] = network.get("cniVersion", "")
        capabilities = {name for name, enabled in (plugin.get("capabilities") or {}).items() if enabled}
        runtime = {name: value for name, value in entry["runtime_config"].items() if name in capabilities}
        if runtime:
            stdin["runtimeConfig"] = runtime
        if prev_result is not None:
            stdin["prevResult"] = prev_result
        env = dict(os.environ)
        env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        env.update(
            CNI_COMMAND=command,
            CNI_CONTAINERID=entry["container_id"],
            CNI_NETNS=entry["netns"],
            CNI_IFNAME=entry["ifname"],
            CNI_ARGS=entry["args"],
            CNI_PATH=os.pathsep.join(self.config.network.cni_plugin_dirs),
        )
        try:
            completed = subprocess.run(
                [path],
                input=json.dumps(stdin).encode(),
                env=env,
                capture_output=True,
                timeout=PLUGIN_TIMEOUT_SECONDS,
                close_fds=True,
            )
        except subprocess.TimeoutExpired:
            raise CniPluginError(f"{what}: no answer within {PLUGIN_TIMEOUT_SECONDS:.0f}s") from None
        except OSError as exc:
            raise CniPluginError(f"{what}: cannot execute {path}: {exc}") from None
        stdout = completed.stdout.decode(errors="replace").strip()
        if completed.returncode != 0:
            raise CniPluginError(f"{what}: {self._error_text(stdout, completed.stderr)}")
        if not stdout:
            return None
        try:
            return json.loads(stdout)
        except ValueError:
            raise CniPluginError(f"{what}: result is not JSON: {stdout[:500]}") from None

    @staticmethod
    def _error_text(stdout: str, stderr: bytes) -> str:
        # The spec's error object is {"code", "msg", "details"}; pass the
        # plugin's words on unchanged.
        try:
            error = json.loads(stdout)
        except ValueError:
            error = None
        if isinstance(error, dict) and error.get("msg"):
            text = str(error["msg"])
            if error.get("details"):
                text += f": {error['details']}"
            return text
        return stdout or stderr.decode(errors="replace").strip() or "no error message"

    # --- operations ----------------------------------------------------------

    def add(
        self,
        sandbox_id: str,
        network: NetworkConfig,
        netns: str,
        metadata: dict[str, Any],
        port_mappings: list[dict[str, Any]],
        dns_config: dict[str, Any] | None,
    ) -> dict[str, Any]:
        """Attach the pod; returns the final CNI result.

        The cache entry is written before the first plugin runs, so a crash
        during ADD leaves what DEL needs. On a plugin error the caller runs
        `delete`, which the spec requires to clean up a partial ADD.
        """
        entry = {
            "container_id": sandbox_id,
            "network": network.conflist,
            "netns": netns,
            "ifname": IFNAME,
            "args": cni_args(metadata, sandbox_id),
            "runtime_config": runtime_config(port_mappings, dns_config),
            "result": None,
        }
        atomic_write_json(self.cache_path(sandbox_id), entry)
        result: Any = None
        for plugin in network.plugins:
            result = self._exec("ADD", plugin, entry, result)
        entry["result"] = result
        atomic_write_json(self.cache_path(sandbox_id), entry)
        return result or {}

    def check(self, sandbox_id: str) -> None:
        entry = self.cached(sandbox_id)
        if entry is None:
            raise CniPluginError(f"sandbox {sandbox_id} has no CNI attachment to check")
        network = entry["network"]
        if network.get("disableCheck") or _version_tuple(network.get("cniVersion", "")) < (0, 4, 0):
            return
        for plugin in network["plugins"]:
            self._exec("CHECK", plugin, entry, entry.get("result"))

    def delete(self, sandbox_id: str) -> bool:
        """Detach the pod with its cached config; False when nothing was attached.

        Every plugin gets DEL (in reverse order) even when an earlier one
        failed, so one broken plugin does not leak the others' resources; the
        first error is raised afterwards and the cache kept for a retry.
        """
        entry = self.cached(sandbox_id)
        if entry is None:
            return False
        netns = entry["netns"]
        if netns and not mounts.is_mount_point(netns):
            # The namespace is already gone (a crash before the pin, or a
            # reboot): plugins then release what they hold outside it.
            entry = dict(entry, netns="")
        first_error: CniPluginError | None = None
        for plugin in reversed(entry["network"]["plugins"]):
            try:
                self._exec("DEL", plugin, entry, entry.get("result"))
            except CniPluginError as exc:
                log.warning("CNI DEL failed", extra={"sandbox_id": sandbox_id, "error": str(exc)})
                first_error = first_error or exc
        if first_error is not None:
            raise first_error
        remove_file(self.cache_path(sandbox_id))
        return True
