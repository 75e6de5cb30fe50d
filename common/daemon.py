"""What every pyrio daemon does at start: config, logging, RPC server, health.

A service module provides `build(config, server) -> Service`, registers its
RPC methods on the server, and `run_service` serves them until SIGTERM.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from typing import Any, Callable, Protocol

from common import state
from common.config import Config, ConfigError, load_config
from common.logs import setup_logging
from common.rpc import CallContext, RpcClient, RpcServer


class Service(Protocol):
    def health(self) -> dict[str, Any]:
        """Service-specific health: at least {"ready": bool, "reason": str}."""

    def close(self) -> None:
        """Release resources on shutdown (never touch running containers)."""


USAGE = "usage: pyrio-{service} [--config PATH]"


def parse_args(service: str, argv: list[str] | None = None) -> str | None:
    """The --config path given, or None (then $PYRIO_CONFIG or /etc/pyrio/pyrio.toml).

    Parsed by hand: argparse costs every daemon about 400 KiB for one option."""
    args = list(sys.argv[1:] if argv is None else argv)
    config_path: str | None = None
    while args:
        arg = args.pop(0)
        if arg in ("-h", "--help"):
            print(USAGE.format(service=service) + "\n\n  --config PATH  path of pyrio.toml"
                  " (default: $PYRIO_CONFIG or /etc/pyrio/pyrio.toml)")
            sys.exit(0)
        if arg == "--config" and args:
            config_path = args.pop(0)
        elif arg.startswith("--config="):
            config_path = arg.split("=", 1)[1]
        else:
            print(f"{USAGE.format(service=service)}\npyrio-{service}: error: unexpected argument {arg!r}", file=sys.stderr)
            sys.exit(2)
    return config_path


def client_for(config: Config, service: str, timeout: float | None = None) -> RpcClient:
    """An RPC client for one of the services, at its configured endpoint."""
    return RpcClient(config.rpc_endpoint(service), service, timeout or config.pyrio.rpc_timeout)


def start_process(service: str, argv: list[str] | None = None) -> tuple[Config, logging.Logger]:
    """Parse arguments, load the config (or exit naming the bad key), set up logs."""
    config_path = parse_args(service, argv)
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        print(f"pyrio-{service}: refusing to start: {exc}", file=sys.stderr)
        # supervisord retries a failed start a few times, then marks it FATAL:
        # the message above is in the service's log each time.
        sys.exit(2)
    secure_service_dirs(config, service)
    count_start(config, service)
    return config, setup_logging(service, config.pyrio.log_level)


def count_start(config: Config, service: str) -> int:
    """Count this start in `<state_dir>/<service>/starts` (kept across
    restarts, so `restarts = starts - 1` never goes backwards); the count."""
    path = config.service_state_dir(service) / "starts"
    try:
        starts = int(path.read_text().strip() or 0)
    except (OSError, ValueError):
        starts = 0
    state.atomic_write_bytes(path, f"{starts + 1}\n".encode())
    return starts + 1


def service_starts(config: Config, service: str) -> int:
    try:
        return int((config.service_state_dir(service) / "starts").read_text().strip() or 0)
    except (OSError, ValueError):
        return 0


def secure_service_dirs(config: Config, service: str) -> None:
    """Make (or close) the state and run directories before anything is
    written into them: the top ones traverse-only, the service's own 0700."""
    state.private_dir(config.pyrio.state_dir, state.TRAVERSE_ONLY_DIR_MODE)
    state.private_dir(config.pyrio.run_dir, state.TRAVERSE_ONLY_DIR_MODE)
    state.private_dir(config.service_state_dir(service))
    # Only the service writes its own top directory (its start count, say),
    # so a temp file there is one of its writes that a kill cut short.
    state.remove_stale_temp_files(config.service_state_dir(service))


def run_service(
    service: str,
    build: Callable[[Config, RpcServer], Service],
    argv: list[str] | None = None,
) -> None:
    config, log = start_process(service, argv)
    started_at = time.time()
    server = RpcServer(config.rpc_endpoint(service), service)
    instance = build(config, server)

    def health(_params: dict[str, Any], _call: CallContext) -> dict[str, Any]:
        answer = {"service": service, "pid": os.getpid(), "started_at": started_at, "ready": True, "reason": ""}
        answer.update(instance.health())
        return answer

    def metrics(_params: dict[str, Any], _call: CallContext) -> dict[str, Any]:
        """Figures since this start (crigw's /metrics and `pyrio status` read them)."""
        answer = server.counts.snapshot()
        answer["in_flight"] -= 1  # this call
        answer.update(service=service, pid=os.getpid(), started_at=started_at,
                      starts=service_starts(config, service))
        extra = getattr(instance, "metrics", None)
        answer["service_figures"] = extra() if extra is not None else {}
        return answer

    server.register("health", health)
    server.register("metrics", metrics)
    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    signal.signal(signal.SIGINT, lambda *_: server.stop())
    server.bind()
    log.info("serving", extra={"endpoint": server.endpoint, "methods": server.methods(), "config": config.source})
    try:
        server.serve_forever()
    finally:
        instance.close()
        log.info("stopped")
        logging.shutdown()
    exit_now()


def exit_now() -> None:
    """End the process without waiting for handlers still running.

    Their callers already saw the server go (Unavailable), so their answers
    could not be delivered anyway, and every service is built to survive a
    SIGKILL at any instant: waiting for, say, a 20 s ExecSync to finish would
    only hold a restart up until supervisord's stopwaitsecs."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
