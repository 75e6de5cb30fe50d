"""The ZeroMQ RPC layer: typed errors across the wire and into gRPC codes,
deadlines, concurrency, and a server that dies or restarts under a client."""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import grpc
import pytest

from common.errors import ERROR_KINDS, DeadlineExceeded, Unavailable, Unimplemented
from common.rpc import RpcClient
from services.crigw.status import GRPC_CODE_BY_KIND, serve_cri_call
from tests.harness import REPO
from tests.rpc_test_server import build

EXPECTED_CODES = {
    "NotFound": grpc.StatusCode.NOT_FOUND,
    "AlreadyExists": grpc.StatusCode.ALREADY_EXISTS,
    "InvalidArgument": grpc.StatusCode.INVALID_ARGUMENT,
    "FailedPrecondition": grpc.StatusCode.FAILED_PRECONDITION,
    "Unavailable": grpc.StatusCode.UNAVAILABLE,
    "DeadlineExceeded": grpc.StatusCode.DEADLINE_EXCEEDED,
    "Unauthenticated": grpc.StatusCode.UNAUTHENTICATED,
    "PermissionDenied": grpc.StatusCode.PERMISSION_DENIED,
    "ResourceExhausted": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "Unimplemented": grpc.StatusCode.UNIMPLEMENTED,
    "Internal": grpc.StatusCode.INTERNAL,
}


@pytest.fixture
def workdir() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="pyrio-rpc-", dir="/tmp"))
    yield directory
    for path in directory.iterdir():
        path.unlink()
    directory.rmdir()


@pytest.fixture
def in_process_server(workdir: Path) -> Iterator[str]:
    endpoint = f"ipc://{workdir}/testd.sock"
    server = build(endpoint)
    server.bind()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield endpoint
    server.stop()
    thread.join(5)


class ServerProcess:
    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.rpc_test_server", self.endpoint],
            cwd=REPO,
            stdout=subprocess.PIPE,
        )
        assert self.process.stdout is not None
        assert self.process.stdout.readline().strip() == b"ready"

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)


@pytest.fixture
def server_process(workdir: Path) -> Iterator[ServerProcess]:
    server = ServerProcess(f"ipc://{workdir}/testd.sock")
    server.start()
    try:
        yield server
    finally:
        server.kill()


def test_round_trip_keeps_types(in_process_server: str) -> None:
    client = RpcClient(in_process_server, "testd", default_timeout=5)
    params = {"text": "é", "number": 2**40, "blob": b"\x00\xff", "list": [1, None, True], "nested": {"a": 1.5}}
    assert client.call("echo", params)["params"] == params
    client.close()


@pytest.mark.parametrize("kind", sorted(ERROR_KINDS))
def test_error_kind_crosses_the_wire(in_process_server: str, kind: str) -> None:
    client = RpcClient(in_process_server, "testd", default_timeout=5)
    with pytest.raises(ERROR_KINDS[kind]) as caught:
        client.call("fail", {"kind": kind, "message": f"a {kind} happened"})
    assert caught.value.message == f"a {kind} happened"
    client.close()


def test_every_error_kind_maps_to_its_grpc_code(in_process_server: str, workdir: Path) -> None:
    """A daemon's typed error reaches a gRPC client as the right status code."""
    assert GRPC_CODE_BY_KIND == EXPECTED_CODES
    client = RpcClient(in_process_server, "testd", default_timeout=5)

    def handler(request: bytes, context: grpc.ServicerContext) -> bytes:
        kind = request.decode()
        return serve_cri_call("Fail", lambda _req, _ctx: client.call("fail", {"kind": kind, "message": kind}), request, context)

    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("test.Errors", {"Fail": grpc.unary_unary_rpc_method_handler(handler)}),)
    )
    socket_path = workdir / "grpc.sock"
    server.add_insecure_port(f"unix:{socket_path}")
    server.start()
    try:
        with grpc.insecure_channel(f"unix://{socket_path}") as channel:
            call = channel.unary_unary("/test.Errors/Fail")
            for kind, code in EXPECTED_CODES.items():
                with pytest.raises(grpc.RpcError) as caught:
                    call(kind.encode(), timeout=5)
                assert caught.value.code() == code, kind
                assert caught.value.details() == kind
    finally:
        server.stop(0)
        client.close()


def test_unknown_method_is_unimplemented(in_process_server: str) -> None:
    client = RpcClient(in_process_server, "testd", default_timeout=5)
    with pytest.raises(Unimplemented, match="no method 'nope'"):
        client.call("nope")
    client.close()


def test_deadline_exceeded(in_process_server: str) -> None:
    client = RpcClient(in_process_server, "testd")
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        client.call("sleep", {"seconds": 3}, timeout=0.3)
    assert time.monotonic() - started < 2.5
    # The late answer of the timed-out call is not taken for the next call's.
    assert client.call("echo", {"n": 1}, timeout=5)["params"] == {"n": 1}
    client.close()


def test_slow_call_does_not_block_fast_ones(in_process_server: str) -> None:
    client = RpcClient(in_process_server, "testd", default_timeout=20)
    with ThreadPoolExecutor(max_workers=50) as pool:
        slow = pool.submit(client.call, "sleep", {"seconds": 4})
        time.sleep(0.1)
        fast = [pool.submit(client.call, "echo", {"n": n}) for n in range(49)]
        results = [future.result(timeout=15) for future in fast]
        # Every fast call is answered while the slow one is still running.
        assert not slow.done()
        assert [result["params"]["n"] for result in results] == list(range(49))
        assert slow.result(timeout=15)["slept"] == 4
    client.close()


def test_server_down_gives_unavailable_then_reconnects(server_process: ServerProcess) -> None:
    client = RpcClient(server_process.endpoint, "testd", default_timeout=10)
    first_pid = client.call("echo")["pid"]
    server_process.kill()
    started = time.monotonic()
    with pytest.raises(Unavailable):
        client.call("echo")
    assert time.monotonic() - started < 5
    server_process.start()
    second_pid = client.call("echo")["pid"]
    assert second_pid != first_pid
    client.close()


def test_in_flight_call_fails_fast_when_server_dies(server_process: ServerProcess) -> None:
    client = RpcClient(server_process.endpoint, "testd", default_timeout=30)
    client.call("echo")
    outcome: dict[str, object] = {}

    def call_slow() -> None:
        started = time.monotonic()
        try:
            client.call("sleep", {"seconds": 20})
        except Exception as exc:  # recorded for the assertions below
            outcome["error"] = exc
        outcome["seconds"] = time.monotonic() - started

    caller = threading.Thread(target=call_slow)
    caller.start()
    time.sleep(0.5)
    server_process.kill()
    caller.join(15)
    assert not caller.is_alive(), "the call hung after its server died"
    assert isinstance(outcome.get("error"), Unavailable)
    assert outcome["seconds"] < 10
    client.close()


def test_idempotent_call_is_retried_after_restart(server_process: ServerProcess) -> None:
    client = RpcClient(server_process.endpoint, "testd", default_timeout=30)
    client.call("echo")
    result: dict[str, object] = {}

    def call_slow() -> None:
        result["value"] = client.call("sleep", {"seconds": 2}, idempotent=True)

    caller = threading.Thread(target=call_slow)
    caller.start()
    time.sleep(0.5)
    old_pid = server_process.process.pid if server_process.process else 0
    server_process.kill()
    server_process.start()
    caller.join(20)
    assert not caller.is_alive()
    value = result["value"]
    assert isinstance(value, dict) and value["pid"] != old_pid
    client.close()


def test_server_survives_garbage_frames(in_process_server: str) -> None:
    import zmq

    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(in_process_server)
    sock.send(b"\xc1 not msgpack")
    assert sock.poll(5000)
    reply = sock.recv()
    sock.close(0)
    client = RpcClient(in_process_server, "testd", default_timeout=5)
    assert client.call("echo", {"ok": 1})["params"] == {"ok": 1}
    assert b"Internal" in reply
    client.close()


def test_call_in_flight_when_its_client_closes_is_unavailable(in_process_server: str) -> None:
    """A stopping crigw closes its clients while gRPC threads still wait in
    calls (issue 15 item 13): those calls end Unavailable, never with a raw
    ZMQError that the gateway would answer INTERNAL."""
    client = RpcClient(in_process_server, "testd")
    outcome: dict[str, BaseException | None] = {}

    def call() -> None:
        try:
            client.call("sleep", {"seconds": 5}, timeout=10)
            outcome["error"] = None
        except BaseException as exc:  # noqa: BLE001 - the test inspects whatever ends the call
            outcome["error"] = exc

    caller = threading.Thread(target=call)
    caller.start()
    time.sleep(0.5)
    client.close()
    caller.join(10)
    assert isinstance(outcome["error"], Unavailable), repr(outcome["error"])
    with pytest.raises(Unavailable):
        client.call("echo", {})


def test_sockets_are_pooled_not_kept_per_thread(in_process_server: str) -> None:
    """A thread that calls once and ends (a streaming session) leaves no socket
    behind: the client holds as many as calls ran at once."""
    client = RpcClient(in_process_server, "testd")
    try:
        for _ in range(30):
            caller = threading.Thread(target=client.call, args=("echo", {}))
            caller.start()
            caller.join(10)
        assert client.socket_count == 1
        with ThreadPoolExecutor(6) as pool:
            list(pool.map(lambda _: client.call("sleep", {"seconds": 0.3}), range(6)))
        assert client.socket_count <= 6
        assert client.call("echo", {"x": 1})["params"] == {"x": 1}
    finally:
        client.close()


_CLOSE_UNDER_CALLS = """
import sys, threading, time
sys.path.insert(0, sys.argv[1])
from common.errors import Unavailable
from common.rpc import RpcClient
from tests.rpc_test_server import build
server = build(sys.argv[2]); server.bind()
threading.Thread(target=server.serve_forever, daemon=True).start()
for round_ in range(30):
    client = RpcClient(sys.argv[2], "testd")
    errors = []
    def call():
        try:
            client.call("sleep", {"seconds": 2}, timeout=10)
            errors.append(None)
        except BaseException as exc:
            errors.append(exc)
    callers = [threading.Thread(target=call) for _ in range(8)]
    for caller in callers:
        caller.start()
    time.sleep(0.02 * (round_ % 5))
    client.close()
    for caller in callers:
        caller.join(10)
    assert len(errors) == 8 and all(isinstance(error, Unavailable) for error in errors), errors
print("ok")
"""


def test_closing_a_client_under_many_calls_never_aborts_the_process(workdir: Path) -> None:
    """Closing sockets that other threads poll made libzmq abort pytest under
    load: a closed client now leaves in-use sockets to their callers."""
    result = subprocess.run(
        [sys.executable, "-c", _CLOSE_UNDER_CALLS, str(Path(__file__).resolve().parents[1]), f"ipc://{workdir}/abort.sock"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", (result.returncode, result.stderr[-2000:])
