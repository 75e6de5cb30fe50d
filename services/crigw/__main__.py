"""crigw: the CRI gateway, the only gRPC server of pyrio.

It keeps no state of its own: every CRI object lives in the daemon that
owns it (images in imaged, sandboxes in netd, containers in shimd), so a
restarted gateway answers exactly as before.
"""

from __future__ import annotations

import logging
import signal
import threading

from common.daemon import exit_now, start_process
from common.heap import IdleTrim
from services.crigw.gateway import Gateway
from services.crigw.metrics import start_metrics_server
from services.crigw.server import IN_FLIGHT, build_server
from services.crigw.streaming import start_streaming_server

# CRI calls in flight at a restart get this long to finish; the kubelet
# retries the others, and a restart must stay well under 2 s.
STOP_GRACE_SECONDS = 1.0


def main(argv: list[str] | None = None) -> None:
    config, log = start_process("crigw", argv)
    gateway = Gateway(config)
    metrics = start_metrics_server(gateway, IN_FLIGHT)  # noqa: F841 (before build_server: it wraps handlers)
    # Held until exit: a grpc.Server that nobody references is collected and stops serving.
    server = build_server(gateway)  # noqa: F841
    streaming = start_streaming_server(gateway)
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    log.info("serving CRI", extra={"socket": config.pyrio.socket, "streaming": streaming.base_url, "config": config.source})
    trim, calls_seen = IdleTrim(), 0
    while not stopping.wait(0.5):
        if IN_FLIGHT.started_total != calls_seen:
            calls_seen = IN_FLIGHT.started_total
            trim.note_activity()
        trim.maybe_trim(busy=IN_FLIGHT.busy)
    streaming.stop()
    # Not server.stop(grace): it answers the calls still running after the
    # grace with CANCELLED. Exiting with them open drops the connection, and
    # their clients get UNAVAILABLE, the code that says "try again", as
    # after a crash.
    IN_FLIGHT.wait_idle(STOP_GRACE_SECONDS)
    # No gateway.close(): calls past the grace still wait on its sockets,
    # and closing those under them would end the calls with an error that
    # the gRPC server, still up for an instant, sends as INTERNAL (issue 15
    # item 13, seen under CPU contention). Exiting closes everything.
    log.info("stopped")
    logging.shutdown()
    exit_now()


if __name__ == "__main__":
    main()
