"""The shim's CRI log writer: `<RFC3339Nano> <stream> <P|F> <content>` lines, as conmon writes them."""

from __future__ import annotations

import errno
import os
import time


# A log line longer than this is written in parts marked P (as conmon does).
MAX_LOG_LINE = 16 * 1024
# The shim's one read buffer for the container's output, and the most log
# bytes it builds up before writing them out.
READ_CHUNK = 32 * 1024
LOG_BATCH_BYTES = 64 * 1024


def rfc3339_nano(now_ns: int) -> bytes:
    seconds, nanos = divmod(now_ns, 1_000_000_000)
    return (time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + ".%09dZ" % nanos).encode()


class LogWriter:
    """The CRI log file of one container, reopened on request."""

    def __init__(self, path: str, fd: int = -1) -> None:
        self.path = path
        self.fd = fd
        self.partial = {b"stdout": b"", b"stderr": b""}
        if fd < 0:
            self.reopen()

    def reopen(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.path:
            self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)

    def write(self, stream: bytes, data: bytes | bytearray | memoryview) -> None:
        """Log one chunk the container wrote, stamped once (as conmon does).

        Lines are cut out by offset, not by re-slicing the rest of the chunk,
        and written in batches of at most LOG_BATCH_BYTES: a chatty container
        costs its shim no lasting memory beyond a batch."""
        pending = self.partial[stream]
        buffer = pending + bytes(data) if pending else bytes(data)
        stamp = rfc3339_nano(time.time_ns())
        full, part = b"%s %s F " % (stamp, stream), b"%s %s P " % (stamp, stream)
        view = memoryview(buffer)
        out = bytearray()
        start, end = 0, len(buffer)
        while start < end:
            newline = buffer.find(b"\n", start, start + MAX_LOG_LINE + 1)
            if newline >= 0:
                out += full
                out += view[start : newline + 1]
                start = newline + 1
            elif end - start > MAX_LOG_LINE:
                # More than a full line's worth with no newline in it yet.
                out += part
                out += view[start : start + MAX_LOG_LINE]
                out += b"\n"
                start += MAX_LOG_LINE
            else:
                break
            if len(out) >= LOG_BATCH_BYTES:
                self._write_out(out)
                out.clear()
        self.partial[stream] = bytes(view[start:])
        view.release()
        self._write_out(out)

    def flush_partial(self, stream: bytes) -> None:
        """At EOF a line without its newline is written as a part (P)."""
        if self.partial[stream]:
            stamp = rfc3339_nano(time.time_ns())
            self._write_out(b"%s %s P %s\n" % (stamp, stream, self.partial[stream]))
            self.partial[stream] = b""

    def _write_out(self, data: bytes | bytearray) -> None:
        if self.fd < 0 or not data:
            return
        view = memoryview(data)
        while view:
            try:
                written = os.write(self.fd, view)
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                break  # a full disk must not kill the container's supervisor
            view = view[written:]
        view.release()
