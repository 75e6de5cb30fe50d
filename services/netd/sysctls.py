"""Pod sysctls: which are safe, and in which pod namespace each one lives.

The kubelet sends `LinuxPodSandboxConfig.sysctls`; pyrio applies the
sysctls Kubernetes documents as safe (namespaced, and unable to affect other
pods or the node) and the namespaced ones the operator allowed in
`runtime.allowed_unsafe_sysctls` (the kubelet's --allowed-unsafe-sysctls),
and refuses every other name with InvalidArgument rather than writing a
node-wide knob by accident.
"""

from __future__ import annotations

from common.errors import InvalidArgument

# Kubernetes' safe set (pkg/kubelet/sysctl/safe_sysctls.go), with the
# namespace each belongs to.
SAFE_SYSCTLS: dict[str, str] = {
    "kernel.shm_rmid_forced": "ipc",
    "net.ipv4.ip_local_port_range": "net",
    "net.ipv4.tcp_syncookies": "net",
    "net.ipv4.ping_group_range": "net",
    "net.ipv4.ip_unprivileged_port_start": "net",
    "net.ipv4.ip_local_reserved_ports": "net",
    "net.ipv4.tcp_keepalive_time": "net",
    "net.ipv4.tcp_fin_timeout": "net",
    "net.ipv4.tcp_keepalive_intvl": "net",
    "net.ipv4.tcp_keepalive_probes": "net",
    "net.ipv4.tcp_rmem": "net",
    "net.ipv4.tcp_wmem": "net",
}


# Prefixes of the sysctls that live in a pod namespace, and which one.
NAMESPACED_PREFIXES: tuple[tuple[str, str], ...] = (
    ("net.", "net"),
    ("kernel.shm", "ipc"),
    ("kernel.msg", "ipc"),
    ("kernel.sem", "ipc"),
    ("fs.mqueue.", "ipc"),
)


def namespace_of(name: str) -> str | None:
    """"net" or "ipc" for a namespaced sysctl, None for a node-wide one."""
    for prefix, kind in NAMESPACED_PREFIXES:
        if name.startswith(prefix):
            return kind
    return None


def _allowed_unsafe(name: str, allowed: list[str]) -> bool:
    for pattern in allowed:
        pattern = normalize(pattern)
        if name == pattern or (pattern.endswith("*") and name.startswith(pattern[:-1])):
            return True
    return False


def normalize(name: str) -> str:
    # The kubelet accepts both "net.ipv4.x" and "net/ipv4/x".
    return name.strip().replace("/", ".")


def validate(
    sysctls: dict[str, str], private_namespaces: set[str], allowed_unsafe: list[str] | None = None
) -> dict[str, str]:
    """The sysctls to write, by normalized name, or InvalidArgument.

    `private_namespaces` holds the kinds ("net", "ipc") the pod gets its own
    namespace of: a safe sysctl of a namespace shared with the node would
    change the node, so it is refused too.
    """
    accepted: dict[str, str] = {}
    for raw_name, value in sorted(sysctls.items()):
        name = normalize(raw_name)
        kind = SAFE_SYSCTLS.get(name)
        if kind is None and _allowed_unsafe(name, allowed_unsafe or []):
            kind = namespace_of(name)
        if kind is None:
            raise InvalidArgument(
                f"sysctl {raw_name!r} is not allowed: pyrio applies the Kubernetes safe sysctls "
                f"({', '.join(sorted(SAFE_SYSCTLS))}) and the namespaced ones listed in "
                "runtime.allowed_unsafe_sysctls"
            )
        if kind not in private_namespaces:
            mode = "hostNetwork" if kind == "net" else "hostIPC"
            raise InvalidArgument(f"sysctl {raw_name!r} cannot be set on a {mode} pod: it would change the node")
        if not isinstance(value, str) or "\n" in value or "\0" in value:
            raise InvalidArgument(f"sysctl {raw_name!r} has an invalid value {value!r}")
        accepted[name] = value
    return accepted
