"""The OCI runtime spec of a container, from its CRI config, its sandbox and its image.

Semantics follow CRI-O's server/container_create*.go: command and args merge
with the image's Entrypoint and Cmd the way Kubernetes defines, env is the
image's overridden by the config's, the user comes from run_as_user /
run_as_username / the image's User resolved in the container's own
/etc/passwd and /etc/group, and the pod's namespaces are joined through the
paths netd pinned.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.config import Config
from common.errors import InvalidArgument, NotFound

log = logging.getLogger("pyrio.shimd.spec")

SECCOMP_DEFAULT_PROFILE = Path(__file__).with_name("seccomp_default.json")

# CRI enums (cri_api.v1): NamespaceMode and MountPropagation.
NAMESPACE_POD, NAMESPACE_CONTAINER, NAMESPACE_NODE, NAMESPACE_TARGET = 0, 1, 2, 3
PROPAGATION_OPTIONS = {0: "rprivate", 1: "rslave", 2: "rshared"}
SECCOMP_RUNTIME_DEFAULT, SECCOMP_UNCONFINED, SECCOMP_LOCALHOST = 0, 1, 2

ALL_CAPABILITIES = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE", "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_IPC_LOCK", "CAP_IPC_OWNER",
    "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT", "CAP_SYS_PTRACE", "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE", "CAP_SYS_RESOURCE", "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE", "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP", "CAP_MAC_OVERRIDE", "CAP_MAC_ADMIN", "CAP_SYSLOG", "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ", "CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE",
]

DEFAULT_MASKED_PATHS = [
    "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
    "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi",
    "/sys/firmware", "/sys/devices/virtual/powercap",
]
DEFAULT_READONLY_PATHS = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
DEFAULT_PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# The devices every container gets (runc's defaults), as OCI device entries.
DEFAULT_DEVICE_RULES = [
    {"allow": False, "access": "rwm"},
    {"allow": True, "type": "c", "major": 1, "minor": 3, "access": "rwm"},  # null
    {"allow": True, "type": "c", "major": 1, "minor": 5, "access": "rwm"},  # zero
    {"allow": True, "type": "c", "major": 1, "minor": 7, "access": "rwm"},  # full
    {"allow": True, "type": "c", "major": 1, "minor": 8, "access": "rwm"},  # random
    {"allow": True, "type": "c", "major": 1, "minor": 9, "access": "rwm"},  # urandom
    {"allow": True, "type": "c", "major": 5, "minor": 0, "access": "rwm"},  # tty
    {"allow": True, "type": "c", "major": 5, "minor": 2, "access": "rwm"},  # ptmx
    {"allow": True, "type": "c", "major": 136, "access": "rwm"},  # pts
]

CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass
class CgroupLayout:
    """Which cgroup hierarchy runc will use on this host."""

    unified: bool
    controllers: set[str] = field(default_factory=set)
    root: Path = CGROUP_ROOT

    @classmethod
    def detect(cls, root: Path = CGROUP_ROOT) -> "CgroupLayout":
        if (root / "cgroup.controllers").exists():
            return cls(unified=True, controllers=set((root / "cgroup.controllers").read_text().split()), root=root)
        controllers = set()
        if root.is_dir():
            for entry in root.iterdir():
                controllers.update(entry.name.split(","))
        return cls(unified=False, controllers=controllers, root=root)

    def has(self, controller: str) -> bool:
        return controller in self.controllers

    def container_dirs(self, cgroups_path: str) -> dict[str, Path]:
        """controller -> the container's cgroup directory for stats and OOM."""
        relative = cgroups_path.strip("/")
        if self.unified:
            return {name: self.root / relative for name in ("cpu", "memory", "pids", "unified")}
        return {name: self.root / name / relative for name in ("cpu", "cpuacct", "memory", "pids") if self.has(name)}

    def oom_files(self, cgroups_path: str) -> list[str]:
        relative = cgroups_path.strip("/")
        if self.unified:
            return [str(self.root / relative / "memory.events")]
        return [str(self.root / "memory" / relative / "memory.oom_control")]

    def swap_supported(self) -> bool:
        if self.unified:
            return True
        return (self.root / "memory" / "memory.memsw.limit_in_bytes").exists()


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


# --- command, env, user ------------------------------------------------------


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


def _rootfs_file(rootfs: str, path: str) -> Path | None:
    """A file inside the rootfs, without following a symlink out of it."""
    candidate = Path(rootfs) / path.lstrip("/")
    try:
        resolved = candidate.resolve()
    except OSError:
        return None
    root = Path(rootfs).resolve()
    if resolved != root and root not in resolved.parents:
        return None
    return resolved if resolved.is_file() else None


def _read_db(rootfs: str, path: str) -> list[list[str]]:
    found = _rootfs_file(rootfs, path)
    if found is None:
        return []
    rows = []
    for line in found.read_text(errors="replace").splitlines():
        if line and not line.startswith("#"):
            rows.append(line.split(":"))
    return rows


@dataclass
class User:
    uid: int
    gid: int
    additional_gids: list[int]
    home: str
    name: str = ""


def resolve_user(rootfs: str, security: dict[str, Any], image_user: str) -> User:
    passwd = [row for row in _read_db(rootfs, "/etc/passwd") if len(row) >= 7]
    groups = [row for row in _read_db(rootfs, "/etc/group") if len(row) >= 3]

    def by_name(name: str) -> list[str] | None:
        return next((row for row in passwd if row[0] == name), None)

    def by_uid(uid: int) -> list[str] | None:
        return next((row for row in passwd if row[2] == str(uid)), None)

    group_spec = ""
    if "run_as_user" in security:
        uid = int(security["run_as_user"].get("value", 0))
        entry = by_uid(uid)
    elif security.get("run_as_username"):
        name = security["run_as_username"]
        entry = by_name(name)
        if entry is None:
            raise InvalidArgument(f"user {name!r} (run_as_username) is not in the image's /etc/passwd")
        uid = int(entry[2])
    else:
        user_spec, _, group_spec = (image_user or "").partition(":")
        if not user_spec:
            uid, entry = 0, by_uid(0)
        elif user_spec.isdigit():
            uid = int(user_spec)
            entry = by_uid(uid)
        else:
            entry = by_name(user_spec)
            if entry is None:
                raise InvalidArgument(f"user {user_spec!r} (the image's User) is not in the image's /etc/passwd")
            uid = int(entry[2])
    if "run_as_group" in security:
        gid = int(security["run_as_group"].get("value", 0))
    elif group_spec:
        if group_spec.isdigit():
            gid = int(group_spec)
        else:
            row = next((row for row in groups if row[0] == group_spec), None)
            if row is None:
                raise InvalidArgument(f"group {group_spec!r} (the image's User) is not in the image's /etc/group")
            gid = int(row[2])
    else:
        gid = int(entry[3]) if entry is not None and entry[3].isdigit() else 0
    name = entry[0] if entry is not None else ""
    additional: list[int] = []
    if name:
        for row in groups:
            members = row[3].split(",") if len(row) > 3 else []
            if name in members and row[2].isdigit():
                additional.append(int(row[2]))
    for extra in security.get("supplemental_groups") or []:
        additional.append(int(extra))
    unique = []
    for group_id in [gid, *additional]:
        if group_id not in unique:
            unique.append(group_id)
    home = entry[5] if entry is not None and entry[5] else "/"
    return User(uid=uid, gid=gid, additional_gids=unique, home=home, name=name)


# --- capabilities and seccomp --------------------------------------------------


def host_capabilities() -> list[str]:
    """The capabilities this process may hand on (its bounding set): a
    privileged container gets all of them, not ones the node itself lacks
    (runc fails to apply a capability outside its own bounding set)."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("CapBnd:"):
                    mask = int(line.split()[1], 16)
                    return [cap for bit, cap in enumerate(ALL_CAPABILITIES) if mask & (1 << bit)]
    except (OSError, ValueError):
        pass
    return list(ALL_CAPABILITIES)


def _cap_name(name: str) -> str:
    upper = name.upper()
    return upper if upper.startswith("CAP_") else f"CAP_{upper}"


def capabilities(default: list[str], security: dict[str, Any]) -> list[str]:
    if security.get("privileged"):
        return host_capabilities()
    requested = security.get("capabilities") or {}
    add = [_cap_name(cap) for cap in requested.get("add_capabilities") or []]
    drop = [_cap_name(cap) for cap in requested.get("drop_capabilities") or []]
    for cap in add + drop:
        if cap != "CAP_ALL" and cap not in ALL_CAPABILITIES:
            raise InvalidArgument(f"unknown capability {cap!r}")
    caps = [_cap_name(cap) for cap in default]
    # CRI-O's order: add ALL, drop ALL, then the named ones.
    if "CAP_ALL" in add:
        caps = host_capabilities()
    if "CAP_ALL" in drop:
        caps = []
    for cap in add:
        if cap != "CAP_ALL" and cap not in caps:
            caps.append(cap)
    caps = [cap for cap in caps if cap not in drop]
    return caps


def seccomp_profile(security: dict[str, Any], caps: list[str]) -> dict[str, Any] | None:
    if security.get("privileged"):
        return None
    profile = security.get("seccomp")
    if profile is not None:
        kind = int(profile.get("profile_type", SECCOMP_RUNTIME_DEFAULT))
        localhost = profile.get("localhost_ref", "")
    else:
        legacy = security.get("seccomp_profile_path", "")
        if legacy in ("", "runtime/default", "docker/default"):
            kind, localhost = SECCOMP_RUNTIME_DEFAULT, ""
        elif legacy == "unconfined":
            kind, localhost = SECCOMP_UNCONFINED, ""
        elif legacy.startswith("localhost/"):
            kind, localhost = SECCOMP_LOCALHOST, legacy[len("localhost/") :]
        else:
            raise InvalidArgument(f"unknown seccomp profile {legacy!r}")
    if kind == SECCOMP_UNCONFINED:
        return None
    if kind == SECCOMP_LOCALHOST:
        if not localhost or not os.path.isabs(localhost):
            raise InvalidArgument(f"seccomp Localhost profile needs an absolute path, got {localhost!r}")
        try:
            raw = json.loads(Path(localhost).read_text())
        except FileNotFoundError:
            raise NotFound(f"seccomp profile {localhost} does not exist") from None
        except ValueError as exc:
            raise InvalidArgument(f"seccomp profile {localhost} is not valid JSON: {exc}") from None
    else:
        raw = json.loads(SECCOMP_DEFAULT_PROFILE.read_text())
    return _profile_for(raw, caps)


def _profile_for(raw: dict[str, Any], caps: list[str]) -> dict[str, Any]:
    """An OCI seccomp object from a moby-style profile, for this container's caps."""
    syscalls = []
    for rule in raw.get("syscalls") or []:
        excluded = (rule.get("excludes") or {}).get("caps") or []
        included = (rule.get("includes") or {}).get("caps") or []
        if excluded and any(cap in caps for cap in excluded):
            continue
        if included and not all(cap in caps for cap in included):
            continue
        names = rule.get("names") or ([rule["name"]] if rule.get("name") else [])
        entry: dict[str, Any] = {"names": names, "action": rule["action"]}
        for key in ("args", "errnoRet"):
            if key in rule:
                entry[key] = rule[key]
        syscalls.append(entry)
    result: dict[str, Any] = {"defaultAction": raw.get("defaultAction", "SCMP_ACT_ERRNO"), "syscalls": syscalls}
    architectures = list(raw.get("architectures") or [])
    for arch_map in raw.get("archMap") or []:
        architectures.append(arch_map["architecture"])
        architectures.extend(arch_map.get("subArchitectures") or [])
    if architectures:
        result["architectures"] = architectures
    if "defaultErrnoRet" in raw:
        result["defaultErrnoRet"] = raw["defaultErrnoRet"]
    return result


# --- mounts and devices -----------------------------------------------------------


def _standard_mounts(privileged: bool, shm_path: str, shm_size: int) -> list[dict[str, Any]]:
    sys_options = ["nosuid", "noexec", "nodev", "rw" if privileged else "ro"]
    mounts = [
        {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": sys_options},
        {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
         "options": ["nosuid", "noexec", "nodev", "relatime", "rw" if privileged else "ro"]},
    ]
    if shm_path:
        mounts.append({"destination": "/dev/shm", "type": "bind", "source": shm_path, "options": ["rbind", "rprivate", "rw"]})
    else:
        mounts.append({"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
                       "options": ["nosuid", "noexec", "nodev", "mode=1777", f"size={shm_size}"]})
    return mounts


def cri_mounts(config: dict[str, Any]) -> list[dict[str, Any]]:
    mounts = []
    for mount in config.get("mounts") or []:
        destination = mount.get("container_path", "")
        source = mount.get("host_path", "")
        if not destination or not os.path.isabs(destination):
            raise InvalidArgument(f"mount container_path must be an absolute path, got {destination!r}")
        if not source or not os.path.isabs(source):
            raise InvalidArgument(f"mount host_path must be an absolute path, got {source!r}")
        if not os.path.exists(source):
            # As CRI-O does: a missing hostPath directory is created.
            try:
                os.makedirs(source, exist_ok=True)
            except OSError as exc:
                raise InvalidArgument(f"mount host_path {source} does not exist and cannot be created: {exc}") from None
        propagation = int(mount.get("propagation", 0))
        if propagation not in PROPAGATION_OPTIONS:
            raise InvalidArgument(f"unknown mount propagation {propagation}")
        options = ["rbind", PROPAGATION_OPTIONS[propagation], "ro" if mount.get("readonly") else "rw"]
        mounts.append({"destination": destination, "type": "bind", "source": os.path.realpath(source), "options": options})
    return mounts


def device_entries(config: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(linux.devices, resources.devices rules) for the config's Device entries."""
    devices, rules = [], []
    for device in config.get("devices") or []:
        host_path = device.get("host_path", "")
        container_path = device.get("container_path", "") or host_path
        permissions = device.get("permissions", "") or "rwm"
        try:
            info = os.stat(host_path)
        except OSError as exc:
            raise InvalidArgument(f"device {host_path!r}: {exc.strerror}") from None
        if stat.S_ISCHR(info.st_mode):
            kind = "c"
        elif stat.S_ISBLK(info.st_mode):
            kind = "b"
        else:
            raise InvalidArgument(f"{host_path} is not a device")
        major, minor = os.major(info.st_rdev), os.minor(info.st_rdev)
        devices.append({"path": container_path, "type": kind, "major": major, "minor": minor,
                        "fileMode": stat.S_IMODE(info.st_mode), "uid": info.st_uid, "gid": info.st_gid})
        rules.append({"allow": True, "type": kind, "major": major, "minor": minor, "access": permissions})
    return devices, rules


def host_devices() -> list[dict[str, Any]]:
    """Every device node of the host's /dev, for privileged containers."""
    devices = []
    for directory, subdirs, files in os.walk("/dev"):
        subdirs[:] = [name for name in subdirs if name not in ("pts", "shm", "mqueue", "fd")]
        for name in files:
            path = os.path.join(directory, name)
            try:
                info = os.lstat(path)
            except OSError:
                continue
            if stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode):
                if path in ("/dev/console", "/dev/ptmx", "/dev/tty"):
                    continue
                devices.append({"path": path, "type": "c" if stat.S_ISCHR(info.st_mode) else "b",
                                "major": os.major(info.st_rdev), "minor": os.minor(info.st_rdev),
                                "fileMode": stat.S_IMODE(info.st_mode), "uid": info.st_uid, "gid": info.st_gid})
    return devices


# --- resources --------------------------------------------------------------------------


def own_oom_score_adj() -> int:
    try:
        return int(Path("/proc/self/oom_score_adj").read_text())
    except (OSError, ValueError):
        return 0


def oci_resources(resources: dict[str, Any], layout: CgroupLayout) -> dict[str, Any]:
    """linux.resources from CRI LinuxContainerResources (also used by UpdateContainerResources)."""
    result: dict[str, Any] = {}
    cpu: dict[str, Any] = {}
    if resources.get("cpu_shares"):
        cpu["shares"] = int(resources["cpu_shares"])
    if resources.get("cpu_quota"):
        cpu["quota"] = int(resources["cpu_quota"])
    if resources.get("cpu_period"):
        cpu["period"] = int(resources["cpu_period"])
    if resources.get("cpuset_cpus"):
        cpu["cpus"] = resources["cpuset_cpus"]
    if resources.get("cpuset_mems"):
        cpu["mems"] = resources["cpuset_mems"]
    if cpu:
        result["cpu"] = cpu
    memory: dict[str, Any] = {}
    limit = int(resources.get("memory_limit_in_bytes") or 0)
    if limit > 0:
        memory["limit"] = limit
        if layout.swap_supported():
            swap = int(resources.get("memory_swap_limit_in_bytes") or 0)
            # No swap beyond the memory limit unless the kubelet asks for it.
            memory["swap"] = swap if swap > 0 else limit
    if memory:
        result["memory"] = memory
    hugepages = resources.get("hugepage_limits") or []
    if hugepages:
        if layout.has("hugetlb"):
            result["hugepageLimits"] = [
                {"pageSize": entry.get("page_size", ""), "limit": int(entry.get("limit", 0))} for entry in hugepages
            ]
        else:
            log.info("dropping hugepage limits: no hugetlb cgroup controller on this host",
                     extra={"hugepage_limits": hugepages})
    unified = resources.get("unified") or {}
    if unified:
        if layout.unified:
            result["unified"] = dict(unified)
        else:
            raise InvalidArgument("unified cgroup resources need a cgroup v2 host; this host uses cgroup v1")
    return result


def cgroups_path(config: Config, sandbox: dict[str, Any], container_id: str) -> str:
    parent = sandbox.get("cgroup_parent") or config.runtime.cgroup_parent
    return f"{parent.rstrip('/')}/pyrio-{container_id}"


# --- the spec -----------------------------------------------------------------------------


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
    userns = options.get("userns_options")
    if userns is not None and int(userns.get("mode", NAMESPACE_POD)) != NAMESPACE_NODE:
        raise InvalidArgument("user namespaces are not supported by pyrio: use the node's (mode NODE)")
    return namespaces


def termination_log_path(container_dir: Path) -> Path:
    return container_dir / "termination-log"


def build_spec(config: Config, inputs: SpecInputs, layout: CgroupLayout | None = None) -> dict[str, Any]:
    layout = layout or CgroupLayout.detect()
    cri = inputs.config
    sandbox = inputs.sandbox
    linux = cri.get("linux") or {}
    security = linux.get("security_context") or {}
    resources = linux.get("resources") or {}
    privileged = bool(security.get("privileged"))
    image_config = inputs.image_config or {}
    if privileged and not ((inputs.sandbox_config.get("linux") or {}).get("security_context") or {}).get("privileged"):
        raise InvalidArgument("a privileged container needs a privileged pod sandbox")

    user = resolve_user(inputs.rootfs, security, image_config.get("User", ""))
    env = merge_env(image_config.get("Env") or [], cri.get("envs") or [])
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
        "args": process_args(cri, image_config),
        "env": env,
        "cwd": cri.get("working_dir") or image_config.get("WorkingDir") or "/",
        "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
        "noNewPrivileges": bool(security.get("no_new_privs")),
        "oomScoreAdj": oom_score_adj,
    }
    if security.get("apparmor") or security.get("apparmor_profile"):
        profile = _apparmor_profile(security)
        if profile:
            process["apparmorProfile"] = profile

    files = sandbox.get("files") or {}
    user_mounts = cri_mounts(cri)
    user_destinations = {mount["destination"] for mount in user_mounts}
    mounts = [
        mount for mount in _standard_mounts(privileged, files.get("shm", ""), config.runtime.shm_size)
        if mount["destination"] not in user_destinations
    ]
    readonly_rootfs = bool(security.get("readonly_rootfs"))
    pod_file_mode = "ro" if readonly_rootfs else "rw"
    for destination, key in (("/etc/resolv.conf", "resolv_conf"), ("/etc/hostname", "hostname"), ("/etc/hosts", "hosts")):
        if files.get(key) and destination not in user_destinations:
            mounts.append({"destination": destination, "type": "bind", "source": files[key],
                           "options": ["rbind", "rprivate", pod_file_mode]})
    termination_path = _termination_message_path(cri)
    if termination_path and termination_path not in user_destinations:
        host_file = termination_log_path(inputs.container_dir)
        host_file.touch(mode=0o666, exist_ok=True)
        os.chmod(host_file, 0o666)  # any container user must be able to write it
        mounts.append({"destination": termination_path, "type": "bind", "source": str(host_file),
                       "options": ["rbind", "rprivate", "rw"]})
    mounts.extend(user_mounts)
    # Parents before children, as CRI-O sorts them (the sort is stable).
    mounts.sort(key=lambda mount: len(Path(mount["destination"]).parts))
    _make_image_volumes(inputs.rootfs, image_config)

    devices, device_rules = device_entries(cri)
    oci_linux: dict[str, Any] = {
        "namespaces": _namespaces(sandbox, security),
        "cgroupsPath": cgroups_path(config, sandbox, inputs.container_id),
        "resources": {**oci_resources(resources, layout)},
    }
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
    return spec


def termination_message_source(cri: dict[str, Any], container_dir: Path) -> Path | None:
    """The host file holding the termination message: the kubelet's own mount
    at terminationMessagePath when it made one, else the file pyrio mounted."""
    path = _termination_message_path(cri)
    if not path:
        return None
    for mount in cri.get("mounts") or []:
        if mount.get("container_path") == path:
            return Path(mount.get("host_path", ""))
    return termination_log_path(container_dir)


def _termination_message_path(cri: dict[str, Any]) -> str:
    # The kubelet passes it as an annotation; CRI-O reads the same one.
    path = (cri.get("annotations") or {}).get("io.kubernetes.container.terminationMessagePath", "")
    return path if path and os.path.isabs(path) else ""


def _apparmor_profile(security: dict[str, Any]) -> str:
    enabled = Path("/sys/module/apparmor/parameters/enabled")
    try:
        if enabled.read_text().strip() != "Y":
            return ""
    except OSError:
        return ""
    profile = security.get("apparmor") or {}
    if profile:
        kind = int(profile.get("profile_type", 0))
        if kind == SECCOMP_UNCONFINED:
            return "unconfined"
        if kind == SECCOMP_LOCALHOST:
            return profile.get("localhost_ref", "")
        return ""
    legacy = security.get("apparmor_profile", "")
    return legacy[len("localhost/") :] if legacy.startswith("localhost/") else ("unconfined" if legacy == "unconfined" else "")


def _make_image_volumes(rootfs: str, image_config: dict[str, Any]) -> None:
    # CRI-O's default image_volumes=mkdir: the image's VOLUMEs are plain
    # directories in the writable layer.
    for volume in (image_config.get("Volumes") or {}):
        target = Path(rootfs) / volume.lstrip("/")
        try:
            resolved = target.resolve()
            if Path(rootfs).resolve() in resolved.parents:
                resolved.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            log.warning("cannot create image volume", extra={"volume": volume, "error": str(exc)})
