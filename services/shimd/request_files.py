"""Reading a file that a request (or an image) names, safely.

A CRI request can name any path on the node (a seccomp Localhost profile, a
termination-message file...): /dev/zero, a FIFO with no writer, a directory
or a 20 GB file. Reading such a path naively makes shimd allocate without
bound, block forever, or, for some devices, act on open (a watchdog arms,
a tape rewinds). So the path is stat'ed before it is opened and refused
unless it is a regular file, opened without blocking, checked again on the
open descriptor (it may have been swapped between the two), and read only
up to a cap.
"""

from __future__ import annotations

import os
import stat

from common.errors import InvalidArgument, NotFound


def read_regular_file(path: str, limit: int, what: str, truncate: bool = False) -> bytes:
    """At most `limit` bytes of the regular file at `path` (symlinks followed).

    `what` names the field in errors, e.g. "seccomp Localhost profile".
    Raises NotFound when nothing is at `path`, InvalidArgument when it is not
    a regular file, cannot be read, or (unless `truncate`, which returns its
    first `limit` bytes instead) is larger than `limit`."""
    try:
        before = os.stat(path)
    except FileNotFoundError:
        raise NotFound(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise InvalidArgument(f"{what} {path} cannot be read: {exc.strerror}") from None
    _check_regular(before, path, None if truncate else limit, what)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as exc:
        raise InvalidArgument(f"{what} {path} cannot be read: {exc.strerror}") from None
    try:
        after = os.fstat(fd)
        if (after.st_dev, after.st_ino) != (before.st_dev, before.st_ino):
            raise InvalidArgument(f"{what} {path} changed while it was opened")
        _check_regular(after, path, None if truncate else limit, what)
        chunks, total = [], 0
        while total <= limit:
            chunk = os.read(fd, min(1 << 16, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    except OSError as exc:
        raise InvalidArgument(f"{what} {path} cannot be read: {exc.strerror}") from None
    finally:
        os.close(fd)
    if total > limit:
        if truncate:
            return b"".join(chunks)[:limit]
        raise InvalidArgument(f"{what} {path} is larger than the {limit}-byte limit")
    return b"".join(chunks)


def _check_regular(info: os.stat_result, path: str, limit: int | None, what: str) -> None:
    if not stat.S_ISREG(info.st_mode):
        raise InvalidArgument(f"{what} {path} is not a regular file ({_kind(info.st_mode)})")
    if limit is not None and info.st_size > limit:
        raise InvalidArgument(f"{what} {path} is {info.st_size} bytes, larger than the {limit}-byte limit")


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"
