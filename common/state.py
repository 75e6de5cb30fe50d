"""Crash-safe state files.

Every record a service keeps lives in a file written atomically (temp file,
fsync, rename, fsync of the directory), so a SIGKILL at any instant leaves
either the old or the new content, never a torn file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator


# Directories of a service: only root may enter them. A layer or rootfs
# holds whatever an image brought (setuid-root programs, 0666 device nodes);
# reachable by a host user, each would be a local root exploit.
PRIVATE_DIR_MODE = 0o700
# The top state and run directories: traversable (so a socket's own mode
# decides who may dial it) but not listable, as containerd's 0711.
TRAVERSE_ONLY_DIR_MODE = 0o711


def private_dir(path: str | os.PathLike[str], mode: int = PRIVATE_DIR_MODE) -> Path:
    """Create `path` (parents too) or fix its mode if it exists, so a store
    made by an older, laxer version is closed at start. Parents this makes
    are traverse-only; existing parents are left as they are."""
    path = Path(path)
    missing: list[Path] = []
    current = path
    while not current.exists():
        missing.append(current)
        current = current.parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, TRAVERSE_ONLY_DIR_MODE)
        except FileExistsError:
            pass  # made by another service starting at the same time
    # chmod after mkdir: the umask may have taken bits, and an existing
    # directory keeps whatever mode it was made with.
    os.chmod(path, mode)
    for directory in missing[1:]:
        os.chmod(directory, TRAVERSE_ONLY_DIR_MODE)
    return path


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, mode: int = 0o600) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, mode)
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: str | os.PathLike[str], record: Any, mode: int = 0o600) -> None:
    atomic_write_bytes(path, json.dumps(record, sort_keys=True, indent=1).encode(), mode)


def read_json(path: str | os.PathLike[str], default: Any = None) -> Any:
    """Read a JSON state file; a missing file gives `default`."""
    try:
        with open(path, "rb") as handle:
            return json.load(handle)
    except FileNotFoundError:
        return default


def remove_file(path: str | os.PathLike[str]) -> bool:
    """Remove a state file durably; True when it existed."""
    path = Path(path)
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    fsync_dir(path.parent)
    return True


def iter_json_records(directory: str | os.PathLike[str], suffix: str = ".json") -> Iterator[tuple[str, Any]]:
    """Yield (stem, record) for every record file in a directory.

    Temp files of interrupted writes start with a dot and are skipped; a
    record that fails to parse is skipped too, because the atomic writer
    never produces one and a service must still start next to it.
    """
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return
    for name in names:
        if name.startswith(".") or not name.endswith(suffix):
            continue
        try:
            with open(os.path.join(directory, name), "rb") as handle:
                yield name[: -len(suffix)], json.load(handle)
        except (OSError, ValueError):
            continue


def remove_stale_temp_files(directory: str | os.PathLike[str]) -> int:
    """Remove leftovers of writes interrupted by a crash; returns how many."""
    removed = 0
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return 0
    for name in names:
        if name.startswith(".") and name.endswith(".tmp"):
            try:
                os.unlink(os.path.join(directory, name))
                removed += 1
            except FileNotFoundError:
                pass
    return removed
