"""Build the node guest's disk image and kernel, cached outside the clone.

The image is a Debian 12 root filesystem made by mmdebstrap (systemd as PID
1, the runtimes, CNI plugins, the registry and Python), written into an ext4
file with `mke2fs -d` (no loop mount) and converted to qcow2. The kernel and
initramfs are the Debian kernel package's, copied out of the root filesystem
so QEMU boots them directly. Everything is keyed by a hash of the build
inputs (this file and the guest agent): a change rebuilds, a rerun reuses.

Python packages come as wheels, downloaded on the host (Debian 12's Python
is 3.11 on both sides) into a cache keyed by pyproject.toml, because the
guest has no network at all.
"""

from __future__ import annotations

import fcntl
import hashlib
import lzma
import os
import shutil
import subprocess
import sys
import time
import tomllib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[2]
NODE_DIR = Path(__file__).resolve().parent
CACHE_ROOT = Path(os.environ.get("PYRIO_NODE_CACHE", "/var/cache/pyrio-node"))
SUITE = "bookworm"
MIRRORS = (
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
)
# What a node runs (the Makefile's RUN_PACKAGES), what the tests add, and
# what the guest itself needs: systemd as init, udev (loads the 9p and
# virtio modules), the Debian kernel and its initramfs.
GUEST_PACKAGES = (
    "systemd", "systemd-sysv", "udev", "dbus", "libpam-systemd", "kmod",
    "linux-image-amd64", "initramfs-tools",
    "runc", "crun", "containernetworking-plugins", "iproute2", "iptables", "busybox-static",
    "util-linux", "mount", "procps", "psmisc", "less",
    "python3", "python3-venv", "python3-dev", "make", "rsync",
    "docker-registry", "apache2-utils", "openssl", "ca-certificates",
)
DISK_SIZE = "8G"
# In the guest: a venv with pyrio's dependencies and test extras (not pyrio).
DEPS_VENV = "/opt/pyrio-deps"
HOST_TOOLS = {"mmdebstrap": "mmdebstrap", "mke2fs": "e2fsprogs", "qemu-img": "qemu-utils",
              "qemu-system-x86_64": "qemu-system-x86"}

FSTAB = """\
/dev/vda / ext4 rw,relatime 0 1
pyrio /mnt/pyrio 9p trans=virtio,version=9p2000.L,ro,nofail,x-systemd.device-timeout=10s 0 0
shared-bin /mnt/shared-bin 9p trans=virtio,version=9p2000.L,ro,nofail,x-systemd.device-timeout=10s 0 0
wheels /mnt/wheels 9p trans=virtio,version=9p2000.L,ro,nofail,x-systemd.device-timeout=10s 0 0
exchange /mnt/exchange 9p trans=virtio,version=9p2000.L,rw,nofail,x-systemd.device-timeout=10s 0 0
"""

INITRAMFS_HOOK = """\
#!/bin/sh
[ "$1" = prereqs ] && exit 0
. /usr/share/initramfs-tools/hook-functions
manual_add_modules virtio_pci virtio_blk ext4 crc32c_generic
"""

AGENT_UNIT = """\
[Unit]
Description=pyrio node lane agent (runs the host's commands, over virtio-serial)
After=systemd-udevd.service local-fs.target
DefaultDependencies=no
Before=sysinit.target

[Service]
ExecStart=/usr/bin/python3 /usr/local/lib/pyrio-guest-agent.py
Restart=always
RestartSec=1
# The agent's children are the host's commands: they must not die with it.
KillMode=process

[Install]
WantedBy=sysinit.target
"""

# In the guest: the 9p modules before the mounts, no timers or services the
# lane does not use (Debian's docker-registry would bind :5000).
CUSTOMIZE = r"""
set -e
root="$1"
echo pyrio-node > "$root/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 pyrio-node\n::1 localhost\n' > "$root/etc/hosts"
printf '9p\n9pnet_virtio\nvirtio_console\noverlay\nbr_netfilter\n' > "$root/etc/modules-load.d/pyrio-node.conf"
mkdir -p "$root/mnt/pyrio" "$root/mnt/shared-bin" "$root/mnt/wheels" "$root/mnt/exchange"
chroot "$root" passwd -d root
for unit in docker-registry.service apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer man-db.timer; do
    chroot "$root" systemctl disable "$unit" >/dev/null 2>&1 || true
done
chroot "$root" systemctl enable pyrio-guest-agent.service
chroot "$root" systemctl mask systemd-networkd-wait-online.service >/dev/null 2>&1 || true
rm -f "$root/etc/machine-id" && touch "$root/etc/machine-id"
"""


@dataclass(frozen=True)
class GuestImage:
    """A built image in the cache: boot it through an overlay, never write it."""

    disk: Path
    kernel: Path
    initrd: Path
    wheels: Path


def missing_host_tools() -> list[str]:
    return sorted({pkg for tool, pkg in HOST_TOOLS.items() if shutil.which(tool) is None})


def ensure_host_tools() -> None:
    missing = missing_host_tools()
    if missing:
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
                       check=True, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


def image_key() -> str:
    digest = hashlib.sha256()
    for path in (Path(__file__), NODE_DIR / "agent.py"):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def python_requirements() -> list[str]:
    """pyrio's dependencies, its test extras and its build backend: what the guest installs offline."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    requirements = list(project["project"]["dependencies"])
    for extra in project["project"].get("optional-dependencies", {}).values():
        requirements += extra
    requirements += project["build-system"]["requires"]
    return requirements + ["pip", "wheel"]


def wheels_key() -> str:
    return hashlib.sha256("\n".join(sorted(python_requirements())).encode()).hexdigest()[:16]


@contextmanager
def cache_lock() -> Iterator[None]:
    """One build at a time on this machine (several worktrees share the cache)."""
    CACHE_ROOT.mkdir(parents=True, exist_ok=True)
    with open(CACHE_ROOT / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def log(message: str) -> None:
    print(f"[node-image] {message}", file=sys.stderr, flush=True)


def build_wheels(target: Path) -> None:
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    # `pip wheel` builds what has no wheel (same Python on host and guest).
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--wheel-dir", str(partial),
                    *python_requirements()], check=True)
    partial.rename(target)


def build_rootfs(rootfs: Path, wheels: Path) -> None:
    hook_dir = rootfs.parent / "hooks"
    hook_dir.mkdir(exist_ok=True)
    (hook_dir / "customize.sh").write_text(CUSTOMIZE)
    (hook_dir / "fstab").write_text(FSTAB)
    (hook_dir / "pyrio-node-modules").write_text(INITRAMFS_HOOK)
    (hook_dir / "pyrio-node-modules").chmod(0o755)
    (hook_dir / "pyrio-guest-agent.service").write_text(AGENT_UNIT)
    shutil.copy(NODE_DIR / "agent.py", hook_dir / "pyrio-guest-agent.py")
    (hook_dir / "requirements.txt").write_text("\n".join(python_requirements()) + "\n")
    # A small initramfs (only what mounts the root disk) before the kernel
    # package runs update-initramfs: under emulation every megabyte is seconds.
    hooks = [
        "--setup-hook=mkdir -p \"$1/etc/initramfs-tools/conf.d\"",
        "--setup-hook=echo MODULES=list > \"$1/etc/initramfs-tools/conf.d/pyrio-node.conf\"",
        "--setup-hook=mkdir -p \"$1/etc/initramfs-tools/hooks\"",
        f"--setup-hook=copy-in {hook_dir / 'pyrio-node-modules'} /etc/initramfs-tools/hooks",
        f"--customize-hook=copy-in {hook_dir / 'fstab'} /etc",
        f"--customize-hook=copy-in {hook_dir / 'pyrio-guest-agent.service'} /etc/systemd/system",
        f"--customize-hook=copy-in {hook_dir / 'pyrio-guest-agent.py'} /usr/local/lib",
        f"--customize-hook=sh {hook_dir / 'customize.sh'} \"$1\"",
        # pyrio's dependencies in a venv made at build time, natively: in the
        # emulated guest, ensurepip and pip alone take many minutes.
        "--customize-hook=mkdir -p \"$1/tmp/pyrio-wheels\"",
        f"--customize-hook=sync-in {wheels} /tmp/pyrio-wheels",
        f"--customize-hook=copy-in {hook_dir / 'requirements.txt'} /tmp",
        f"--customize-hook=chroot \"$1\" python3 -m venv {DEPS_VENV}",
        f"--customize-hook=chroot \"$1\" {DEPS_VENV}/bin/pip install -q --no-index --find-links /tmp/pyrio-wheels "
        "-r /tmp/requirements.txt",
        "--customize-hook=rm -rf \"$1/tmp/pyrio-wheels\" \"$1/tmp/requirements.txt\"",
    ]
    subprocess.run(["mmdebstrap", "--mode=root", "--variant=apt", "--format=directory",
                    "--include=" + ",".join(GUEST_PACKAGES), *hooks, SUITE, str(rootfs), *MIRRORS],
                   check=True)


def uncompressed_kernel(bzimage: bytes) -> bytes:
    """The ELF kernel inside a Debian bzImage (xz-compressed payload)."""
    offset = bzimage.find(b"\xfd7zXZ\x00")
    if offset < 0:
        raise RuntimeError("the kernel image has no xz payload")
    elf = lzma.LZMADecompressor().decompress(bzimage[offset:])
    if not elf.startswith(b"\x7fELF"):
        raise RuntimeError("the kernel image's xz payload is not an ELF kernel")
    return elf


def build_image(target: Path, wheels: Path) -> None:
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    rootfs = partial / "rootfs"
    build_rootfs(rootfs, wheels)
    boot = rootfs / "boot"
    kernel = sorted(boot.glob("vmlinuz-*"))[-1]
    initrd = sorted(boot.glob("initrd.img-*"))[-1]
    # The uncompressed kernel boots through PVH: no decompressor to run.
    (partial / "vmlinux").write_bytes(uncompressed_kernel(kernel.read_bytes()))
    shutil.copy2(initrd, partial / "initrd.img")
    raw = partial / "root.ext4"
    subprocess.run(["mke2fs", "-q", "-t", "ext4", "-L", "pyrio-node", "-d", str(rootfs), str(raw), DISK_SIZE],
                   check=True)
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(partial / "root.qcow2")], check=True)
    raw.unlink()
    shutil.rmtree(rootfs)
    shutil.rmtree(partial / "hooks")
    partial.rename(target)


def ensure_image() -> GuestImage:
    """The cached image for the current inputs, built first when absent."""
    ensure_host_tools()
    image_dir = CACHE_ROOT / "images" / f"{image_key()}-{wheels_key()}"
    wheels_dir = CACHE_ROOT / "wheels" / wheels_key()
    with cache_lock():
        if not wheels_dir.is_dir():
            started = time.monotonic()
            log(f"downloading wheels into {wheels_dir}")
            build_wheels(wheels_dir)
            log(f"wheels ready in {time.monotonic() - started:.0f}s")
        if not image_dir.is_dir():
            started = time.monotonic()
            log(f"building the guest image into {image_dir} (cold: a few minutes)")
            build_image(image_dir, wheels_dir)
            log(f"image built in {time.monotonic() - started:.0f}s")
    return GuestImage(disk=image_dir / "root.qcow2", kernel=image_dir / "vmlinux",
                      initrd=image_dir / "initrd.img", wheels=wheels_dir)
