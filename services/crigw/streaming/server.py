"""The streaming HTTP server crigw runs for Exec, Attach and PortForward.

Like the kubelet's streaming server: the CRI call stores the request under a
random single-use token and answers `<base>/{exec,attach,portforward}/<token>`;
the client then upgrades that URL to SPDY/3.1 or WebSocket. A token is
consumed by its first use, only works on the kind of URL it was made for,
and expires after `streaming.token_ttl`; anything else is a 404 and never a
stream. At most `max_concurrent_streams` sessions run at once (429 past
that), and a session with no traffic for `stream_idle_timeout` is closed.
Connections are accepted and their request heads read without a thread
each, under a deadline and a cap (request_heads.py).
"""

from __future__ import annotations

import io
import logging
import socket
import ssl
import threading
import time
from typing import Any, BinaryIO, Protocol

from common.config import StreamingSection
from common.errors import PyrioError
from services.crigw.streaming import portforward, remotecommand, websocket
from services.crigw.streaming.http_messages import HttpRequest, http_response, read_http_request
from services.crigw.streaming.portforward import Dialer
from services.crigw.streaming.remotecommand import RemoteStreams, StreamOptions
from services.crigw.streaming.request_heads import RequestHeadReader, session_reader
from services.crigw.streaming.spdy import SpdyConnection
from services.crigw.streaming.tokens import RequestCache

log = logging.getLogger("pyrio.crigw.streaming")

KINDS = ("exec", "attach", "portforward")
# How long a client has, after the upgrade, to open the streams it asked for.
STREAM_CREATION_TIMEOUT = 30.0
SPDY_UPGRADE = "spdy/3.1"
# The kubelet's words for a session that failed for another reason than the command's exit code.
FAILURE_PREFIX = {"exec": "error executing command in container", "attach": "error attaching to container"}


class SessionBackend(Protocol):
    """What a session needs from the rest of pyrio (implemented over RPC in backends.py)."""

    def exec(self, request: dict[str, Any], streams: RemoteStreams, cancelled: threading.Event) -> dict[str, Any]: ...

    def attach(self, request: dict[str, Any], streams: RemoteStreams, cancelled: threading.Event) -> dict[str, Any]: ...

    def port_dialer(self, request: dict[str, Any]) -> Dialer: ...


class StreamingServer:
    def __init__(self, config: StreamingSection, backend: SessionBackend) -> None:
        self.config = config
        self.backend = backend
        self.cache = RequestCache(config.token_ttl)
        self._listener: socket.socket | None = None
        self._tls: ssl.SSLContext | None = None
        self._stopping = threading.Event()
        self._sessions_lock = threading.Lock()
        self._sessions: set[Any] = set()
        self._slots = threading.BoundedSemaphore(config.max_concurrent_streams)
        self._heads: RequestHeadReader | None = None
        self.port = 0

    # --- lifecycle -------------------------------------------------------

    def start(self) -> "StreamingServer":
        address = self.config.address
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((address, self.config.port))
            listener.listen(128)
            if self.config.tls_cert_file:
                self._tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                self._tls.minimum_version = ssl.TLSVersion.TLSv1_2
                self._tls.load_cert_chain(self.config.tls_cert_file, self.config.tls_key_file or None)
        except (OSError, ssl.SSLError) as exc:
            listener.close()
            raise RuntimeError(
                f"streaming server cannot serve on {address}:{self.config.port}: {exc} "
                "(check [streaming] address, port, tls_cert_file and tls_key_file)"
            ) from exc
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._heads = RequestHeadReader(
            listener, self._tls, self.config.request_head_timeout, self.config.max_pending_connections, self._on_head
        )
        threading.Thread(target=self._heads.run, name="streaming-accept", daemon=True).start()
        threading.Thread(target=self._idle_reaper, name="streaming-idle", daemon=True).start()
        log.info("streaming server listening", extra={"url": self.base_url})
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._heads is not None:
            self._heads.stop()
        if self._listener is not None:
            self._listener.close()
        with self._sessions_lock:
            sessions = list(self._sessions)
        for connection in sessions:
            _shutdown_socket(connection.sock)

    @property
    def base_url(self) -> str:
        scheme = "https" if self._tls else "http"
        host = self.config.address
        if host in ("0.0.0.0", "::", ""):
            host = socket.gethostname()
        if ":" in host:
            host = f"[{host}]"
        return f"{scheme}://{host}:{self.port}"

    def url_for(self, kind: str, request: dict[str, Any]) -> str:
        return f"{self.base_url}/{kind}/{self.cache.insert(kind, request)}"

    # --- connections -----------------------------------------------------

    def _on_head(self, sock: socket.socket, head: bytes, rest: bytes) -> None:
        threading.Thread(target=self._serve_connection, args=(sock, head, rest), name="streaming-conn", daemon=True).start()

    def _idle_reaper(self) -> None:
        while not self._stopping.wait(1.0):
            limit = self.config.stream_idle_timeout
            now = time.monotonic()
            with self._sessions_lock:
                idle = [conn for conn in self._sessions if now - conn.last_activity > limit]
            for connection in idle:
                log.info("closing idle stream connection", extra={"idle_seconds": round(now - connection.last_activity)})
                _shutdown_socket(connection.sock)

    def _serve_connection(self, sock: socket.socket, head: bytes, rest: bytes) -> None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                request = read_http_request(io.BytesIO(head))
            except ValueError:
                sock.sendall(http_response(400, "Bad Request", body="malformed HTTP request\n"))
                return
            if request is None:
                return
            self._route(sock, session_reader(sock, rest), request)
        except (OSError, ssl.SSLError) as exc:
            log.debug("stream connection ended: %s", exc)
        except Exception:
            log.exception("streaming connection failed")
        finally:
            _shutdown_socket(sock)
            sock.close()

    def _route(self, sock: socket.socket, reader: BinaryIO, request: HttpRequest) -> None:
        parts = request.path.strip("/").split("/")
        if request.method not in ("GET", "POST") or len(parts) != 2 or parts[0] not in KINDS:
            sock.sendall(http_response(404, "Not Found", body="404 page not found\n"))
            return
        kind, token = parts
        # Checked before the token is spent, so a refused client may retry with it.
        if not self._slots.acquire(blocking=False):
            sock.sendall(
                http_response(429, "Too Many Requests", [("Retry-After", "1")], body="too many concurrent streams\n")
            )
            return
        started = time.monotonic()
        stored = None
        try:
            stored = self.cache.consume(token, kind)
            if stored is None:
                sock.sendall(http_response(404, "Not Found", body="404 page not found\n"))
                return
            self._upgrade(sock, reader, request, kind, stored)
        finally:
            self._slots.release()
            if stored is not None:
                target = stored.get("container_id") or stored.get("pod_sandbox_id", "")
                log.info(
                    "stream session ended",
                    extra={"kind": kind, "target": target, "duration_ms": round((time.monotonic() - started) * 1000, 1)},
                )

    def _upgrade(self, sock: socket.socket, reader: BinaryIO, request: HttpRequest, kind: str, stored: dict) -> None:
        if request.is_upgrade("websocket"):
            if kind == "portforward":
                self._websocket_port_forward(sock, reader, request, stored)
            else:
                self._websocket_remote_command(sock, reader, request, kind, stored)
        elif request.is_upgrade(SPDY_UPGRADE):
            if kind == "portforward":
                self._spdy_port_forward(sock, reader, request, stored)
            else:
                self._spdy_remote_command(sock, reader, request, kind, stored)
        else:
            sock.sendall(http_response(400, "Bad Request", body="unable to upgrade: missing upgrade headers in request\n"))

    def _run_session(self, connection: Any) -> threading.Thread:
        with self._sessions_lock:
            self._sessions.add(connection)
        thread = threading.Thread(target=connection.serve, name="streaming-read", daemon=True)
        thread.start()
        return thread

    def _end_session(self, connection: Any) -> None:
        connection.close()
        with self._sessions_lock:
            self._sessions.discard(connection)

    # --- SPDY ------------------------------------------------------------

    def _spdy_handshake(self, sock: socket.socket, request: HttpRequest, supported: tuple[str, ...]) -> str | None:
        offered = request.header_values("X-Stream-Protocol-Version")
        if not offered:
            sock.sendall(
                http_response(400, "Bad Request", body="unable to upgrade: X-Stream-Protocol-Version is required\n")
            )
            return None
        chosen = next((protocol for protocol in offered if protocol in supported), None)
        if chosen is None:
            accepted = [("X-Accepted-Stream-Protocol-Versions", protocol) for protocol in supported]
            body = f"unable to upgrade: unable to negotiate protocol: client supports {offered}, server accepts {list(supported)}\n"
            sock.sendall(http_response(403, "Forbidden", accepted, body=body))
            return None
        sock.sendall(
            http_response(
                101,
                "Switching Protocols",
                [("Connection", "Upgrade"), ("Upgrade", "SPDY/3.1"), ("X-Stream-Protocol-Version", chosen)],
            )
        )
        return chosen

    def _spdy_remote_command(self, sock: socket.socket, reader: BinaryIO, request: HttpRequest, kind: str, stored: dict) -> None:
        protocol = self._spdy_handshake(sock, request, remotecommand.SPDY_PROTOCOLS)
        if protocol is None:
            return
        options = _stream_options(stored)
        collector = remotecommand.SpdyStreamCollector(options, remotecommand.PROTOCOL_NUMBER[protocol])
        connection = SpdyConnection(sock, reader, collector.on_stream)
        self._run_session(connection)
        try:
            try:
                streams = collector.wait(STREAM_CREATION_TIMEOUT, connection.closed)
            except TimeoutError as exc:
                log.info("%s session ended: %s", kind, exc)
                return
            self._run_remote_command(kind, stored, streams, connection.closed)
        finally:
            self._end_session(connection)

    def _spdy_port_forward(self, sock: socket.socket, reader: BinaryIO, request: HttpRequest, stored: dict) -> None:
        if self._spdy_handshake(sock, request, (portforward.PROTOCOL,)) is None:
            return
        self._serve_spdy_port_forward(sock, reader, stored)

    def _serve_spdy_port_forward(self, sock: Any, reader: Any, stored: dict) -> None:
        """portforward.k8s.io over an upgraded socket or over a WebSocket tunnel."""
        try:
            dialer = self.backend.port_dialer(stored)
        except PyrioError as exc:
            dialer = _failing_dialer(str(exc))
        forward = portforward.SpdyPortForward(
            dialer, stored.get("pod_sandbox_id", ""), STREAM_CREATION_TIMEOUT, self.config.max_concurrent_streams
        )
        connection = SpdyConnection(sock, reader, forward.on_stream)
        self._run_session(connection)
        try:
            while not connection.closed.wait(1.0):
                forward.expire_incomplete()
        finally:
            self._end_session(connection)

    # --- WebSocket ---------------------------------------------------------

    def _websocket_handshake(self, sock: socket.socket, request: HttpRequest, supported: tuple[str, ...]) -> str | None:
        key = request.header("Sec-WebSocket-Key")
        if not key or request.header("Sec-WebSocket-Version") != "13":
            sock.sendall(
                http_response(400, "Bad Request", [("Sec-WebSocket-Version", "13")], body="unsupported WebSocket handshake\n")
            )
            return None
        offered = websocket.offered_protocols(",".join(request.headers.get("sec-websocket-protocol", [])))
        chosen = websocket.choose_protocol(offered, supported)
        if chosen is None:
            body = f"requested protocol(s) are not supported: {offered}; supports {list(supported)}\n"
            sock.sendall(http_response(400, "Bad Request", body=body))
            return None
        headers = [("Upgrade", "websocket"), ("Connection", "Upgrade"), ("Sec-WebSocket-Accept", websocket.accept_key(key))]
        if chosen:
            headers.append(("Sec-WebSocket-Protocol", chosen))
        sock.sendall(http_response(101, "Switching Protocols", headers))
        return chosen

    def _websocket_remote_command(
        self, sock: socket.socket, reader: BinaryIO, request: HttpRequest, kind: str, stored: dict
    ) -> None:
        supported = websocket.BINARY_PROTOCOLS + websocket.BASE64_PROTOCOLS
        protocol = self._websocket_handshake(sock, request, supported)
        if protocol is None:
            return
        options = _stream_options(stored)
        channels = [(options.stdin, False), (False, options.stdout), (False, options.stderr), (False, True), (True, False)]
        connection = websocket.ChannelConnection(sock, reader, protocol, channels)
        stdin, stdout, stderr, error, resize = connection.channels
        version = 5 if protocol.startswith("v5.") else 4 if protocol.startswith("v4.") else 1
        streams = RemoteStreams(
            version=version,
            tty=options.tty,
            stdin=stdin if options.stdin else None,
            stdout=stdout if options.stdout else None,
            stderr=stderr if options.stderr else None,
            error=error,
            resize=resize if options.tty else None,
        )
        self._run_session(connection)
        try:
            # As the kubelet: an empty message on the lowest writable channel
            # tells the client the session is established.
            (streams.stdout or streams.stderr or error).write(b"")
            self._run_remote_command(kind, stored, streams, connection.closed)
        finally:
            self._end_session(connection)

    def _websocket_port_forward(self, sock: socket.socket, reader: BinaryIO, request: HttpRequest, stored: dict) -> None:
        offered = websocket.offered_protocols(",".join(request.headers.get("sec-websocket-protocol", [])))
        if websocket.TUNNEL_PROTOCOL in offered:
            if self._websocket_handshake(sock, request, (websocket.TUNNEL_PROTOCOL,)) is not None:
                tunnel = websocket.TunnelConnection(sock, reader)
                self._serve_spdy_port_forward(tunnel, tunnel, stored)
            return
        ports = [int(port) for port in stored.get("port", [])]
        if not ports:
            try:
                ports = [portforward.parse_port(p) for value in request.query.get("port", []) for p in value.split(",")]
            except ValueError as exc:
                sock.sendall(http_response(400, "Bad Request", body=f"{exc}\n"))
                return
        if not ports:
            sock.sendall(http_response(400, "Bad Request", body='query parameter "port" is required\n'))
            return
        protocol = self._websocket_handshake(sock, request, ("", "v4.channel.k8s.io", "v4.base64.channel.k8s.io"))
        if protocol is None:
            return
        connection = websocket.ChannelConnection(sock, reader, protocol, [(True, True), (False, True)] * len(ports))
        try:
            dialer = self.backend.port_dialer(stored)
        except PyrioError as exc:
            dialer = _failing_dialer(str(exc))
        self._run_session(connection)
        try:
            relays = []
            for index, port in enumerate(ports):
                data, error = connection.channels[2 * index], connection.channels[2 * index + 1]
                prefix = portforward.websocket_port_prefix(port)
                data.write(prefix)
                error.write(prefix)
                relay = threading.Thread(
                    target=portforward.relay,
                    args=(data, error, port, dialer, stored.get("pod_sandbox_id", "")),
                    daemon=True,
                )
                relay.start()
                relays.append(relay)
            for relay in relays:
                while relay.is_alive() and not connection.closed.is_set():
                    relay.join(0.5)
        finally:
            self._end_session(connection)

    # --- exec / attach ---------------------------------------------------

    def _run_remote_command(self, kind: str, stored: dict, streams: RemoteStreams, cancelled: threading.Event) -> None:
        try:
            if kind == "exec":
                status = self.backend.exec(stored, streams, cancelled)
            else:
                status = self.backend.attach(stored, streams, cancelled)
        except PyrioError as exc:
            status = remotecommand.status_internal_error(f"{FAILURE_PREFIX[kind]}: {exc}")
        except Exception as exc:
            log.exception("%s session failed", kind)
            status = remotecommand.status_internal_error(f"{FAILURE_PREFIX[kind]}: {exc}")
        if cancelled.is_set():
            return
        streams.close_outputs()
        streams.write_status(status)


def _stream_options(stored: dict[str, Any]) -> StreamOptions:
    return StreamOptions(
        stdin=bool(stored.get("stdin")),
        stdout=bool(stored.get("stdout")),
        stderr=bool(stored.get("stderr")),
        tty=bool(stored.get("tty")),
    )


def _failing_dialer(message: str) -> Dialer:
    def dial(port: int) -> socket.socket:
        raise OSError(message)

    return dial


def _shutdown_socket(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
