"""Attach: relay a client to a container's main process through its shim.

The shim listens on an AF_UNIX SOCK_SEQPACKET socket (like conmon). Each
packet from the shim is one byte naming the stream (2 stdout, 3 stderr) and
the data; packets to the shim are raw stdin, and shutdown(SHUT_WR) is stdin
EOF. The shim closes us when the container exits. Like CRI-O, when the
client's stdin ends the attach ends too, unless the container closes stdin
after one attach (stdin_once) or has a TTY: then we wait for its output to end.
"""

from __future__ import annotations

import socket
import threading
from typing import Any, Callable

from services.crigw.streaming.remotecommand import RemoteStreams

SHIM_STDOUT = 2
SHIM_STDERR = 3
PACKET_SIZE = 32 * 1024


def run_attach(
    info: dict[str, Any],
    streams: RemoteStreams,
    cancelled: threading.Event,
    resize: Callable[[int, int], None],
) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.connect(str(info["attach_socket"]))
    output_done = threading.Event()
    stdin_done = threading.Event()

    def shim_to_client() -> None:
        try:
            while packet := sock.recv(PACKET_SIZE + 1):
                kind, data = packet[0], packet[1:]
                target = streams.stderr if kind == SHIM_STDERR and not streams.tty else streams.stdout
                if target is not None and data:
                    target.write(data)
        except OSError:
            pass
        finally:
            output_done.set()

    def client_to_shim() -> None:
        try:
            if streams.stdin is not None:
                while chunk := streams.stdin.read(PACKET_SIZE):
                    sock.sendall(chunk)
                sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        finally:
            stdin_done.set()

    def apply_resizes() -> None:
        for width, height in streams.resizes():
            try:
                resize(width, height)
            except Exception:  # a failed resize must not end the attach
                pass

    threading.Thread(target=shim_to_client, daemon=True).start()
    if streams.stdin is not None:
        threading.Thread(target=client_to_shim, daemon=True).start()
    if streams.resize is not None:
        threading.Thread(target=apply_resizes, daemon=True).start()
    wait_for_output = streams.tty or bool(info.get("stdin_once"))
    try:
        while not output_done.is_set() and not cancelled.is_set():
            if streams.stdin is not None and stdin_done.is_set() and not wait_for_output:
                break
            output_done.wait(0.05)
    finally:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()
