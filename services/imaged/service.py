"""imaged: images, the blob and layer store, and container root filesystems."""

from __future__ import annotations

from typing import Any

from common.config import Config
from common.rpc import RpcServer


class ImageDaemon:
    def __init__(self, config: Config) -> None:
        self.config = config

    def health(self) -> dict[str, Any]:
        return {"ready": True, "reason": ""}

    def close(self) -> None:
        pass


def build(config: Config, server: RpcServer) -> ImageDaemon:
    return ImageDaemon(config)
