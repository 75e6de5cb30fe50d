"""The gateway's view of the node: configuration and one RPC client per daemon."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

from common.config import Config
from common.daemon import client_for
from common.errors import PyrioError
from common.rpc import RpcClient

HEALTH_TIMEOUT_SECONDS = 2.0


class Gateway:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.imaged: RpcClient = client_for(config, "imaged")
        self.netd: RpcClient = client_for(config, "netd")
        self.shimd: RpcClient = client_for(config, "shimd")
        self._health_pool = ThreadPoolExecutor(max_workers=3, thread_name_prefix="health")

    def health_of_daemons(self) -> dict[str, dict[str, Any]]:
        """Live health answers of imaged, netd and shimd, asked in parallel.

        A daemon that does not answer is reported {"ready": False} with the
        error as reason, never raised: Status must answer while one is down.
        """

        def ask(client: RpcClient) -> dict[str, Any]:
            try:
                return client.call("health", timeout=HEALTH_TIMEOUT_SECONDS, idempotent=True)
            except PyrioError as exc:
                return {"service": client.service, "ready": False, "reason": f"{client.service}: {exc}"}

        clients = [self.imaged, self.netd, self.shimd]
        answers = list(self._health_pool.map(ask, clients))
        return {client.service: answer for client, answer in zip(clients, answers)}

    def close(self) -> None:
        for client in (self.imaged, self.netd, self.shimd):
            client.close()
        self._health_pool.shutdown(wait=False)
