"""A pod's user namespace (hostUsers: false) and its other namespaces inside it.

A multithreaded process can neither unshare nor setns a user namespace, so
netd starts a one-off child process (this module's `child_main`, a fresh
single-threaded interpreter). The child unshares a user namespace; netd
writes its uid_map and gid_map (as root of the parent namespace, so setgroups
stays allowed) and pins it; the child then unshares the pod's network, IPC and
UTS namespaces, which the user namespace owns, sets the hostname, brings `lo`
up and writes the sysctls; netd pins those too, and the child exits. As with
the other pins, the bind mounts keep the namespaces alive with no process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from common.errors import Internal, InvalidArgument
from common.userns import id_map_text
from services.netd import namespaces

CLONE_NEWUSER = 0x10000000
CHILD_TIMEOUT_SECONDS = 30.0
# The repository root, for the child's imports.
_ROOT = str(Path(__file__).resolve().parents[2])


def pin_in_user_namespace(paths: dict[str, str], userns: dict[str, Any], hostname: str = "",
                          sysctls: dict[str, str] | None = None) -> None:
    """Create and pin the pod's user namespace at paths["user"] with the
    mappings of `userns`, and the namespaces of the other kinds in `paths`
    (net, ipc, uts) inside it. On error the pins made so far stay: the
    caller's `unpin` removes them."""
    kinds = [kind for kind in ("net", "ipc", "uts") if kind in paths]
    request = {"kinds": kinds, "hostname": hostname if "uts" in paths else "", "sysctls": sysctls or {}}
    child = subprocess.Popen(
        [sys.executable, "-c", "from services.netd.userns import child_main; child_main()", json.dumps(request)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=_ROOT,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": _ROOT}, close_fds=True,
    )
    try:
        _expect(child, "unshared")
        for name, key in (("uid_map", "uids"), ("gid_map", "gids")):
            with open(f"/proc/{child.pid}/{name}", "w") as handle:
                handle.write(id_map_text(userns[key]))
        namespaces.bind_pin(f"/proc/{child.pid}/ns/user", paths["user"])
        _send(child, "mapped")
        _expect(child, "ready")
        for kind in kinds:
            namespaces.bind_pin(f"/proc/{child.pid}/ns/{kind}", paths[kind])
        _send(child, "pinned")
        child.wait(CHILD_TIMEOUT_SECONDS)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        for stream in (child.stdin, child.stdout, child.stderr):
            if stream is not None:
                stream.close()


def _send(child: subprocess.Popen, word: str) -> None:
    assert child.stdin is not None
    child.stdin.write(word + "\n")
    child.stdin.flush()


def _expect(child: subprocess.Popen, word: str) -> None:
    assert child.stdout is not None
    line = child.stdout.readline().strip()
    if line == word:
        return
    if line.startswith("invalid "):
        raise InvalidArgument(line[len("invalid "):])
    child.kill()
    error = (child.stderr.read() if child.stderr is not None else "").strip()[-2000:]
    raise Internal(f"cannot create the pod's user namespace ({line or 'no answer'}): {error}")


def child_main() -> None:
    """The child: unshare the user namespace, wait for its mappings, then the rest."""
    request = json.loads(sys.argv[1])
    namespaces.unshare(CLONE_NEWUSER)
    print("unshared", flush=True)
    if sys.stdin.readline().strip() != "mapped":
        sys.exit(1)
    # Root of the new namespace, so the pod's files and sysctls are its own.
    os.setgroups([])
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)
    flags = 0
    for kind in request["kinds"]:
        flags |= namespaces.CLONE_FLAGS[kind]
    if flags:
        namespaces.unshare(flags)
    try:
        namespaces.configure_pod_namespaces(request["kinds"], request["hostname"], request["sysctls"])
    except InvalidArgument as exc:
        print(f"invalid {exc}", flush=True)
        sys.exit(1)
    print("ready", flush=True)
    sys.stdin.readline()
