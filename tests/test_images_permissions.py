"""No host user but root may reach what an image brought.

A pulled image can hold a setuid-root program or a 0666 device node; if a
host user could reach either through the image store, a mounted rootfs or a
service's state directory, any image would be a local root exploit. The
stack's root is opened to 0755 here, as /var/lib and /run are on a node, and
an unprivileged process (uid/gid 65534, no groups) then looks for them both
by the paths it could guess and by listing every directory it may read.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
from typing import Any, Iterator

import pytest

from tests.fixtures_containers import Containers, TestImages
from tests.harness import Stack
from tests.oci_images import BUSYBOX_PATH, Device, File, Layer, build_and_push, busybox_layer, tar_layer

NOBODY = 65534

# Run by the system python as nobody: reports, as JSON, each given path it
# could stat and each setuid file or device node it found by listing.
PROBE = r"""
import json, os, stat, sys
guessed, roots = json.loads(sys.argv[1])
reachable = []
for path in guessed:
    try:
        os.stat(path)
        reachable.append(path)
    except OSError:
        pass
listed = []
for root in roots:
    for directory, dirs, files in os.walk(root, onerror=lambda error: None):
        for name in dirs + files:
            path = os.path.join(directory, name)
            try:
                mode = os.lstat(path).st_mode
            except OSError:
                continue
            if mode & stat.S_ISUID or stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
                listed.append(path)
print(json.dumps({"reachable": reachable, "listed": listed}))
"""


def probe_as_nobody(guessed: list[str], roots: list[str]) -> dict[str, list[str]]:
    result = subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "/usr/bin/python3", "-c", PROBE,
         json.dumps([guessed, roots])],
        capture_output=True, text=True, timeout=60, check=True,
    )
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def open_stack() -> Iterator[Stack]:
    """A stack whose root others may traverse, with a store an older pyrio
    left 0755 (the mode it used to make), to be closed at start."""
    own = Stack()
    try:
        os.chmod(own.root, 0o755)
        legacy = own.state_dir / "imaged" / "layers"
        legacy.mkdir(parents=True, mode=0o755)
        for directory in (legacy, legacy.parent, own.state_dir, own.run_dir):
            os.chmod(directory, 0o755)
        own.start()
        yield own
    finally:
        own.stop()


def test_a_setuid_program_and_a_device_node_of_an_image_are_out_of_reach_of_host_users(
    open_stack: Stack, registry: Any, test_images: TestImages
) -> None:
    with open(BUSYBOX_PATH, "rb") as handle:
        busybox = handle.read()
    hostile = Layer(tar_layer([File("bin/rootshell", busybox, 0o4755), Device("opt/open-null", "char", 1, 3, 0o666)]))
    image = build_and_push(registry, "pyrio/setuid-and-device", "v1", layers=[busybox_layer(), hostile],
                           config={"Cmd": ["sleep", "3600"]})
    own = Containers(open_stack, test_images)
    try:
        pod = own.pod()
        as_app = own.config("app", image=image.reference)
        as_app.linux.security_context.run_as_user.value = 1000
        app_container = own.create(pod, as_app)
        own.start(app_container)
        root_container = own.create(pod, own.config("root", image=image.reference))
        own.start(root_container)

        # Containers still run, a non-root one included: it can traverse its "/".
        reply = own.exec(app_container, "sh", "-c", "id -u; ls / >/dev/null && cat /etc/passwd >/dev/null && echo ok")
        assert (reply.exit_code, reply.stdout.decode().split()) == (0, ["1000", "ok"]), reply.stderr
        reply = own.exec(root_container, "sh", "-c", "id -u; test -u /bin/rootshell && test -c /opt/open-null && echo ok")
        assert (reply.exit_code, reply.stdout.decode().split()) == (0, ["0", "ok"]), reply.stderr

        store = open_stack.state_dir / "imaged"
        layer_diff = store / "layers" / hostile.diff_id.split(":", 1)[1] / "diff"
        guessed = [
            str(layer_diff / "bin" / "rootshell"),
            str(layer_diff / "opt" / "open-null"),
            *(str(store / "rootfs" / cid / "merged" / "bin" / "rootshell") for cid in (app_container, root_container)),
            *(str(store / "rootfs" / cid / "merged" / "opt" / "open-null") for cid in (app_container, root_container)),
        ]
        # The paths are right: root reaches every one of them.
        assert all(os.path.exists(path) for path in guessed)
        found = probe_as_nobody(guessed, [str(open_stack.state_dir), str(open_stack.run_dir)])
        assert found == {"reachable": [], "listed": []}
    finally:
        own.cleanup()


def test_state_store_and_run_directories_are_closed_at_start(open_stack: Stack) -> None:
    store = open_stack.state_dir / "imaged"
    # The top directories are traverse-only; each service's own, and every
    # directory of the store (one an older pyrio made 0755 included), root's only.
    expected = {open_stack.state_dir: 0o711, open_stack.run_dir: 0o711}
    for service in ("imaged", "netd", "shimd"):
        expected[open_stack.state_dir / service] = 0o700
    for name in ("blobs", "blobs/sha256", "layers", "l", "images", "containers", "rootfs", "tmp"):
        expected[store / name] = 0o700
    expected[open_stack.run_dir / "rpc"] = 0o700
    modes = {path: stat.S_IMODE(os.stat(path).st_mode) for path in expected}
    assert modes == expected
    for layer in (store / "layers").iterdir():
        assert stat.S_IMODE(layer.stat().st_mode) == 0o700, layer
