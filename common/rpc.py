"""The RPC layer between pyrio's services: ZeroMQ over ipc:// with msgpack.

Wire format, one msgpack map per frame:
  request  {"id": str, "method": str, "params": map, "deadline": float unix time}
  reply    {"id": str, "result": any} or {"id": str, "error": {"kind", "message"}}

The server reads on a ROUTER socket and runs each request on a worker thread,
so a slow call (a one-minute pull) never blocks a fast one. Replies travel
back to the I/O thread over an inproc PUSH/PULL pair because a ZeroMQ socket
must only be used by one thread.

The client lends each call a DEALER socket of its own from a pool (ZeroMQ
sockets are not thread safe, and crigw calls from many threads at once); a
socket goes back to the pool when the call ends, so the client holds as many
sockets as calls ever ran at once, not one per thread that ever called (a
streaming session is a new thread each time). ZeroMQ reconnects by itself
after a server restart; a socket monitor tells the client when its server
went away mid-call, so the call fails with Unavailable (or is sent again, for
methods declared idempotent) instead of waiting for a reply that will never
come.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import msgpack
import zmq

from common import state
from common.errors import (
    DeadlineExceeded,
    Internal,
    PyrioError,
    Unavailable,
    Unimplemented,
    error_from_wire,
)
from common.heap import IdleTrim

log = logging.getLogger("pyrio.rpc")

# How long a call waits for a connection to a server that is not connected
# (first use, or the server is restarting) before answering Unavailable.
CONNECT_GRACE_SECONDS = 1.0
# A server that went away in the middle of an idempotent call is most likely
# being restarted by supervisord; on a busy node that takes seconds, and the
# caller is better served by the answer than by an early Unavailable.
RESEND_GRACE_SECONDS = 10.0
# How soon a call waiting for its answer notices that its client was closed.
CLOSE_NOTICE_SECONDS = 0.2

_CONNECTED_EVENT = getattr(zmq, "EVENT_HANDSHAKE_SUCCEEDED", zmq.EVENT_CONNECTED)


def _monitor_event(frames: list[bytes]) -> int:
    """The event number of a ZeroMQ monitor message (first frame: u16 event,
    u32 value). Parsed here because zmq.utils.monitor imports asyncio and ssl,
    about 5 MiB in every daemon."""
    return int.from_bytes(frames[0][:2], "little")


def pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


@dataclass
class CallContext:
    """What a handler knows about the call it serves."""

    method: str
    deadline: float
    request_id: str

    def remaining(self) -> float:
        return self.deadline - time.time()

    def check_deadline(self) -> None:
        if self.remaining() <= 0:
            raise DeadlineExceeded(f"{self.method}: deadline exceeded")


Handler = Callable[[dict[str, Any], CallContext], Any]


class RpcServer:
    def __init__(self, endpoint: str, service: str, workers: int = 64) -> None:
        self.endpoint = endpoint
        self.service = service
        self._handlers: dict[str, Handler] = {}
        self._context = zmq.Context.instance()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"{service}-rpc")
        self._reply_endpoint = f"inproc://rpc-replies-{id(self)}"
        self._local = threading.local()
        self._stop = threading.Event()
        self._router: zmq.Socket | None = None
        self._replies: zmq.Socket | None = None
        self._idle_trim = IdleTrim()
        self._in_flight = 0  # requests handed to the pool and not answered yet (I/O thread only)
        self.counts = CallCounts()

    def register(self, method: str, handler: Handler) -> None:
        self._handlers[method] = handler

    def methods(self) -> list[str]:
        return sorted(self._handlers)

    def bind(self) -> None:
        if self.endpoint.startswith("ipc://"):
            socket_path = Path(self.endpoint[len("ipc://") :])
            state.private_dir(socket_path.parent)
        self._replies = self._context.socket(zmq.PULL)
        self._replies.bind(self._reply_endpoint)
        self._router = self._context.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        # A reply to a client that went away must not block the I/O thread.
        self._router.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self._router.bind(self.endpoint)

    def stop(self) -> None:
        self._stop.set()

    def serve_forever(self) -> None:
        if self._router is None:
            self.bind()
        assert self._router is not None and self._replies is not None
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._replies, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                ready = poller.poll(200)
                if not ready:
                    self._idle_trim.maybe_trim(busy=self._in_flight > 0)
                    continue
                self._idle_trim.note_activity()
                for sock, _ in ready:
                    if sock is self._router:
                        frames = self._router.recv_multipart(zmq.NOBLOCK)
                        if len(frames) == 2:
                            self._in_flight += 1
                            self._pool.submit(self._handle, frames[0], frames[1])
                    else:
                        frames = self._replies.recv_multipart(zmq.NOBLOCK)
                        self._in_flight = max(0, self._in_flight - 1)
                        try:
                            self._router.send_multipart(frames, zmq.NOBLOCK)
                        except zmq.ZMQError:
                            pass
        finally:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._router.close(0)
            self._replies.close(0)

    def _push(self, identity: bytes, reply: dict[str, Any]) -> None:
        push = getattr(self._local, "push", None)
        if push is None:
            push = self._context.socket(zmq.PUSH)
            push.connect(self._reply_endpoint)
            self._local.push = push
        push.send_multipart([identity, pack(reply)])

    def _handle(self, identity: bytes, payload: bytes) -> None:
        request_id = ""
        try:
            request = unpack(payload)
            request_id = str(request.get("id", ""))
            method = str(request.get("method", ""))
            call = CallContext(method=method, deadline=float(request.get("deadline", 0)), request_id=request_id)
            handler = self._handlers.get(method)
            if handler is None:
                raise Unimplemented(f"{self.service} has no method {method!r}")
            call.check_deadline()
            self.counts.begin()
            try:
                result = handler(request.get("params") or {}, call)
                self.counts.end(method, "")
            except Exception as exc:
                self.counts.end(method, exc.kind if isinstance(exc, PyrioError) else "Internal")
                raise
            reply: dict[str, Any] = {"id": request_id, "result": result}
        except PyrioError as exc:
            reply = {"id": request_id, "error": exc.to_wire()}
        except Exception as exc:  # a bug must answer, not leave the caller waiting
            log.exception("unhandled error in %s", self.service)
            reply = {"id": request_id, "error": Internal(f"{type(exc).__name__}: {exc}").to_wire()}
        try:
            self._push(identity, reply)
        except Exception:
            log.exception("cannot send reply of request %s", request_id)


class CallCounts:
    """What a server did since it started, for metrics and `pyrio status`:
    calls by (method, error kind; "" for success), calls in flight, and the
    times of recent errors. Thread safe."""

    RECENT_SECONDS = 60.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_outcome: dict[tuple[str, str], int] = {}
        self._in_flight = 0
        self._recent_errors: collections.deque[float] = collections.deque()

    def begin(self) -> None:
        with self._lock:
            self._in_flight += 1

    def end(self, method: str, error_kind: str) -> None:
        now = time.monotonic()
        with self._lock:
            self._in_flight -= 1
            key = (method, error_kind)
            self._by_outcome[key] = self._by_outcome.get(key, 0) + 1
            if error_kind:
                self._recent_errors.append(now)
                self._trim(now)

    def _trim(self, now: float) -> None:
        while self._recent_errors and now - self._recent_errors[0] > self.RECENT_SECONDS:
            self._recent_errors.popleft()

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            self._trim(time.monotonic())
            return {
                "calls": [[method, kind, count] for (method, kind), count in sorted(self._by_outcome.items())],
                "in_flight": self._in_flight,
                "errors_last_minute": len(self._recent_errors),
            }


class _ClientSocket:
    """A DEALER socket to a server, with its connection monitor; one call uses it at a time."""

    def __init__(self, context: zmq.Context, endpoint: str) -> None:
        self.socket = context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        # Never queue a request for a server that is not connected: the
        # caller gets Unavailable instead of a late surprise execution.
        self.socket.setsockopt(zmq.IMMEDIATE, 1)
        self.socket.setsockopt(zmq.RECONNECT_IVL, 50)
        self.socket.setsockopt(zmq.RECONNECT_IVL_MAX, 500)
        # HANDSHAKE_SUCCEEDED, not CONNECTED: with IMMEDIATE a send fails
        # until the ZMTP handshake is done, which comes after the connect.
        self.monitor = self.socket.get_monitor_socket(_CONNECTED_EVENT | zmq.EVENT_DISCONNECTED)
        self.connected = False
        self.socket.connect(endpoint)

    def drain_monitor(self, timeout_ms: int = 0) -> bool:
        """Apply pending connection events; True when a disconnect was seen."""
        disconnected = False
        while self.monitor.poll(timeout_ms):
            timeout_ms = 0
            event = _monitor_event(self.monitor.recv_multipart())
            if event == _CONNECTED_EVENT:
                self.connected = True
            elif event == zmq.EVENT_DISCONNECTED:
                self.connected = False
                disconnected = True
        return disconnected

    def wait_connected(self, until: float, stopping: Callable[[], bool]) -> bool:
        self.drain_monitor()
        while not self.connected:
            remaining = until - time.time()
            if remaining <= 0 or stopping():
                return False
            self.drain_monitor(int(min(remaining, 0.1) * 1000) + 1)
        return True

    def close(self) -> None:
        try:
            self.socket.disable_monitor()
        except zmq.ZMQError:
            pass
        self.monitor.close(0)
        self.socket.close(0)


class RpcClient:
    """Calls one service. Thread safe; one instance per target service."""

    _counter = itertools.count()

    def __init__(self, endpoint: str, service: str, default_timeout: float = 30.0) -> None:
        self.endpoint = endpoint
        self.service = service
        self.default_timeout = default_timeout
        self._context = zmq.Context.instance()
        self._all_sockets: list[_ClientSocket] = []
        self._idle_sockets: list[_ClientSocket] = []
        self._lock = threading.Lock()
        self._closed = False

    @property
    def socket_count(self) -> int:
        return len(self._all_sockets)

    def _checkout(self, method: str) -> _ClientSocket:
        # The lock is also the memory barrier ZeroMQ asks for when a socket
        # moves from one thread to another.
        with self._lock:
            if self._closed:
                raise Unavailable(f"{self.service}.{method}: this process is stopping (its RPC client is closed)")
            if self._idle_sockets:
                return self._idle_sockets.pop()  # the most recent: likely connected
            sock = _ClientSocket(self._context, self.endpoint)
            self._all_sockets.append(sock)
            return sock

    def _checkin(self, sock: _ClientSocket, usable: bool) -> None:
        with self._lock:
            if usable and not self._closed:
                self._idle_sockets.append(sock)
                return
            self._all_sockets.remove(sock)
        sock.close()

    def close(self) -> None:
        """Close the idle sockets; calls still waiting end Unavailable within
        CLOSE_NOTICE_SECONDS and close their own socket.

        A ZeroMQ socket must never be closed while another thread polls it:
        libzmq aborts the whole process (it did, in test_rpc under load)."""
        with self._lock:
            self._closed = True
            idle, self._idle_sockets = self._idle_sockets, []
            for sock in idle:
                self._all_sockets.remove(sock)
        for sock in idle:
            sock.close()

    def _stopping(self) -> bool:
        return self._closed

    def _closed_error(self, method: str) -> Unavailable:
        return Unavailable(f"{self.service}.{method} was abandoned: the client was closed (this process is stopping)")

    def call(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        timeout: float | None = None,
        idempotent: bool = False,
    ) -> Any:
        """Call `method` and return its result, or raise the typed error.

        Raises Unavailable when the server is not reachable or goes away
        during a non-idempotent call, DeadlineExceeded when no answer came
        in time. An idempotent call is sent again after a reconnect.
        """
        sock = self._checkout(method)
        usable = True  # after an answer, a timeout, even a late reply still queued (ids tell them apart)
        try:
            return self._call(sock, method, params, timeout, idempotent)
        except zmq.ZMQError as exc:
            usable = False
            # The socket was closed under the call (the process is stopping)
            # or libzmq failed: either way the callee was not reached or its
            # answer is lost, which is Unavailable ("try again"), as after a
            # crash, never an internal error.
            raise Unavailable(f"{self.service}.{method} was abandoned: ZeroMQ error: {exc}") from None
        finally:
            self._checkin(sock, usable)

    def _call(
        self, sock: _ClientSocket, method: str, params: dict[str, Any] | None, timeout: float | None, idempotent: bool
    ) -> Any:
        deadline = time.time() + (self.default_timeout if timeout is None else timeout)
        request_id = f"{os.getpid()}-{next(self._counter)}"
        payload = pack({"id": request_id, "method": method, "params": params or {}, "deadline": deadline})
        grace_end = min(deadline, time.time() + CONNECT_GRACE_SECONDS)
        while True:
            if not sock.wait_connected(grace_end, self._stopping):
                if self._closed:
                    raise self._closed_error(method)
                if time.time() >= deadline:
                    raise DeadlineExceeded(f"{self.service}.{method}: deadline exceeded while connecting")
                raise Unavailable(f"{self.service} is not reachable at {self.endpoint}")
            try:
                sock.socket.send(payload, zmq.NOBLOCK)
            except zmq.Again:
                # Connected an instant ago but the pipe is not attached yet.
                if time.time() >= grace_end:
                    raise Unavailable(f"{self.service} is not accepting requests at {self.endpoint}") from None
                time.sleep(0.005)
                continue
            outcome = self._await_reply(sock, method, request_id, deadline)
            if outcome is not _RESEND:
                return outcome
            if not idempotent:
                raise Unavailable(f"{self.service} went away while handling {method}")
            grace_end = min(deadline, time.time() + RESEND_GRACE_SECONDS)
            log.info("%s went away during idempotent %s; sending it again", self.service, method)

    def _await_reply(self, sock: _ClientSocket, method: str, request_id: str, deadline: float) -> Any:
        poller = zmq.Poller()
        poller.register(sock.socket, zmq.POLLIN)
        poller.register(sock.monitor, zmq.POLLIN)
        while True:
            remaining = deadline - time.time()
            if remaining <= 0:
                raise DeadlineExceeded(f"{self.service}: no answer before the deadline")
            # In slices, so a close() from another thread is noticed.
            ready = dict(poller.poll(int(min(remaining, CLOSE_NOTICE_SECONDS) * 1000) + 1))
            if not ready and self._closed:
                raise self._closed_error(method)
            if sock.socket in ready:
                reply = unpack(sock.socket.recv(zmq.NOBLOCK))
                if reply.get("id") != request_id:
                    continue  # the late answer of an earlier call that timed out
                if "error" in reply:
                    raise error_from_wire(reply["error"])
                return reply.get("result")
            if sock.monitor in ready and sock.drain_monitor():
                # The reply may have arrived just before the disconnect.
                if sock.socket.poll(0):
                    continue
                return _RESEND


_RESEND = object()
