"""Protocol edges of the streaming server: SPDY control frames, refused streams, WebSocket
framing rules, resize parsing, the token cache. The happy paths are in test_streaming.py."""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import threading
import time

import pytest

from common.errors import ResourceExhausted
from services.crigw.streaming.remotecommand import RemoteStreams
from services.crigw.streaming.tokens import RequestCache
from tests.fixtures_streaming import LocalStreaming
from tests.harness import wait_until
from tests.streaming_client import PortForwardSession, SpdyClient, WebSocketClient, open_remote_command

# The client asserts on protocol violations in its read thread: make those fail the test.
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")


def test_spdy_ping_is_answered(local_streaming: LocalStreaming) -> None:
    session = open_remote_command(local_streaming.exec_url(["sleep", "1"], stderr=False), stdout=True, stderr=False)
    session.client.ping(7)
    assert session.client.pongs.get(timeout=5) == 7
    assert session.finish().exit_code == 0


def test_spdy_unknown_stream_type_is_refused(local_streaming: LocalStreaming) -> None:
    client = SpdyClient(local_streaming.exec_url(["true"]), ["v4.channel.k8s.io"])
    with pytest.raises(ConnectionResetError):
        client.create_stream({"streamType": "bogus"})
    client.close()


def test_port_forward_stream_without_port_is_refused(local_streaming: LocalStreaming) -> None:
    forward = PortForwardSession(local_streaming.port_forward_url([80]))
    with pytest.raises(ConnectionResetError):
        forward.client.create_stream({"streamType": "data", "requestID": "9"})
    with pytest.raises(ConnectionResetError):
        forward.client.create_stream({"streamType": "data", "port": "http", "requestID": "9"})
    forward.close()


def test_spdy_garbage_closes_the_connection(local_streaming: LocalStreaming) -> None:
    client = SpdyClient(local_streaming.exec_url(["sleep", "30"]), ["v4.channel.k8s.io"])
    # A control frame of SPDY version 2: a protocol error for a SPDY/3 server.
    client._send(struct.pack(">HHI", 0x8002, 1, 10) + b"\0" * 10)
    assert client.closed.wait(10)


def test_websocket_fragmented_message_and_unmasked_frame(local_streaming: LocalStreaming) -> None:
    ws = WebSocketClient(local_streaming.exec_url(["cat"], stdin=True), ["v5.channel.k8s.io"])
    # One stdin message in three fragments: binary (no FIN), continuation, continuation (FIN).
    for opcode, fin, piece in ((0x2, 0, b"\x00frag"), (0x0, 0, b"ment"), (0x0, 0x80, b"ed\n")):
        mask = os.urandom(4)
        ws.sock.sendall(bytes([fin | opcode, 0x80 | len(piece)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(piece)))
    ws.send_stream_close(0)
    assert ws.collect()[1] == b"fragmented\n"
    ws.close()

    ws = WebSocketClient(local_streaming.exec_url(["sleep", "30"]), ["v4.channel.k8s.io"])
    ws.sock.sendall(bytes([0x82, 2, 0, 0]))  # unmasked: a protocol error from a client
    assert ws.collect() is not None and ws.close_code == 1002
    ws.close()


def test_websocket_unsupported_protocol_is_refused(local_streaming: LocalStreaming) -> None:
    from tests.streaming_client import UpgradeRefused

    with pytest.raises(UpgradeRefused) as refused:
        WebSocketClient(local_streaming.exec_url(["true"]), ["v9.channel.k8s.io"])
    assert refused.value.status == 400


def test_resize_messages_split_across_reads() -> None:
    class Chunks:
        def __init__(self, chunks: list[bytes]) -> None:
            self.chunks = chunks

        def read(self, max_bytes: int = 65536) -> bytes:
            return self.chunks.pop(0) if self.chunks else b""

    payload = json.dumps({"Width": 80, "Height": 24}) + json.dumps({"Width": 100, "Height": 50}) + "\n"
    payload += '{"Width": 0, "Height": 5}\n{"Width": 120, "Height": 40}\n'
    raw = payload.encode()
    streams = RemoteStreams(version=4, tty=True, resize=Chunks([raw[:7], raw[7:30], raw[30:]]))  # type: ignore[arg-type]
    assert list(streams.resizes()) == [(80, 24), (100, 50), (120, 40)]


def test_request_cache_bounds_and_single_use() -> None:
    cache = RequestCache(ttl=60, max_in_flight=2)
    first = cache.insert("exec", {"n": 1})
    cache.insert("exec", {"n": 2})
    with pytest.raises(ResourceExhausted):
        cache.insert("exec", {"n": 3})
    assert cache.consume(first, "attach") is None, "a token only opens its own kind of URL"
    assert cache.consume(first, "exec") is None, "and a wrong use burns it"
    cache.insert("exec", {"n": 3})
    expiring = RequestCache(ttl=0.05)
    token = expiring.insert("portforward", {})
    time.sleep(0.1)
    assert expiring.consume(token, "portforward") is None


def test_many_concurrent_execs(local_streaming: LocalStreaming) -> None:
    from tests.streaming_client import spdy_exec

    results: list[bytes] = []
    lock = threading.Lock()

    def one(n: int) -> None:
        out = spdy_exec(local_streaming.exec_url(["echo", str(n)])).stdout
        with lock:
            results.append(out)

    threads = [threading.Thread(target=one, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(results) == sorted(b"%d\n" % n for n in range(8))


def test_http_request_without_upgrade_gets_an_answer_not_a_hang(local_streaming: LocalStreaming) -> None:
    with socket.create_connection(("127.0.0.1", local_streaming.server.port), timeout=10) as sock:
        sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 400")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl makes the test certificate")
def test_tls_streaming(streaming_target, tmp_path) -> None:
    from tests.fixtures_streaming import self_signed_certificate, start_local_streaming
    from tests.streaming_client import spdy_exec

    cert, key = self_signed_certificate(tmp_path)
    streaming = start_local_streaming(streaming_target, tls_cert_file=str(cert), tls_key_file=str(key))
    try:
        url = streaming.exec_url(["cat"], stdin=True)
        assert url.startswith("https://127.0.0.1:")
        payload = os.urandom(512 * 1024)
        assert spdy_exec(url, stdin=payload).stdout == payload
    finally:
        streaming.server.stop()


def test_streaming_config_is_checked(tmp_path) -> None:
    from common.config import ConfigError, load_config
    from common.config import StreamingSection
    from services.crigw.streaming.server import StreamingServer

    for bad in ("token_ttl = 0", "max_concurrent_streams = 0", 'tls_cert_file = "/x.pem"', "stream_idle_timeout = -1",
                "request_head_timeout = 0", "max_pending_connections = 0"):
        path = tmp_path / "pyrio.toml"
        path.write_text(f"[streaming]\n{bad}\n")
        with pytest.raises(ConfigError, match="streaming"):
            load_config(str(path))
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        with pytest.raises(RuntimeError, match="cannot serve on 127.0.0.1"):
            StreamingServer(StreamingSection(port=busy.getsockname()[1]), backend=None).start()  # type: ignore[arg-type]
    finally:
        busy.close()


def test_port_forward_session_forgets_finished_connections(local_streaming: LocalStreaming) -> None:
    # Many short connections on one long session must not pile up server-side state.
    local_streaming.target.start_detached("sh", "-c", "nc -ll -p 7500 -e cat")
    forward = PortForwardSession(local_streaming.port_forward_url([7500]))
    try:
        for n in range(30):
            reply, error = forward.exchange(7500, b"n%d\n" % n)
            if error:  # the listener may not be up for the first ones
                time.sleep(0.1)
                continue
            assert reply == b"n%d\n" % n
        from services.crigw.streaming.spdy import SpdyConnection

        def connections() -> list[SpdyConnection]:
            with local_streaming.server._sessions_lock:
                return [c for c in local_streaming.server._sessions if isinstance(c, SpdyConnection)]

        assert connections()
        # The server forgets a connection's streams once both sides closed,
        # which its pump threads see a moment after the client does.
        wait_until(lambda: all(len(c._streams) <= 2 for c in connections()), timeout=10,
                   what="finished port-forward streams forgotten")
    finally:
        forward.close()
