"""Boot the node guest and run commands in it (host side). See docs/NODE.md.

A `Guest` boots the cached image (tests/node/image.py) through a qcow2
overlay in a temporary directory, with KVM, no network device at all, and
these read-only 9p shares: the repository checkout at /mnt/pyrio, the shared
node tools (crictl, kubelet) at /mnt/shared-bin, the offline wheels at
/mnt/wheels; plus a writable exchange directory at /mnt/exchange. Commands
run through the guest agent (tests/node/agent.py) over virtio-serial ports,
one command per port at a time; an flock per port lets several processes of
the host share one guest.

    python -m tests.node.guest up            # boot (in the background)
    python -m tests.node.guest run -- CMD    # exit code and output of CMD in the guest
    python -m tests.node.guest down          # power off, remove the overlay and the temp dir
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Sequence

from tests.node.image import REPO, GuestImage, ensure_image

AGENT_PORTS = 4
def shared_bin() -> Path | None:
    """../shared/bin of the checkout (or of a parent: worktrees sit one level deeper); $PYRIO_SHARED_BIN first."""
    if os.environ.get("PYRIO_SHARED_BIN"):
        return Path(os.environ["PYRIO_SHARED_BIN"])
    for parent in REPO.parents:
        if (parent / "shared" / "bin").is_dir():
            return parent / "shared" / "bin"
    return None



GUEST_REPO = "/mnt/pyrio"
KERNEL_ARGS = ("root=/dev/vda rw console=ttyS0 panic=-1 systemd.unified_cgroup_hierarchy=1 "
               "cgroup_no_v1=all systemd.show_status=0 loglevel=4")


class GuestError(RuntimeError):
    pass


@dataclass
class Result:
    argv: list[str]
    exit_code: int
    stdout: str
    stderr: str
    timed_out: bool = False

    def check(self) -> "Result":
        if self.exit_code != 0:
            raise GuestError(f"in the guest, {shlex.join(self.argv)} exited {self.exit_code}"
                             f"{' (timed out)' if self.timed_out else ''}:\n{self.stdout[-4000:]}{self.stderr[-4000:]}")
        return self


def require_kvm() -> None:
    """The node lane needs KVM: without it the lane fails (a lane that skips proves nothing)."""
    if not os.path.exists("/dev/kvm"):
        raise GuestError("/dev/kvm is absent: the node lane boots a KVM guest and cannot run on this machine "
                         "(enable KVM / nested virtualisation, or run the lane elsewhere)")
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR))
    except OSError as exc:
        raise GuestError(f"/dev/kvm cannot be opened ({exc}): the node lane needs KVM") from exc


def accelerator() -> str:
    """kvm where /dev/kvm runs an unmodified kernel; tcg (emulation) otherwise.

    $PYRIO_GUEST_ACCEL (kvm or tcg) overrides. A PVM host (the kvm_pvm module: KVM
    without VMX/SVM, for guests built as PVM guests) has a /dev/kvm on which the
    Debian kernel never gets past its first instructions, so the guest is emulated.
    """
    chosen = os.environ.get("PYRIO_GUEST_ACCEL")
    if chosen in ("kvm", "tcg"):
        return chosen
    if Path("/sys/module/kvm_pvm").exists() and not any(
            Path(f"/sys/module/{module}").exists() for module in ("kvm_intel", "kvm_amd")):
        return "tcg"
    return "kvm"


def boot_timeout() -> float:
    return float(os.environ.get("PYRIO_GUEST_BOOT_TIMEOUT", 180 if accelerator() == "kvm" else 900))


def accelerator_args() -> list[str]:
    if accelerator() == "kvm":
        return ["-machine", "q35,accel=kvm", "-enable-kvm", "-cpu", "host"]
    return ["-machine", "q35", "-accel", "tcg,thread=multi,tb-size=512", "-cpu", "max"]


class Guest:
    """One booted guest; its state (overlay, sockets, console log) lives in `state_dir`."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir

    # --- life cycle ---------------------------------------------------------

    @classmethod
    def boot(cls, state_dir: Path | None = None, memory_mib: int = 3072, cpus: int = 2,
             timeout: float | None = None) -> "Guest":
        require_kvm()
        image = ensure_image()
        if state_dir is None:
            state_dir = Path(tempfile.mkdtemp(prefix="pyrio-guest-", dir="/tmp"))
        state_dir.mkdir(parents=True, exist_ok=True)
        guest = cls(state_dir)
        try:
            guest._start_qemu(image, memory_mib, cpus)
            started = time.monotonic()
            guest.wait_agent(timeout or boot_timeout())
            guest._write_meta(boot_seconds=round(time.monotonic() - started, 2))
        except BaseException:
            guest.destroy()
            raise
        return guest

    def _start_qemu(self, image: GuestImage, memory_mib: int, cpus: int) -> None:
        overlay = self.state_dir / "overlay.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(image.disk),
                        str(overlay)], check=True)
        exchange = self.state_dir / "exchange"
        exchange.mkdir(exist_ok=True)
        shares = {"pyrio": (REPO, True), "wheels": (image.wheels, True), "exchange": (exchange, False)}
        tools = shared_bin()
        if tools is not None:
            shares["shared-bin"] = (tools, True)
        argv = [
            "qemu-system-x86_64", "-name", f"pyrio-node,process=pyrio-node-{self.state_dir.name}",
            *accelerator_args(), "-smp", str(cpus), "-m", str(memory_mib),
            "-nodefaults", "-no-user-config", "-display", "none", "-nic", "none",
            "-kernel", str(image.kernel), "-initrd", str(image.initrd), "-append", KERNEL_ARGS,
            "-drive", f"file={overlay},if=virtio,format=qcow2,cache=unsafe,discard=unmap",
            "-chardev", f"file,id=console,path={self.state_dir / 'console.log'}", "-serial", "chardev:console",
            "-device", "virtio-rng-pci",
            "-device", "virtio-serial-pci,id=vser",
            "-qmp", f"unix:{self.state_dir / 'qmp.sock'},server=on,wait=off",
            "-pidfile", str(self.state_dir / "qemu.pid"), "-daemonize",
        ]
        for index in range(AGENT_PORTS):
            argv += ["-chardev", f"socket,id=agent{index},path={self.agent_socket(index)},server=on,wait=off",
                     "-device", f"virtserialport,bus=vser.0,chardev=agent{index},name=pyrio.agent.{index}"]
        for tag, (path, readonly) in shares.items():
            argv += ["-fsdev", f"local,id=fs-{tag},path={path},security_model=none" + (",readonly=on" if readonly else ""),
                     "-device", f"virtio-9p-pci,fsdev=fs-{tag},mount_tag={tag}"]
        (self.state_dir / "qemu.argv").write_text(shlex.join(argv) + "\n")
        done = subprocess.run(argv, capture_output=True, text=True)
        if done.returncode != 0:
            raise GuestError(f"qemu did not start ({done.returncode}): {done.stderr.strip()}")

    def _write_meta(self, **values: object) -> None:
        meta_path = self.state_dir / "meta.json"
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        meta.update(values)
        meta_path.write_text(json.dumps(meta))

    @property
    def meta(self) -> dict:
        path = self.state_dir / "meta.json"
        return json.loads(path.read_text()) if path.exists() else {}

    @property
    def qemu_pid(self) -> int | None:
        try:
            return int((self.state_dir / "qemu.pid").read_text())
        except (OSError, ValueError):
            return None

    def qemu_alive(self) -> bool:
        pid = self.qemu_pid
        if pid is None:
            return False
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False
        return self.state_dir.name.encode() in cmdline

    def agent_socket(self, index: int) -> Path:
        return self.state_dir / f"agent{index}.sock"

    def console_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join((self.state_dir / "console.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no console log)"

    def wait_agent(self, timeout: float, previous_boot: str | None = None) -> str:
        """Wait until the agent answers (from a boot other than `previous_boot`); its boot id."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.qemu_alive():
                raise GuestError(f"the guest's qemu exited; console:\n{self.console_tail()}")
            try:
                boot = self.ping(timeout=2.0)
                if boot != previous_boot:
                    return boot
            except (OSError, GuestError, TimeoutError):
                pass
            time.sleep(0.2)
        raise GuestError(f"the guest agent did not answer within {timeout:.0f}s; console:\n{self.console_tail()}")

    def reboot(self, timeout: float | None = None) -> float:
        """Reboot the guest (systemd's reboot, same overlay); seconds until the agent answers again."""
        previous = self.ping()
        started = time.monotonic()
        self.run(["systemctl", "reboot"], timeout=30)
        self.wait_agent(timeout or boot_timeout(), previous_boot=previous)
        return time.monotonic() - started

    def shutdown(self, timeout: float = 60.0) -> None:
        """Power the guest off (killing qemu after `timeout`), then remove the state directory."""
        if self.qemu_alive():
            try:
                self.run(["systemctl", "poweroff"], timeout=10)
            except (OSError, GuestError, TimeoutError):
                pass
            deadline = time.monotonic() + timeout
            while self.qemu_alive() and time.monotonic() < deadline:
                time.sleep(0.2)
        self.destroy()

    def destroy(self) -> None:
        pid = self.qemu_pid
        if pid is not None and self.qemu_alive():
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while self.qemu_alive() and time.monotonic() < deadline:
                time.sleep(0.1)
        shutil.rmtree(self.state_dir, ignore_errors=True)

    # --- commands -----------------------------------------------------------

    def _connect(self, timeout: float) -> tuple[socket.socket, IO]:
        """A free agent port (its lock held while the socket is open)."""
        deadline = time.monotonic() + timeout
        while True:
            for index in range(AGENT_PORTS):
                lock = open(self.state_dir / f"agent{index}.lock", "w")
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    lock.close()
                    continue
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.connect(str(self.agent_socket(index)))
                except OSError:
                    sock.close()
                    lock.close()
                    raise
                return sock, lock
            if time.monotonic() > deadline:
                raise TimeoutError("every agent port of the guest stayed busy")
            time.sleep(0.1)

    def _exchange(self, request: dict, timeout: float | None, out: IO[bytes] | None = None,
                  err: IO[bytes] | None = None) -> dict:
        request = {"id": uuid.uuid4().hex, **request}
        sock, lock = self._connect(timeout=60.0)
        try:
            sock.sendall((json.dumps(request) + "\n").encode())
            sock.settimeout(timeout)
            buffer = b""
            while True:
                while b"\n" not in buffer:
                    try:
                        chunk = sock.recv(65536)
                    except socket.timeout as exc:
                        raise TimeoutError(f"no answer from the guest agent within {timeout}s") from exc
                    if not chunk:
                        raise GuestError("the guest agent's port closed (qemu exited?)")
                    buffer += chunk
                line, buffer = buffer.split(b"\n", 1)
                try:
                    frame = json.loads(line)
                except ValueError:
                    continue  # the rest of a frame an earlier client left behind
                if frame.get("id") != request["id"]:
                    continue
                if "out" in frame and out is not None:
                    out.write(base64.b64decode(frame["out"]))
                    out.flush()
                elif "err" in frame and err is not None:
                    err.write(base64.b64decode(frame["err"]))
                    err.flush()
                elif "exit" in frame or "pong" in frame:
                    return frame
        finally:
            sock.close()
            lock.close()

    def ping(self, timeout: float = 5.0) -> str:
        """The guest's boot id (the agent answers)."""
        return self._exchange({"op": "ping"}, timeout)["pong"]

    def run(self, argv: Sequence[str] | str, *, timeout: float | None = 600.0, env: dict[str, str] | None = None,
            cwd: str | None = None, input: bytes | None = None, check: bool = False,
            stream: bool = False) -> Result:
        """Run a command in the guest (a string runs through sh -c); its exit code and output.

        `timeout` kills the command's process group in the guest (exit 137, timed_out); `stream`
        copies its output to this process's stdout/stderr as it comes.
        """
        argv = ["/bin/sh", "-c", argv] if isinstance(argv, str) else list(argv)
        out_buffer, err_buffer = _Tee(sys.stdout if stream else None), _Tee(sys.stderr if stream else None)
        request: dict = {"argv": argv, "env": env, "cwd": cwd, "timeout": timeout}
        if input is not None:
            request["stdin"] = base64.b64encode(input).decode()
        # The agent enforces `timeout`; the socket waits a little longer for its last frame.
        frame = self._exchange(request, None if timeout is None else timeout + 30, out_buffer, err_buffer)
        result = Result(argv, frame["exit"], out_buffer.text(), err_buffer.text(), frame.get("timed_out", False))
        return result.check() if check else result

    def write_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self.run(["sh", "-c", 'mkdir -p "$(dirname "$1")" && cat > "$1" && chmod "$2" "$1"', "sh", path, f"{mode:o}"],
                 input=data, check=True)

    def read_file(self, path: str) -> str:
        return self.run(["cat", path], check=True).stdout

    @property
    def exchange_dir(self) -> Path:
        """The host side of the guest's writable /mnt/exchange."""
        return self.state_dir / "exchange"


class _Tee:
    def __init__(self, echo: IO[str] | None) -> None:
        self.echo = echo.buffer if echo is not None and hasattr(echo, "buffer") else None
        self.chunks: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.chunks.append(data)
        if self.echo is not None:
            self.echo.write(data)

    def flush(self) -> None:
        if self.echo is not None:
            self.echo.flush()

    def text(self) -> str:
        return b"".join(self.chunks).decode(errors="replace")


# --- command line ---------------------------------------------------------------


def default_name() -> str:
    """One guest per checkout by default: each worktree gets its own."""
    return REPO.name


def named_state_dir(name: str) -> Path:
    # On disk, not in /run (tmpfs): the overlay grows with images and containers.
    return Path(tempfile.gettempdir()) / f"pyrio-guest-{name}"


def main(args: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.node.guest", description=__doc__.split("\n")[0])
    parser.add_argument("--name", default=default_name(), help="which guest (default: this checkout's directory name)")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("build", help="build (or find in the cache) the guest image")
    up = commands.add_parser("up", help="boot the guest in the background")
    up.add_argument("--memory", type=int, default=3072, help="MiB")
    up.add_argument("--cpus", type=int, default=2)
    run = commands.add_parser("run", help="run a command in the guest; exits with its exit code")
    run.add_argument("--timeout", type=float, default=3600.0)
    run.add_argument("--cwd")
    run.add_argument("argv", nargs=argparse.REMAINDER)
    commands.add_parser("reboot", help="reboot the guest and wait for it")
    commands.add_parser("down", help="power the guest off and remove its overlay and state")
    commands.add_parser("status", help="whether the guest runs; its state directory and boot time")
    options = parser.parse_args(args)
    state_dir = named_state_dir(options.name)
    try:
        if options.command == "build":
            print(ensure_image())
            return 0
        guest = Guest(state_dir)
        if options.command == "up":
            if guest.qemu_alive():
                print(f"guest {options.name} already runs ({state_dir})")
                return 0
            shutil.rmtree(state_dir, ignore_errors=True)
            guest = Guest.boot(state_dir, memory_mib=options.memory, cpus=options.cpus)
            print(f"guest {options.name} up in {guest.meta['boot_seconds']}s (state in {state_dir})")
            return 0
        if options.command == "status":
            alive = guest.qemu_alive()
            print(json.dumps({"name": options.name, "running": alive, "state_dir": str(state_dir), **guest.meta}))
            return 0 if alive else 1
        if not guest.qemu_alive():
            if options.command == "down":
                guest.destroy()
                return 0
            raise GuestError(f"guest {options.name} is not running: `python -m tests.node.guest up` first")
        if options.command == "run":
            argv = options.argv[1:] if options.argv[:1] == ["--"] else options.argv
            if not argv:
                parser.error("run: no command given")
            command: Sequence[str] | str = argv[0] if len(argv) == 1 and " " in argv[0] else argv
            return guest.run(command, timeout=options.timeout, cwd=options.cwd, stream=True).exit_code
        if options.command == "reboot":
            print(f"rebooted in {guest.reboot():.1f}s")
            return 0
        if options.command == "down":
            guest.shutdown()
            return 0
    except GuestError as exc:
        print(f"guest: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
