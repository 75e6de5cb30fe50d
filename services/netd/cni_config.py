"""Finding the CNI network configuration, as the CNI spec's libcni does.

Files ending in .conflist, .conf or .json in the config dir are read in
lexical order; the first valid one (or the one named by
network.default_network) is the pod network. A single-plugin .conf is
wrapped into a list. Every plugin type must exist in one of the plugin dirs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.config import Config
from common.errors import FailedPrecondition

CONFIG_SUFFIXES = (".conflist", ".conf", ".json")


@dataclass
class NetworkConfig:
    name: str
    cni_version: str
    path: str
    conflist: dict[str, Any]

    @property
    def plugins(self) -> list[dict[str, Any]]:
        return self.conflist["plugins"]


def find_plugin(plugin_type: str, plugin_dirs: list[str]) -> str | None:
    for directory in plugin_dirs:
        candidate = Path(directory) / plugin_type
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def _parse(path: Path, plugin_dirs: list[str]) -> NetworkConfig:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise FailedPrecondition(f"CNI config {path}: {exc}") from None
    if not isinstance(data, dict):
        raise FailedPrecondition(f"CNI config {path}: not a JSON object")
    if path.suffix != ".conflist" and "plugins" not in data:
        # A .conf holds one plugin: wrap it the way libcni does.
        data = {"cniVersion": data.get("cniVersion", ""), "name": data.get("name", ""), "plugins": [data]}
    plugins = data.get("plugins")
    if not data.get("name") or not isinstance(plugins, list) or not plugins:
        raise FailedPrecondition(f"CNI config {path}: needs a name and a non-empty plugins list")
    for plugin in plugins:
        plugin_type = plugin.get("type") if isinstance(plugin, dict) else None
        if not plugin_type:
            raise FailedPrecondition(f"CNI config {path}: a plugin has no type")
        if find_plugin(plugin_type, plugin_dirs) is None:
            raise FailedPrecondition(
                f"CNI config {path}: plugin {plugin_type!r} not found in {', '.join(plugin_dirs)}"
            )
    return NetworkConfig(name=data["name"], cni_version=str(data.get("cniVersion", "")), path=str(path), conflist=data)


def load_network(config: Config) -> NetworkConfig:
    """The pod network, or FailedPrecondition saying why there is none."""
    directory = Path(config.network.cni_config_dir)
    try:
        names = sorted(name for name in os.listdir(directory) if name.endswith(CONFIG_SUFFIXES))
    except FileNotFoundError:
        raise FailedPrecondition(f"CNI config dir {directory} does not exist") from None
    if not names:
        raise FailedPrecondition(f"no CNI network config found in {directory}")
    errors: list[str] = []
    for name in names:
        try:
            network = _parse(directory / name, config.network.cni_plugin_dirs)
        except FailedPrecondition as exc:
            errors.append(str(exc))
            continue
        if config.network.default_network and network.name != config.network.default_network:
            continue
        return network
    if config.network.default_network:
        errors.append(f"no valid config names network {config.network.default_network!r}")
    raise FailedPrecondition("; ".join(errors))
