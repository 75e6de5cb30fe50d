"""Pod sysctls: which can be applied, in which pod namespace, at which path.

The kubelet is the policy point (its --allowed-unsafe-sysctls, and the
safe set it always allows): like containerd and CRI-O, pyrio applies every
namespaced sysctl the kubelet sends (net.*, kernel.shm*, kernel.msg*,
kernel.sem, fs.mqueue.*) in the pod's own namespaces, and refuses with
InvalidArgument only a sysctl that is not namespaced (it would change the
node), or whose namespace the pod shares with the node (net.* on a
hostNetwork pod, the IPC ones on a hostIPC pod).
`runtime.allowed_unsafe_sysctls` is an optional extra restriction of the
node's operator: by default ["*"], no restriction; otherwise the safe set
and the names or prefixes it lists.

Names: the kubelet normalizes a pod's sysctl names to the dotted form, in
which a "/" stands for a dot inside one component (an interface name such
as "eno2.100": `net.ipv4.conf.eno2/100.rp_filter`); a name that starts in
the slash form (`net/ipv4/conf/eno2.100/rp_filter`) is normalized the same
way. A component that is empty, "." or "..", and a name or value with a
newline or NUL, are refused: they could only point outside the sysctl.
"""

from __future__ import annotations

from common.errors import InvalidArgument

PROC_SYS = "/proc/sys/"

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

# Prefixes of the sysctls that live in a pod namespace, and which one
# (the kubelet's and runc's lists).
NAMESPACED_PREFIXES: tuple[tuple[str, str], ...] = (
    ("net.", "net"),
    ("kernel.shm", "ipc"),
    ("kernel.msg", "ipc"),
    ("kernel.sem", "ipc"),
    ("fs.mqueue.", "ipc"),
)

NAMESPACE_MODE = {"net": "hostNetwork", "ipc": "hostIPC"}


def namespace_of(name: str) -> str | None:
    """"net" or "ipc" for a namespaced sysctl, None for a node-wide one."""
    for prefix, kind in NAMESPACED_PREFIXES:
        if name.startswith(prefix):
            return kind
    return None


def normalize(name: str) -> str:
    """The dotted form of a sysctl name, as the kubelet's NormalizeName:
    a name whose first separator is "/" has its dots and slashes swapped."""
    first = min((index for index in (name.find("."), name.find("/")) if index >= 0), default=-1)
    if first < 0 or name[first] == ".":
        return name
    return name.translate(str.maketrans("./", "/."))


def proc_path(name: str) -> str:
    """/proc/sys path of a dotted sysctl name; InvalidArgument if it could point elsewhere."""
    components = [component.replace("/", ".") for component in name.split(".")]
    if any(component in ("", ".", "..") for component in components) or any(
        char.isspace() or char == "\0" for char in name
    ):
        raise InvalidArgument(
            f"sysctl name {name!r} is malformed: it needs dot-separated components, none empty, "
            "'.' or '..', and no whitespace or NUL"
        )
    return PROC_SYS + "/".join(components)


def _allowed_unsafe(name: str, allowed: list[str]) -> bool:
    for pattern in allowed:
        pattern = normalize(pattern.strip())
        if name == pattern or (pattern.endswith("*") and name.startswith(pattern[:-1])):
            return True
    return False


def validate(
    sysctls: dict[str, str], private_namespaces: set[str], allowed_unsafe: list[str] | None = None
) -> dict[str, str]:
    """The sysctls to write, by normalized name, or InvalidArgument.

    `private_namespaces` holds the kinds ("net", "ipc") the pod gets its own
    namespace of. `allowed_unsafe` None means no extra restriction.
    """
    accepted: dict[str, str] = {}
    for raw_name, value in sorted(sysctls.items()):
        name = normalize(raw_name)
        proc_path(name)
        kind = namespace_of(name)
        if kind is None:
            raise InvalidArgument(
                f"sysctl {raw_name!r} is not namespaced: setting it in a pod would change the node "
                "(pods may set net.*, kernel.shm*, kernel.msg*, kernel.sem and fs.mqueue.*)"
            )
        if allowed_unsafe is not None and name not in SAFE_SYSCTLS and not _allowed_unsafe(name, allowed_unsafe):
            raise InvalidArgument(
                f"sysctl {raw_name!r} is not allowed on this node: runtime.allowed_unsafe_sysctls "
                f"is {allowed_unsafe} (beyond Kubernetes' safe set)"
            )
        if kind not in private_namespaces:
            raise InvalidArgument(
                f"sysctl {raw_name!r} cannot be set on a {NAMESPACE_MODE[kind]} pod: it would change the node"
            )
        if not isinstance(value, str) or "\n" in value or "\0" in value:
            raise InvalidArgument(f"sysctl {raw_name!r} has an invalid value {value!r}: no newline or NUL")
        accepted[name] = value
    return accepted
