"""Unit-level tests of shimd and its shims, beside the end-to-end ones.

shimd runs in this process against stand-in netd and imaged RPC servers
(rootfs: a directory assembled from /bin/busybox, no image store), so the
shim, the OCI spec and the records are exercised with real runc without the
rest of the stack. tests/test_containers*.py cover the same ground through
the gateway socket with real images and pods.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from common.config import Config
from common.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from common.rpc import CallContext, RpcServer
from services.shimd import compact_json, oci_spec, spec_resources, spec_security, spec_users
from services.shimd.shim_client import REPOSITORY_ROOT, ZygoteProcess
from services.shimd.records import CREATED, EXITED, RUNNING
from services.shimd.shim_log import MAX_LOG_LINE, LogWriter
from tests.fixtures_containers import container_cgroup_file
from tests.harness import CGROUP_MANAGER, cleanup_root, private_cgroup_parent, wait_until

BUSYBOX = "/bin/busybox"
APPLETS = ["sh", "ls", "cat", "echo", "sleep", "id", "head", "dd", "printf", "true", "false", "touch", "grep", "tail", "wc", "yes"]


def make_rootfs(path: Path) -> Path:
    for directory in ("bin", "etc", "proc", "sys", "dev", "tmp", "home/app"):
        (path / directory).mkdir(parents=True, exist_ok=True)
    shutil.copy(BUSYBOX, path / "bin" / "busybox")
    for applet in APPLETS:
        os.symlink("busybox", path / "bin" / applet)
    (path / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n")
    (path / "etc" / "group").write_text("root:x:0:\napp:x:1000:\nextra:x:2000:app\n")
    return path


class StandIns:
    """netd's sandbox.status and imaged's rootfs.* for one test root."""

    def __init__(self, config: Config, root: Path) -> None:
        self.root = root
        self.image_configs: dict[str, dict[str, Any]] = {"busybox": {"Cmd": ["sh"]}}
        self.sandboxes: dict[str, dict[str, Any]] = {}
        self.servers = []
        for service, methods in (
            ("imaged", {"rootfs.prepare": self.prepare, "rootfs.remove": self.remove, "rootfs.usage": self.usage}),
            ("netd", {"sandbox.status": self.sandbox_status}),
        ):
            server = RpcServer(config.rpc_endpoint(service), service)
            for name, handler in methods.items():
                server.register(name, handler)
            server.bind()
            threading.Thread(target=server.serve_forever, daemon=True).start()
            self.servers.append(server)

    def prepare(self, params: dict[str, Any], call: CallContext) -> dict[str, Any]:
        rootfs = make_rootfs(self.root / "rootfs" / params["container_id"])
        image = params["image"]
        if image not in self.image_configs:
            raise NotFound(f"image {image!r} not known")
        return {"rootfs": str(rootfs), "image_id": "sha256:" + "ab" * 32, "image_name": image, "repo_digest": "", "config": self.image_configs[image]}

    def remove(self, params: dict[str, Any], call: CallContext) -> dict[str, Any]:
        shutil.rmtree(self.root / "rootfs" / params["container_id"], ignore_errors=True)
        return {}

    def usage(self, params: dict[str, Any], call: CallContext) -> dict[str, Any]:
        return {"used_bytes": 4096, "inodes_used": 3}

    def sandbox_status(self, params: dict[str, Any], call: CallContext) -> dict[str, Any]:
        try:
            return self.sandboxes[params["sandbox_id"]]
        except KeyError:
            raise NotFound(f"pod sandbox {params['sandbox_id']!r} not found") from None

    def stop(self) -> None:
        for server in self.servers:
            server.stop()


class Env:
    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="pyrio-shim-", dir="/tmp"))
        self.cgroup_parent = private_cgroup_parent(self.root.name[-6:].lower())
        config = Config()
        config.runtime.cgroup_manager = CGROUP_MANAGER
        config.pyrio.state_dir = str(self.root / "state")
        config.pyrio.run_dir = str(self.root / "run")
        config.runtime.cgroup_parent = self.cgroup_parent
        config.runtime.create_timeout = 20.0
        self.config = config.resolve()
        self.standins = StandIns(self.config, self.root)
        from services.shimd.service import ShimDaemon

        self.daemon = ShimDaemon(self.config)
        self.sandbox_id = "5a" * 32
        self.logs = self.root / "podlogs"
        self.standins.sandboxes[self.sandbox_id] = {
            "id": self.sandbox_id, "state": "ready", "metadata": {"name": "pod", "namespace": "ns", "uid": "u"},
            "hostname": "podhost", "namespaces": {}, "namespace_options": {"network": "NODE", "ipc": "POD", "pid": "CONTAINER"},
            "files": {}, "cgroup_parent": self.cgroup_parent, "log_directory": str(self.logs), "runtime_handler": "",
        }

    def call(self, method: str, **params: Any) -> Any:
        handler = getattr(self.daemon, method)
        return handler(params, CallContext(method=method, deadline=time.time() + 120, request_id="t"))

    def create(self, name: str = "c", image: str = "busybox", **config: Any) -> str:
        container = {"metadata": {"name": name}, "image": {"image": image}, "log_path": f"{name}.log", **config}
        return self.call("create", sandbox_id=self.sandbox_id, config=container, sandbox_config={})["container_id"]

    def run(self, name: str = "c", **config: Any) -> str:
        container_id = self.create(name, **config)
        self.call("start", container_id=container_id)
        return container_id

    def wait_exited(self, container_id: str, timeout: float = 20) -> dict[str, Any]:
        return wait_until(lambda: (s := self.call("status", container_id=container_id))["state"] == EXITED and s, timeout, what="exit")

    def log_lines(self, name: str = "c") -> list[str]:
        return (self.logs / f"{name}.log").read_text().splitlines()

    def close(self) -> None:
        for record in self.daemon.store.all():
            for pid in (record.get("shim_pid"), record.get("pid")):
                if pid:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
        self.standins.stop()
        self.daemon.close()
        cleanup_root(self.root, self.cgroup_parent, "pyrio-none")


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    own = Env()
    try:
        yield own
    finally:
        own.close()


# --- pieces --------------------------------------------------------------------


def test_log_writer_splits_long_lines_and_marks_cut_lines(tmp_path: Path) -> None:
    writer = LogWriter(str(tmp_path / "log"))
    writer.write(b"stdout", b"short\n" + b"x" * (MAX_LOG_LINE * 2 + 10) + b"\nhalf")
    writer.write(b"stderr", b"err\n")
    writer.flush_partial(b"stdout")
    lines = (tmp_path / "log").read_bytes().splitlines()
    parsed = [line.split(b" ", 3) for line in lines]
    assert [(p[1], p[2], len(p[3])) for p in parsed] == [
        (b"stdout", b"F", 5), (b"stdout", b"P", MAX_LOG_LINE), (b"stdout", b"P", MAX_LOG_LINE),
        (b"stdout", b"F", 10), (b"stderr", b"F", 3), (b"stdout", b"P", 4),
    ]
    assert all(p[0].endswith(b"Z") and len(p[0]) == 30 for p in parsed)


def test_process_args_follow_kubernetes_rules() -> None:
    image = {"Entrypoint": ["/ep"], "Cmd": ["c1"]}
    assert oci_spec.process_args({}, image) == ["/ep", "c1"]
    assert oci_spec.process_args({"args": ["a"]}, image) == ["/ep", "a"]
    assert oci_spec.process_args({"command": ["/x"]}, image) == ["/x"]
    assert oci_spec.process_args({"command": ["/x"], "args": ["a"]}, image) == ["/x", "a"]
    with pytest.raises(InvalidArgument):
        oci_spec.process_args({}, {})


def test_capabilities_add_drop_all() -> None:
    assert spec_security.capabilities(["CHOWN", "KILL"], {"capabilities": {"drop_capabilities": ["ALL"], "add_capabilities": ["NET_ADMIN"]}}) == ["CAP_NET_ADMIN"]
    assert "CAP_SYS_ADMIN" in spec_security.capabilities([], {"capabilities": {"add_capabilities": ["ALL"]}})
    assert spec_security.capabilities(["CHOWN", "KILL"], {"capabilities": {"drop_capabilities": ["kill"]}}) == ["CAP_CHOWN"]


def test_user_resolution(tmp_path: Path) -> None:
    rootfs = make_rootfs(tmp_path)
    user = spec_users.resolve_user(str(rootfs), {}, "app")
    assert (user.uid, user.gid, user.additional_gids, user.home) == (1000, 1000, [1000, 2000], "/home/app")
    assert spec_users.resolve_user(str(rootfs), {"run_as_user": {"value": 1000}, "run_as_group": {"value": 7}}, "").gid == 7
    assert spec_users.resolve_user(str(rootfs), {"run_as_user": {}}, "app").uid == 0
    assert spec_users.resolve_user(str(rootfs), {}, "123:456").gid == 456
    with pytest.raises(InvalidArgument):
        spec_users.resolve_user(str(rootfs), {"run_as_username": "nobody-here"}, "")


def test_oom_score_adj_clamped_to_own(env: Env) -> None:
    container_id = env.create("oomadj", command=["sleep", "1"], linux={"resources": {"oom_score_adj": -998}})
    spec = env.daemon._spec(env.daemon.store.get(container_id))
    assert spec["process"]["oomScoreAdj"] == spec_resources.own_oom_score_adj()
    env.call("remove", container_id=container_id)


# --- the daemon with real shims -------------------------------------------------------


def test_lifecycle_logs_exit_and_status(env: Env) -> None:
    container_id = env.create("life", command=["sh", "-c", "echo out; echo err >&2; printf cut; exit 3"])
    assert env.call("status", container_id=container_id)["state"] == CREATED
    env.call("start", container_id=container_id)
    status = env.wait_exited(container_id)
    assert (status["exit_code"], status["reason"]) == (3, "Error")
    assert status["finished_at"] >= status["started_at"] > status["created_at"] > 0
    lines = env.log_lines("life")
    assert [line.split(" ", 1)[1] for line in lines] == ["stdout F out", "stderr F err", "stdout P cut"] or sorted(
        line.split(" ", 1)[1] for line in lines) == sorted(["stdout F out", "stderr F err", "stdout P cut"])
    with pytest.raises(FailedPrecondition):
        env.call("exec_sync", container_id=container_id, cmd=["true"], timeout=5)
    env.call("stop", container_id=container_id, timeout=1)  # idempotent on exited
    env.call("remove", container_id=container_id)
    env.call("remove", container_id=container_id)
    with pytest.raises(NotFound):
        env.call("status", container_id=container_id)


def test_duplicate_name_is_already_exists(env: Env) -> None:
    container_id = env.create("dup", command=["true"])
    with pytest.raises(AlreadyExists) as caught:
        env.create("dup", command=["true"])
    assert container_id in str(caught.value)
    env.call("remove", container_id=container_id)


def test_exec_sync_output_exit_code_and_timeout(env: Env) -> None:
    container_id = env.run("exec", command=["sleep", "60"])
    reply = env.call("exec_sync", container_id=container_id, cmd=["sh", "-c", "echo hi; echo oops >&2; exit 4"], timeout=10)
    assert (reply["stdout"], reply["stderr"], reply["exit_code"]) == (b"hi\n", b"oops\n", 4)
    started = time.monotonic()
    from common.errors import DeadlineExceeded

    with pytest.raises(DeadlineExceeded):
        env.call("exec_sync", container_id=container_id, cmd=["sleep", "30"], timeout=1)
    assert time.monotonic() - started < 10
    env.call("stop", container_id=container_id, timeout=0)
    assert env.call("status", container_id=container_id)["exit_code"] == 137
    env.call("remove", container_id=container_id)


def test_stop_grace_then_kill(env: Env) -> None:
    container_id = env.run("grace", command=["sh", "-c", "trap '' TERM; while true; do sleep 0.1; done"])
    time.sleep(0.3)
    started = time.monotonic()
    env.call("stop", container_id=container_id, timeout=2)
    elapsed = time.monotonic() - started
    status = env.call("status", container_id=container_id)
    assert status["state"] == EXITED and status["exit_code"] == 137 and 1.5 < elapsed < 10
    env.call("remove", container_id=container_id)


def test_user_from_image_and_readonly_rootfs(env: Env) -> None:
    env.standins.image_configs["app-image"] = {"Cmd": ["sh", "-c", "id; touch /x || echo readonly"], "User": "app"}
    container_id = env.run("user", image="app-image", linux={"security_context": {"readonly_rootfs": True}})
    env.wait_exited(container_id)
    text = "\n".join(env.log_lines("user"))
    assert "uid=1000" in text and "gid=1000" in text and "2000" in text and "readonly" in text
    env.call("remove", container_id=container_id)


def test_reopen_log_after_rename(env: Env) -> None:
    container_id = env.run("rotate", command=["sh", "-c", "i=0; while true; do echo line$i; i=$((i+1)); sleep 0.05; done"])
    wait_until(lambda: (env.logs / "rotate.log").exists() and len(env.log_lines("rotate")) > 3, 10)
    os.rename(env.logs / "rotate.log", env.logs / "rotate.log.1")
    env.call("reopen_log", container_id=container_id)
    wait_until(lambda: (env.logs / "rotate.log").exists() and len(env.log_lines("rotate")) > 3, 10)
    env.call("stop", container_id=container_id, timeout=0)
    old = (env.logs / "rotate.log.1").read_text().splitlines()
    new = env.log_lines("rotate")
    numbers = [int(line.rsplit("line", 1)[1]) for line in old + new]
    assert numbers == list(range(len(numbers)))
    env.call("remove", container_id=container_id)


def test_update_resources_visible_in_cgroup(env: Env) -> None:
    container_id = env.run("update", command=["sleep", "60"], linux={"resources": {"memory_limit_in_bytes": 64 << 20}})
    record = env.daemon.store.get(container_id)
    memory = container_cgroup_file(record["cgroups_path"], "memory/memory.limit_in_bytes", "memory.max")
    assert int(memory.read_text()) == 64 << 20
    env.call("update_resources", container_id=container_id, linux={"memory_limit_in_bytes": 96 << 20, "cpu_quota": 50000, "cpu_period": 100000})
    assert int(memory.read_text()) == 96 << 20
    stats = env.call("stats", container_id=container_id)
    assert stats["memory"]["working_set_bytes"]["value"] > 0 and stats["writable_layer"]["used_bytes"]["value"] == 4096
    env.call("remove", container_id=container_id)


def test_shim_survives_and_exit_is_recorded_without_daemon(env: Env) -> None:
    container_id = env.run("outage", command=["sh", "-c", "sleep 1; exit 7"])
    from services.shimd.service import ShimDaemon

    # A second daemon over the same state is what a restarted shimd sees.
    time.sleep(2)
    restarted = ShimDaemon(env.config)
    status = restarted.status({"container_id": container_id}, CallContext("s", time.time() + 10, "r"))
    restarted.close()
    assert (status["state"], status["exit_code"]) == (EXITED, 7)
    env.call("remove", container_id=container_id)


def test_tty_container_attach(env: Env) -> None:
    import socket as socket_module

    container_id = env.run("tty", command=["sh"], tty=True, stdin=True, stdin_once=True)
    info = env.call("attach_info", container_id=container_id)
    assert info["running"] and info["tty"]
    client = socket_module.socket(socket_module.AF_UNIX, socket_module.SOCK_SEQPACKET)
    client.connect(info["attach_socket"])
    env.call("resize", container_id=container_id, width=100, height=40)
    client.send(b"stty size; echo hello-$((1+2))\n")
    received = b""
    deadline = time.monotonic() + 10
    client.settimeout(1)
    while b"hello-3" not in received and time.monotonic() < deadline:
        try:
            packet = client.recv(65536)
        except socket_module.timeout:
            continue
        assert packet[:1] == b"\x02"
        received += packet[1:]
    assert b"hello-3" in received and b"40 100" in received
    client.send(b"exit 0\n")
    env.wait_exited(container_id)
    client.close()
    env.call("remove", container_id=container_id)


def test_crun_handler_is_configured() -> None:
    config = Config().resolve()
    assert config.runtime_handler("crun").path == "/usr/bin/crun"
    assert RUNNING == 1


def test_attach_pipes_stdin_once_and_streams(env: Env) -> None:
    import socket as socket_module

    container_id = env.run("pipes", command=["sh", "-c", "cat; echo to-err >&2; echo stdin-closed"], stdin=True, stdin_once=True)
    info = env.call("attach_info", container_id=container_id)
    assert info["running"] and not info["tty"] and info["stdin_once"]
    client = socket_module.socket(socket_module.AF_UNIX, socket_module.SOCK_SEQPACKET)
    client.connect(info["attach_socket"])
    client.send(b"echoed-back\n")
    client.shutdown(socket_module.SHUT_WR)  # stdin EOF
    packets = []
    client.settimeout(10)
    while True:
        packet = client.recv(65536)
        if not packet:
            break  # the shim closes attach connections when the container exits
        packets.append(packet)
    client.close()
    stdout = b"".join(p[1:] for p in packets if p[:1] == b"\x02")
    stderr = b"".join(p[1:] for p in packets if p[:1] == b"\x03")
    assert stdout == b"echoed-back\nstdin-closed\n" and stderr == b"to-err\n"
    assert env.wait_exited(container_id)["exit_code"] == 0
    # Attached output also went to the log.
    assert [line.split(" ", 1)[1] for line in env.log_lines("pipes")][0] == "stdout F echoed-back"
    with pytest.raises(FailedPrecondition):
        env.call("resize", container_id=container_id, width=10, height=10)
    env.call("remove", container_id=container_id)


# --- the zygote ------------------------------------------------------------------

# Packages whose import would put their objects in every shim's address space.
HEAVY_MODULES = {"json", "re", "enum", "socket", "signal", "typing", "subprocess", "selectors", "threading", "pathlib", "common"}


def test_zygote_interpreter_loads_no_heavy_module() -> None:
    """The zygote's interpreter (python -I -S, as shim_client starts it) holds
    only the shim modules and small C modules: what every shim maps."""
    code = f"import sys; sys.path.insert(0, {str(REPOSITORY_ROOT)!r}); import services.shimd.zygote; print(' '.join(sys.modules))"
    loaded = set(subprocess.run([sys.executable, "-I", "-S", "-c", code], check=True, capture_output=True, text=True).stdout.split())
    assert "services.shimd.shim" in loaded and "services.shimd.shim_setup" in loaded
    assert {f"services.shimd.{module}" for module in ("shim_log", "shim_exit", "shim_control", "shim_exec", "shim_warm_up")} <= loaded
    assert not {name.split(".")[0] for name in loaded} & HEAVY_MODULES


def test_compact_json_matches_json() -> None:
    documents = [{"a": 1, "b": [1.5, None, True, "x\u00e9\n"], "c": {}}, [], "text", 3, {"exit": {"exit_code": 137}}]
    for document in documents:
        assert compact_json.dumps(document) == json.dumps(document).encode()
        assert compact_json.loads(json.dumps(document).encode()) == document
    for bad in (b"", b"{", b"{} trailing", b"nope"):
        with pytest.raises(ValueError):
            compact_json.loads(bad)


def _fake_runtime_spec(directory: Path, name: str) -> tuple[dict[str, Any], subprocess.Popen]:
    """A spec whose "runtime" is /bin/true and whose "container" a sleep."""
    directory.mkdir()
    container = subprocess.Popen(["sleep", "60"])
    (directory / "pid").write_text(str(container.pid))
    spec = {
        "container_id": name, "runtime_path": "/bin/true", "runtime_root": str(directory), "bundle": str(directory),
        "pid_file": str(directory / "pid"), "runtime_log": str(directory / "runtime.log"), "log_path": str(directory / "log"),
        "exit_file": str(directory / "exit.json"), "control_socket": str(directory / "ctl"),
        "attach_socket": str(directory / "attach"), "shim_log": str(directory / "shim.log"), "create_timeout": 10,
    }
    return spec, container


def _notify_lines(read_fd: int, timeout: float) -> list[dict[str, Any]]:
    """What a shim reported on its notify pipe, until it closed the pipe."""
    data = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not select.select([read_fd], [], [], 0.2)[0]:
            continue
        chunk = os.read(read_fd, 4096)
        if not chunk or data.count(b"\n") + chunk.count(b"\n") >= 2:
            data += chunk
            break
        data += chunk
    return [json.loads(line) for line in data.splitlines()]


def test_zygote_drops_a_spec_past_its_pickup_deadline(tmp_path: Path) -> None:
    """A spec shimd gave up on is never started, and the next spawn is not shifted by one."""
    zygote = ZygoteProcess(str(tmp_path))
    sleepers = []
    try:
        stale_spec, sleeper = _fake_runtime_spec(tmp_path / "stale", "stale")
        sleepers.append(sleeper)
        fresh_spec, sleeper = _fake_runtime_spec(tmp_path / "fresh", "fresh")
        sleepers.append(sleeper)
        stale_read, stale_write = os.pipe()
        zygote.spawn(stale_spec, stale_write, pickup_seconds=-1.0)
        os.close(stale_write)
        fresh_read, fresh_write = os.pipe()
        zygote.spawn(fresh_spec, fresh_write, pickup_seconds=10.0)
        os.close(fresh_write)
        fresh = _notify_lines(fresh_read, 20)
        assert fresh[0]["shim_pid"] > 0 and fresh[1] == {"ok": True, "pid": sleepers[1].pid}
        # The stale spec's pipe was closed unread: no shim, no sockets.
        assert _notify_lines(stale_read, 5) == []
        assert not (tmp_path / "stale" / "ctl").exists() and (tmp_path / "fresh" / "ctl").exists()
        os.kill(fresh[0]["shim_pid"], signal.SIGKILL)
    finally:
        for sleeper in sleepers:
            sleeper.kill()
            sleeper.wait()
        zygote.close()
        assert zygote.process.returncode == 0  # closing the token pipe ends it


def test_zygote_refuses_a_spec_it_could_not_receive_whole(tmp_path: Path) -> None:
    zygote = ZygoteProcess(str(tmp_path))
    read_fd, write_fd = os.pipe()
    try:
        with pytest.raises(InvalidArgument, match="over the"):
            zygote.spawn({"log_path": "/x" * 8192}, write_fd, pickup_seconds=10.0)
    finally:
        os.close(read_fd)
        os.close(write_fd)
        zygote.close()
