"""A tiny RPC server process for the RPC layer tests: `python -m tests.rpc_test_server ENDPOINT`.

Methods: echo, sleep {seconds}, fail {kind, message}, count (per process).
"""

from __future__ import annotations

import itertools
import os
import signal
import sys
import time
from typing import Any

from common.errors import ERROR_KINDS
from common.rpc import CallContext, RpcServer


def build(endpoint: str) -> RpcServer:
    server = RpcServer(endpoint, "testd")
    counter = itertools.count(1)

    def echo(params: dict[str, Any], call: CallContext) -> Any:
        return {"params": params, "pid": os.getpid()}

    def sleep(params: dict[str, Any], call: CallContext) -> Any:
        time.sleep(float(params.get("seconds", 1)))
        return {"slept": params.get("seconds"), "pid": os.getpid()}

    def fail(params: dict[str, Any], call: CallContext) -> Any:
        raise ERROR_KINDS[params["kind"]](params.get("message", ""))

    def count(params: dict[str, Any], call: CallContext) -> Any:
        return next(counter)

    for name, handler in (("echo", echo), ("sleep", sleep), ("fail", fail), ("count", count)):
        server.register(name, handler)
    return server


if __name__ == "__main__":
    rpc_server = build(sys.argv[1])
    signal.signal(signal.SIGTERM, lambda *_: rpc_server.stop())
    rpc_server.bind()
    print("ready", flush=True)
    rpc_server.serve_forever()
