"""The `pyrio` command: `pyrio status`, `pyrio config`."""

from __future__ import annotations

import argparse
import sys
import time
import xmlrpc.client
from pathlib import Path
from typing import Any

from common.config import SERVICES, Config, ConfigError, load_config
from common.daemon import client_for
from common.errors import PyrioError


def supervisor_processes(config: Config) -> dict[str, dict[str, Any]]:
    """Process info of each program from supervisord, {} when it is not reachable."""
    from supervisor.xmlrpc import SupervisorTransport

    socket_path = Path(config.pyrio.run_dir) / "supervisor" / "supervisor.sock"
    transport = SupervisorTransport(None, None, serverurl=f"unix://{socket_path}")
    proxy = xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)
    try:
        return {info["name"]: info for info in proxy.supervisor.getAllProcessInfo()}
    except (OSError, xmlrpc.client.Error):
        return {}


def gateway_health(config: Config) -> dict[str, Any]:
    import grpc
    from cri_api.v1 import api_pb2, api_pb2_grpc

    with grpc.insecure_channel(f"unix://{config.pyrio.socket}") as channel:
        stub = api_pb2_grpc.RuntimeServiceStub(channel)
        try:
            reply = stub.Version(api_pb2.VersionRequest(), timeout=3)
        except grpc.RpcError as exc:
            return {"ready": False, "reason": f"{exc.code().name}: {exc.details()}"}
    return {"ready": True, "runtime": f"{reply.runtime_name} {reply.runtime_version}"}


def service_health(config: Config, service: str) -> dict[str, Any]:
    if service == "crigw":
        return gateway_health(config)
    client = client_for(config, service, timeout=3)
    try:
        return client.call("health", idempotent=True)
    except PyrioError as exc:
        return {"ready": False, "reason": str(exc)}
    finally:
        client.close()


def format_uptime(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"


def status(config: Config) -> int:
    processes = supervisor_processes(config)
    all_up = True
    for service in SERVICES:
        info = processes.get(service, {})
        health = service_health(config, service)
        # Up means the process answers its health call and says it is ready;
        # supervisord's view (state, pid, start time) is added when reachable.
        up = bool(health.get("ready"))
        all_up = all_up and up
        pid = info.get("pid") or health.get("pid") or "-"
        started = info.get("start") or health.get("started_at")
        uptime = format_uptime(time.time() - started) if up and started else "-"
        health_text = ", ".join(f"{key}={value}" for key, value in sorted(health.items()) if key not in ("pid",))
        state = info.get("statename", "?")
        print(f"{service:<7} {'up' if up else 'down':<5} pid={pid:<8} uptime={uptime:<10} supervisor={state:<9} {health_text}")
    return 0 if all_up else 1


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="pyrio", description="pyrio node container runtime")
    parser.add_argument("--config", help="pyrio.toml (default: $PYRIO_CONFIG or /etc/pyrio/pyrio.toml)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("status", help="each service: up or down, pid, uptime and its health answer")
    sub.add_parser("config", help="print the effective configuration as TOML")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"pyrio: {exc}", file=sys.stderr)
        sys.exit(2)
    if args.command == "config":
        sys.stdout.write(config.to_toml())
        return
    sys.exit(status(config))


if __name__ == "__main__":
    main()
