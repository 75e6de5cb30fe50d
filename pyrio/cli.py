"""The `pyrio` command: `pyrio status`, `pyrio config`."""

from __future__ import annotations

import argparse
import sys
import time
import xmlrpc.client
from pathlib import Path
from typing import Any

from common.config import SERVICES, Config, ConfigError, load_config
from common.daemon import client_for, service_starts
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


def service_figures(config: Config, service: str) -> dict[str, Any]:
    """uptime, restarts, calls in flight, errors in the last minute of one service
    ({} when it does not answer): the daemons' `metrics` RPC, crigw's from /metrics."""
    if service == "crigw":
        return gateway_figures(config)
    client = client_for(config, service, timeout=3)
    try:
        answer = client.call("metrics", idempotent=True)
    except PyrioError:
        return {}
    finally:
        client.close()
    return {"uptime": time.time() - float(answer["started_at"]), "restarts": max(0, int(answer["starts"]) - 1),
            "in_flight": answer["in_flight"], "errors_1m": answer["errors_last_minute"]}


def gateway_figures(config: Config) -> dict[str, Any]:
    import urllib.request

    settings = config.metrics
    if not settings.enable or not settings.port:
        return {}
    scheme = "https" if settings.tls_cert_file else "http"
    try:
        import ssl

        context = ssl._create_unverified_context() if scheme == "https" else None  # our own endpoint
        with urllib.request.urlopen(f"{scheme}://{settings.address}:{settings.port}/metrics", timeout=3,
                                    context=context) as reply:
            text = reply.read().decode()
    except OSError:
        return {}
    wanted = {"pyrio_service_uptime_seconds": "uptime", "pyrio_service_restarts_total": "restarts",
              "pyrio_service_calls_in_flight": "in_flight", "pyrio_service_errors_last_minute": "errors_1m"}
    # crigw writes these gauges and counters with the one label `service`
    # (services/crigw/prometheus_text.py): `name{service="crigw"} value`.
    figures: dict[str, Any] = {}
    for line in text.splitlines():
        name, _, rest = line.partition('{service="crigw"} ')
        if rest and name in wanted:
            try:
                figures[wanted[name]] = float(rest)
            except ValueError:
                pass
    return figures


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
        figures = service_figures(config, service) if up else {}
        started = info.get("start") or health.get("started_at")
        uptime_seconds = figures.get("uptime") or (time.time() - started if up and started else None)
        uptime = format_uptime(uptime_seconds) if uptime_seconds else "-"
        restarts = int(figures["restarts"]) if "restarts" in figures else max(0, service_starts(config, service) - 1)
        in_flight = int(figures["in_flight"]) if "in_flight" in figures else "-"
        errors = int(figures["errors_1m"]) if "errors_1m" in figures else "-"
        health_text = ", ".join(f"{key}={value}" for key, value in sorted(health.items()) if key not in ("pid",))
        state = info.get("statename", "?")
        print(f"{service:<7} {'up' if up else 'down':<5} pid={pid:<8} uptime={uptime:<10} restarts={restarts:<4} "
              f"in_flight={in_flight:<4} errors_1m={errors:<4} supervisor={state:<9} {health_text}")
    return 0 if all_up else 1


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="pyrio", description="pyrio node container runtime")
    parser.add_argument("--config", help="pyrio.toml (default: $PYRIO_CONFIG or /etc/pyrio/pyrio.toml)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("status", help="each service: up or down, pid, uptime, restarts, calls in flight, "
                                  "errors in the last minute and its health answer")
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
