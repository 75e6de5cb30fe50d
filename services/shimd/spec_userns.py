"""The user namespace side of a container's spec (a pod with hostUsers: false).

The container joins the pod's user namespace, which netd created and pinned
(the pod's network, IPC and UTS namespaces are inside it), with the pod's
mappings; its volumes get the runtime's `idmap` option (crun's idmapped
mounts), so files of the host's uid 0 are root's inside. Its root filesystem
and every bind source are staged by userns_staging.
"""

from __future__ import annotations

from typing import Any

from common.errors import InvalidArgument
from common.userns import host_id, oci_mappings, user_namespace_options


def container_user_namespace(sandbox: dict[str, Any], security: dict[str, Any]) -> dict[str, Any] | None:
    """The pod's user namespace when it has one; the container must ask for the same."""
    pod = sandbox.get("userns") or None
    mine = user_namespace_options(security)
    if pod is None and mine is None:
        return None
    if pod is None:
        raise InvalidArgument("the container asks for a user namespace (userns_options mode POD) but its pod uses the node's")
    if mine is None:
        raise InvalidArgument("the pod has its own user namespace but the container's userns_options ask for the node's")
    if mine != pod:
        raise InvalidArgument(f"the container's userns_options mappings {mine} differ from its pod's {pod}")
    return pod


def apply(spec: dict[str, Any], sandbox: dict[str, Any], userns: dict[str, Any], volume_destinations: set[str]) -> None:
    """Join the pod's user namespace, with its mappings, and idmap the volumes."""
    linux = spec["linux"]
    linux["namespaces"].insert(0, {"type": "user", "path": (sandbox.get("namespaces") or {}).get("user", "")})
    linux["uidMappings"] = oci_mappings(userns["uids"])
    linux["gidMappings"] = oci_mappings(userns["gids"])
    for mount in spec["mounts"]:
        if mount["destination"] in volume_destinations and mount.get("type") == "bind":
            mount["options"] = [*mount["options"], "idmap"]


def rootfs_idmap(sandbox: dict[str, Any]) -> dict[str, Any]:
    """What imaged needs to make a user-namespaced pod's container rootfs ({} for other pods):
    the pinned user namespace its layers are idmapped with and the host ids of the pod's root."""
    userns = sandbox.get("userns")
    if not userns:
        return {}
    return {"idmap_userns": (sandbox.get("namespaces") or {}).get("user", ""),
            "idmap_root": [host_id(userns["uids"], 0), host_id(userns["gids"], 0)]}
