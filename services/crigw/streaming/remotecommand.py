"""The exec/attach protocol (`remotecommand`) the kubelet's streaming library speaks.

Over SPDY the client negotiates a version with `X-Stream-Protocol-Version`
and then opens one stream per stdio stream it wants plus `error` (and
`resize` for a TTY from v3 on), each named by its `streamType` header. Over
WebSocket the channels are fixed: 0 stdin, 1 stdout, 2 stderr, 3 error,
4 resize. When the command ends the server writes its outcome to the error
stream: from v4 on a JSON metav1.Status (exit code in a cause of type
ExitCode), before that the error text alone and nothing on success.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol

V1 = "channel.k8s.io"
V2 = "v2.channel.k8s.io"
V3 = "v3.channel.k8s.io"
V4 = "v4.channel.k8s.io"
V5 = "v5.channel.k8s.io"

# What the server accepts over SPDY; the client's order of preference wins.
SPDY_PROTOCOLS = (V5, V4, V3, V2, V1)
PROTOCOL_NUMBER = {V1: 1, V2: 2, V3: 3, V4: 4, V5: 5}

STREAM_TYPE_HEADER = "streamtype"
STDIN, STDOUT, STDERR, ERROR, RESIZE = "stdin", "stdout", "stderr", "error", "resize"

NON_ZERO_EXIT_CODE_REASON = "NonZeroExitCode"
EXIT_CODE_CAUSE_TYPE = "ExitCode"


class Stream(Protocol):
    id: int

    def read(self, max_bytes: int = 65536) -> bytes: ...

    def write(self, data: bytes) -> None: ...

    def close(self) -> None: ...

    def reset(self, status: int = ...) -> None: ...

    def header(self, name: str) -> str: ...


@dataclass
class StreamOptions:
    stdin: bool
    stdout: bool
    stderr: bool
    tty: bool


# --- outcomes as metav1.Status -----------------------------------------------


def status_success() -> dict[str, Any]:
    return {"metadata": {}, "status": "Success"}


def status_exit_code(code: int) -> dict[str, Any]:
    return {
        "metadata": {},
        "status": "Failure",
        "message": f"command terminated with non-zero exit code: exit status {code}",
        "reason": NON_ZERO_EXIT_CODE_REASON,
        "details": {"causes": [{"reason": EXIT_CODE_CAUSE_TYPE, "message": str(code)}]},
    }


def status_internal_error(message: str) -> dict[str, Any]:
    return {
        "metadata": {},
        "status": "Failure",
        "message": f"Internal error occurred: {message}",
        "reason": "InternalError",
        "details": {"causes": [{"message": message}]},
        "code": 500,
    }


def encode_status(status: dict[str, Any], version: int) -> bytes:
    """What goes on the error stream: JSON from v4 on, the bare message before."""
    if version >= 4:
        return json.dumps(status, separators=(",", ":")).encode()
    if status.get("status") == "Success":
        return b""
    return str(status.get("message", "")).encode()


# --- the streams of one session -------------------------------------------------


@dataclass
class RemoteStreams:
    version: int
    tty: bool
    stdin: Stream | None = None
    stdout: Stream | None = None
    stderr: Stream | None = None
    error: Stream | None = None
    resize: Stream | None = None
    _status_written: bool = field(default=False, repr=False)

    def write_status(self, status: dict[str, Any]) -> None:
        if self._status_written or self.error is None:
            return
        self._status_written = True
        payload = encode_status(status, self.version)
        try:
            if payload:
                self.error.write(payload)
            self.error.close()
        except OSError:
            pass

    def close_outputs(self) -> None:
        for stream in (self.stdout, self.stderr):
            if stream is not None:
                stream.close()

    def resizes(self) -> Iterator[tuple[int, int]]:
        """(width, height) for every TerminalSize JSON object the client sends."""
        if self.resize is None:
            return
        decoder = json.JSONDecoder()
        pending = ""
        while True:
            chunk = self.resize.read()
            if not chunk:
                return
            pending += chunk.decode("utf-8", "replace")
            while True:
                pending = pending.lstrip()
                if not pending:
                    break
                try:
                    size, end = decoder.raw_decode(pending)
                except ValueError:
                    break  # an object split across reads: wait for the rest
                pending = pending[end:]
                if isinstance(size, dict):
                    try:
                        width, height = int(size.get("Width", 0)), int(size.get("Height", 0))
                    except (TypeError, ValueError):
                        continue
                    if 0 < width < 65536 and 0 < height < 65536:
                        yield width, height


def expected_stream_types(options: StreamOptions, version: int) -> set[str]:
    wanted = {ERROR}
    if options.stdin:
        wanted.add(STDIN)
    if options.stdout:
        wanted.add(STDOUT)
    if options.stderr:
        wanted.add(STDERR)
    if options.tty and version >= 3:
        wanted.add(RESIZE)
    return wanted


class SpdyStreamCollector:
    """Accepts the client's streams as they arrive and hands over the set once complete."""

    def __init__(self, options: StreamOptions, version: int) -> None:
        self.options = options
        self.version = version
        self._streams: queue.Queue[Stream] = queue.Queue()

    def on_stream(self, stream: Stream) -> str | None:
        stream_type = stream.header(STREAM_TYPE_HEADER)
        if stream_type not in (STDIN, STDOUT, STDERR, ERROR, RESIZE):
            return f"unexpected stream type {stream_type!r}"
        self._streams.put(stream)
        return None

    def wait(self, timeout: float, cancelled: threading.Event) -> RemoteStreams:
        """The session's streams, or TimeoutError if the client did not open them in time."""
        streams = RemoteStreams(version=self.version, tty=self.options.tty)
        wanted = expected_stream_types(self.options, self.version)
        deadline = time.monotonic() + timeout
        while wanted:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or cancelled.is_set():
                raise TimeoutError("timed out waiting for client to create streams")
            try:
                stream = self._streams.get(timeout=min(remaining, 0.2))
            except queue.Empty:
                continue
            stream_type = stream.header(STREAM_TYPE_HEADER)
            setattr(streams, stream_type, stream)
            wanted.discard(stream_type)
        return streams
