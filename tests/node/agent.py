"""The node guest's agent: runs the host's commands, over virtio-serial ports.

Baked into the guest image (stdlib only, Debian 12's python3) and started by
systemd early at boot. Each port `/dev/virtio-ports/pyrio.agent.N` carries
one command at a time, as JSON lines:

  host -> guest  {"id": ID, "argv": [...], "env": {...}, "cwd": DIR, "stdin": B64, "timeout": S}
                 {"id": ID, "op": "ping"}
  guest -> host  {"id": ID, "out": B64} / {"id": ID, "err": B64} ... then {"id": ID, "exit": CODE}
                 {"id": ID, "pong": BOOT_ID}

A command whose host side goes away (the port hangs up) is killed with its
process group, so an abandoned command does not linger. Frames carry the
request's id, so a client ignores what an earlier one left in the port.
"""

import base64
import glob
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time

PORT_GLOB = "/dev/virtio-ports/pyrio.agent.*"
CHUNK = 65536


def boot_id():
    with open("/proc/sys/kernel/random/boot_id") as handle:
        return handle.read().strip()


class Port:
    def __init__(self, path):
        self.path = path
        self.fd = os.open(path, os.O_RDWR)
        self.buffer = b""

    def send(self, frame):
        data = (json.dumps(frame) + "\n").encode()
        while data:
            try:
                written = os.write(self.fd, data)
            except OSError:
                return  # the host is gone: nobody to tell
            data = data[written:]

    def hung_up(self):
        events = select.poll()
        events.register(self.fd, select.POLLIN)
        return any(mask & select.POLLHUP and not mask & select.POLLIN for _, mask in events.poll(0))

    def requests(self):
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        idle = 0.05
        while True:
            while b"\n" in self.buffer:
                line, self.buffer = self.buffer.split(b"\n", 1)
                if line.strip():
                    try:
                        yield json.loads(line)
                    except ValueError:
                        continue
            ready = poller.poll(1000)
            if not ready:
                continue
            mask = ready[0][1]
            chunk = os.read(self.fd, CHUNK) if mask & select.POLLIN else b""
            if not chunk:
                # No host connected: the port reports a hang-up until one is,
                # so poll() cannot wait; back off (under emulation a busy
                # loop costs the guest a whole vCPU).
                self.buffer = b""
                time.sleep(idle)
                idle = min(idle * 2, 0.5)
                continue
            idle = 0.05
            self.buffer += chunk


def feed_stdin(pipe, data):
    try:
        pipe.write(data)
    except OSError:
        pass
    finally:
        try:
            pipe.close()
        except OSError:
            pass


def run(port, request):
    ident = request.get("id")
    env = dict(os.environ)
    env.update(request.get("env") or {})
    stdin_data = base64.b64decode(request["stdin"]) if request.get("stdin") is not None else None
    try:
        process = subprocess.Popen(
            request["argv"], cwd=request.get("cwd") or "/root", env=env, start_new_session=True,
            stdin=subprocess.PIPE if stdin_data is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except (OSError, KeyError, TypeError) as exc:
        port.send({"id": ident, "err": base64.b64encode(f"agent: cannot run: {exc}\n".encode()).decode()})
        port.send({"id": ident, "exit": 127})
        return
    if stdin_data is not None:
        threading.Thread(target=feed_stdin, args=(process.stdin, stdin_data), daemon=True).start()
    timeout = request.get("timeout")
    deadline = time.monotonic() + timeout if timeout else None
    streams = {process.stdout.fileno(): "out", process.stderr.fileno(): "err"}
    poller = select.poll()
    for fd in streams:
        poller.register(fd, select.POLLIN)
    poller.register(port.fd, 0)  # only its hang-up
    timed_out = False
    while streams:
        for fd, mask in poller.poll(500):
            if fd == port.fd:
                if mask & select.POLLHUP:
                    kill_group(process)
                    poller.unregister(port.fd)
                continue
            data = os.read(fd, CHUNK)
            if data:
                port.send({"id": ident, streams[fd]: base64.b64encode(data).decode()})
            else:
                poller.unregister(fd)
                del streams[fd]
        if deadline is not None and time.monotonic() > deadline and not timed_out:
            timed_out = True
            kill_group(process)
    code = process.wait()
    port.send({"id": ident, "exit": 128 - code if code < 0 else code, "timed_out": timed_out})


def kill_group(process):
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except OSError:
        pass


def serve(path):
    while True:
        try:
            port = Port(path)
            for request in port.requests():
                if request.get("op") == "ping":
                    port.send({"id": request.get("id"), "pong": boot_id()})
                else:
                    run(port, request)
        except Exception as exc:  # keep serving: the lane depends on this agent
            print(f"agent: {path}: {exc!r}", file=sys.stderr, flush=True)
            time.sleep(1)


def main():
    served = set()
    while True:
        for path in glob.glob(PORT_GLOB):
            if path not in served:
                served.add(path)
                threading.Thread(target=serve, args=(path,), daemon=True).start()
        time.sleep(0.2 if not served else 5)


if __name__ == "__main__":
    main()
