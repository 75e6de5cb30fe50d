"""pyrio configuration: one TOML file, every default embedded here.

A missing file means defaults. An unknown key or a value of the wrong type
makes `load_config` raise ConfigError naming the key and the file, and every
service refuses to start on it. Path defaults that depend on other paths are
left empty here and resolved in `Config.resolve`, so a test can move a whole
stack by setting only `state_dir` and `run_dir`.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

DEFAULT_CONFIG_PATH = "/etc/pyrio/pyrio.toml"
CONFIG_ENV = "PYRIO_CONFIG"

SERVICES = ("crigw", "imaged", "netd", "shimd")


class ConfigError(Exception):
    pass


@dataclass
class PyrioSection:
    state_dir: str = "/var/lib/pyrio"
    run_dir: str = "/run/pyrio"
    # The CRI socket the kubelet dials; empty means <run_dir>/pyrio.sock.
    socket: str = ""
    socket_mode: str = "0660"
    log_level: str = "info"
    # Default deadline, in seconds, of a call between two services.
    rpc_timeout: float = 30.0


@dataclass
class RuntimeHandler:
    path: str = "/usr/sbin/runc"
    # runc --root; empty means <run_dir>/runtimes/<handler name>.
    root: str = ""


@dataclass
class RuntimeSection:
    default_runtime: str = "runc"
    # "cgroupfs" (pyrio and the runtime write the cgroup tree) or "systemd"
    # (containers and shims in transient scopes, pod parents are slices; needs
    # systemd as PID 1, as the kubelet's cgroupDriver: systemd does).
    cgroup_manager: str = "cgroupfs"
    # Parent cgroup of pods whose config names none; empty means "/pyrio" with
    # cgroupfs and "pyrio.slice" with systemd.
    cgroup_parent: str = ""
    # When set, every pod's cgroup parent must lie inside this cgroup (like
    # "/kubepods" or "kubepods.slice"): a CRI client cannot place containers
    # elsewhere in the node's cgroup tree. Empty: any parent is accepted.
    cgroup_parent_root: str = ""
    # Clamp a requested oom_score_adj to the runtime's own, as containerd's
    # restrict_oom_score_adj does: without CAP_SYS_RESOURCE a lower value
    # makes runc fail.
    restrict_oom_score_adj: bool = True
    default_capabilities: list[str] = field(
        default_factory=lambda: [
            "CHOWN",
            "DAC_OVERRIDE",
            "FSETID",
            "FOWNER",
            "SETGID",
            "SETUID",
            "SETPCAP",
            "NET_BIND_SERVICE",
            "KILL",
        ]
    )
    # Size in bytes of each pod's /dev/shm tmpfs.
    shm_size: int = 64 * 1024 * 1024
    # Seconds a shim waits for `runc create` before giving up.
    create_timeout: float = 60.0
    # An optional restriction of pod sysctls on top of the kubelet's (which
    # is the policy point: its --allowed-unsafe-sysctls): the names, or
    # prefixes ending in "*", allowed beyond Kubernetes' safe set. The default
    # "*" restricts nothing: every namespaced sysctl the kubelet sends is
    # applied (net.*, kernel.shm*, kernel.msg*, kernel.sem, fs.mqueue.*), as
    # containerd and CRI-O do; [] allows the safe set only. A node-wide
    # sysctl is never applied.
    allowed_unsafe_sysctls: list[str] = field(default_factory=lambda: ["*"])
    runtimes: dict[str, RuntimeHandler] = field(
        default_factory=lambda: {
            "runc": RuntimeHandler(path="/usr/sbin/runc"),
            "crun": RuntimeHandler(path="/usr/bin/crun"),
        }
    )


@dataclass
class RegistryConfig:
    # Plain HTTP, or HTTPS without certificate verification.
    insecure: bool = False
    # Hosts tried in order before this registry; the repository path is kept.
    mirrors: list[str] = field(default_factory=list)
    ca_file: str = ""


@dataclass
class ImageSection:
    # Where blobs, layers and image records live; empty means <state_dir>/imaged.
    store_dir: str = ""
    max_concurrent_downloads: int = 3
    # A download that makes no progress for this many seconds fails.
    pull_progress_timeout: float = 60.0
    # A download slower than this many bytes/s, averaged over each
    # download_rate_window seconds, fails (a registry dribbling bytes never
    # trips pull_progress_timeout); 0 turns the floor off.
    min_download_rate: int = 1024
    download_rate_window: float = 60.0
    # Downloads one registry may run at once, so a slow one cannot hold every
    # slot; 0 means all of max_concurrent_downloads but one (at least one).
    max_downloads_per_registry: int = 0
    registries: dict[str, RegistryConfig] = field(default_factory=dict)
    # Most bytes one layer may expand to (its uncompressed tar, sparse files
    # by their apparent size) and its blob may declare: a bigger layer, a
    # decompression bomb, is refused.
    max_layer_size: int = 16 << 30
    # Bytes kept free on the store's filesystem: a pull that would go below
    # is refused (RESOURCE_EXHAUSTED), so the kubelet's eviction still works.
    free_space_reserve: int = 1 << 30
    # Images reported pinned to the kubelet (never garbage collected), as
    # CRI-O's pinned_images: exact references, or a prefix ending in "*".
    pinned_images: list[str] = field(default_factory=list)


@dataclass
class NetworkSection:
    cni_config_dir: str = "/etc/cni/net.d"
    cni_plugin_dirs: list[str] = field(default_factory=lambda: ["/usr/lib/cni", "/opt/cni/bin"])
    # Name of the network to use; empty means the first conflist by file name.
    default_network: str = ""


@dataclass
class StreamingSection:
    address: str = "127.0.0.1"
    # 0 picks an ephemeral port at start.
    port: int = 0
    tls_cert_file: str = ""
    tls_key_file: str = ""
    # Seconds a URL returned by Exec/Attach/PortForward stays valid unused.
    token_ttl: float = 60.0
    # Seconds a stream may stay idle before it is closed.
    stream_idle_timeout: float = 4 * 3600.0
    max_concurrent_streams: int = 64
    # Seconds a new connection has to send its whole request head (TLS
    # handshake included) before it is closed, and how many connections may
    # wait for theirs at once (past that the longest-waiting one is closed):
    # slow clients cost no thread and cannot crowd out real ones.
    request_head_timeout: float = 10.0
    max_pending_connections: int = 128


@dataclass
class MetricsSection:
    # crigw's Prometheus endpoint, http(s)://address:port/metrics.
    enable: bool = True
    address: str = "127.0.0.1"
    port: int = 9090
    tls_cert_file: str = ""
    tls_key_file: str = ""


@dataclass
class EventsSection:
    # GetContainerEvents: events waiting for one subscriber before it is cut
    # off (RESOURCE_EXHAUSTED) as too slow, and most streams open at once
    # (each holds one of crigw's gRPC worker threads).
    subscriber_queue: int = 1000
    max_subscribers: int = 16


@dataclass
class Config:
    pyrio: PyrioSection = field(default_factory=PyrioSection)
    runtime: RuntimeSection = field(default_factory=RuntimeSection)
    image: ImageSection = field(default_factory=ImageSection)
    network: NetworkSection = field(default_factory=NetworkSection)
    streaming: StreamingSection = field(default_factory=StreamingSection)
    events: EventsSection = field(default_factory=EventsSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    source: str = field(default="", metadata={"internal": True})

    # Derived paths: services ask for these rather than joining paths themselves.
    def service_state_dir(self, service: str) -> Path:
        return Path(self.pyrio.state_dir) / service

    def rpc_endpoint(self, service: str) -> str:
        return f"ipc://{Path(self.pyrio.run_dir) / 'rpc' / service}.sock"

    def runtime_handler(self, name: str) -> RuntimeHandler:
        handler_name = name or self.runtime.default_runtime
        try:
            return self.runtime.runtimes[handler_name]
        except KeyError:
            from common.errors import InvalidArgument

            known = ", ".join(sorted(self.runtime.runtimes))
            raise InvalidArgument(
                f"runtime handler {handler_name!r} is not configured (configured: {known})"
            ) from None

    def resolve(self) -> "Config":
        """Fill the path defaults that depend on other settings."""
        run_dir = Path(self.pyrio.run_dir)
        if not self.pyrio.socket:
            self.pyrio.socket = str(run_dir / "pyrio.sock")
        if not self.image.store_dir:
            self.image.store_dir = str(self.service_state_dir("imaged"))
        if not self.runtime.cgroup_parent:
            self.runtime.cgroup_parent = "pyrio.slice" if self.runtime.cgroup_manager == "systemd" else "/pyrio"
        for name, handler in self.runtime.runtimes.items():
            if not handler.root:
                handler.root = str(run_dir / "runtimes" / name)
        return self

    def to_toml(self) -> str:
        data = dataclasses.asdict(self)
        data.pop("source", None)
        return tomli_w.dumps(data)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: [{key}] must be a table")
        return _build(tp, value, key, source)
    if origin is list:
        (item_type,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {key} must be a list of {_type_name(item_type)}")
        return [_convert(item, item_type, f"{key}[{index}]", source) for index, item in enumerate(value)]
    if origin is dict:
        _, value_type = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: [{key}] must be a table")
        return {
            name: _convert(item, value_type, f"{key}.{name}", source) for name, item in value.items()
        }
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{source}: {key} must be a number, not a boolean")
    if not isinstance(value, tp):
        raise ConfigError(
            f"{source}: {key} must be of type {_type_name(tp)}, got {type(value).__name__} {value!r}"
        )
    return value


def _build(cls: Any, values: dict[str, Any], prefix: str, source: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if key not in known:
            raise ConfigError(f"{source}: unknown configuration key {dotted!r}")
        kwargs[key] = _convert(value, hints[key], dotted, source)
    # A file that sets [runtime.runtimes] replaces the default table as a
    # whole (so crun can be dropped); _validate checks the default is in it.
    return cls(**kwargs)


def _validate(config: Config, source: str) -> None:
    if config.pyrio.log_level.lower() not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"{source}: pyrio.log_level must be debug, info, warning or error")
    try:
        int(config.pyrio.socket_mode, 8)
    except ValueError:
        raise ConfigError(f"{source}: pyrio.socket_mode must be an octal mode like \"0660\"") from None
    if config.runtime.cgroup_manager not in ("cgroupfs", "systemd"):
        raise ConfigError(f"{source}: runtime.cgroup_manager must be \"cgroupfs\" or \"systemd\"")
    parent = config.runtime.cgroup_parent
    if parent and config.runtime.cgroup_manager == "systemd" and not parent.endswith(".slice"):
        raise ConfigError(f"{source}: runtime.cgroup_parent {parent!r} must be a systemd slice name (like pyrio.slice) "
                          "with runtime.cgroup_manager = \"systemd\"")
    if parent and config.runtime.cgroup_manager == "cgroupfs" and not parent.startswith("/"):
        raise ConfigError(f"{source}: runtime.cgroup_parent {parent!r} must be an absolute cgroup path (like /pyrio) "
                          "with runtime.cgroup_manager = \"cgroupfs\"")
    if config.runtime.default_runtime not in config.runtime.runtimes:
        raise ConfigError(
            f"{source}: runtime.default_runtime {config.runtime.default_runtime!r} "
            "is not in [runtime.runtimes]"
        )
    for name in ("rpc_timeout",):
        if getattr(config.pyrio, name) <= 0:
            raise ConfigError(f"{source}: pyrio.{name} must be positive")
    if config.image.max_concurrent_downloads < 1:
        raise ConfigError(f"{source}: image.max_concurrent_downloads must be at least 1")
    if config.image.min_download_rate < 0 or config.image.max_downloads_per_registry < 0:
        raise ConfigError(f"{source}: image.min_download_rate and image.max_downloads_per_registry must not be negative")
    if config.image.download_rate_window <= 0:
        raise ConfigError(f"{source}: image.download_rate_window must be positive")
    if config.image.max_layer_size < 1:
        raise ConfigError(f"{source}: image.max_layer_size must be at least 1")
    if config.image.free_space_reserve < 0:
        raise ConfigError(f"{source}: image.free_space_reserve must not be negative")
    if config.image.pull_progress_timeout <= 0:
        raise ConfigError(f"{source}: image.pull_progress_timeout must be positive")
    if not 0 <= config.streaming.port <= 65535:
        raise ConfigError(f"{source}: streaming.port must be between 0 and 65535")
    for name in ("token_ttl", "stream_idle_timeout", "request_head_timeout"):
        if getattr(config.streaming, name) <= 0:
            raise ConfigError(f"{source}: streaming.{name} must be positive")
    for name in ("max_concurrent_streams", "max_pending_connections"):
        if getattr(config.streaming, name) < 1:
            raise ConfigError(f"{source}: streaming.{name} must be at least 1")
    if not 0 <= config.metrics.port <= 65535:
        raise ConfigError(f"{source}: metrics.port must be between 0 and 65535")
    if bool(config.metrics.tls_cert_file) != bool(config.metrics.tls_key_file):
        raise ConfigError(f"{source}: metrics.tls_cert_file and metrics.tls_key_file go together")
    for name in ("subscriber_queue", "max_subscribers"):
        if getattr(config.events, name) < 1:
            raise ConfigError(f"{source}: events.{name} must be at least 1")
    if bool(config.streaming.tls_cert_file) != bool(config.streaming.tls_key_file):
        raise ConfigError(f"{source}: streaming.tls_cert_file and streaming.tls_key_file go together")
    if config.runtime.shm_size < 0:
        raise ConfigError(f"{source}: runtime.shm_size must not be negative")


def config_path_from_env(explicit: str | None = None) -> str:
    return explicit or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG_PATH


def load_config(path: str | None = None) -> Config:
    """Load the effective configuration; a missing file means all defaults."""
    source = config_path_from_env(path)
    try:
        with open(source, "rb") as handle:
            raw = tomllib.load(handle)
    except FileNotFoundError:
        # Only the default location may be absent: a path someone named
        # explicitly and mistyped must not silently mean "defaults".
        if source != DEFAULT_CONFIG_PATH:
            raise ConfigError(f"{source}: configuration file not found") from None
        raw = {}
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    config = _build(Config, raw, "", source)
    config.source = source
    _validate(config, source)
    return config.resolve()
