"""Safe, streaming extraction of one layer into its own directory.

Each layer becomes one overlayfs lower directory, so OCI whiteouts are
converted to what overlayfs understands: `.wh.name` becomes a 0/0 character
device `name`, and `.wh..wh..opq` sets `trusted.overlay.opaque=y` on its
directory. Ownership, modes, times, xattrs, links and device nodes are kept.

Nothing may land outside the layer directory: names that are absolute or
climb out with `..` are refused, no entry is ever written through a symlink
(every parent component is checked with lstat and files are opened with
O_NOFOLLOW), and hard links must point inside the layer. A refused entry
fails the whole layer with UnsafeLayer.

The decompressed stream is hashed while it is extracted, giving the diff id
that the image config promises; the compressed blob was already verified.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import logging
import os
import posixpath
import shutil
import stat
import tarfile
import zlib
from dataclasses import dataclass
from typing import BinaryIO, Callable

import zstandard

from common.errors import FailedPrecondition, InvalidArgument
from services.imaged.space import CHECK_EVERY_BYTES

log = logging.getLogger("pyrio.imaged.unpack")

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
OVERLAY_OPAQUE_XATTR = "trusted.overlay.opaque"
CHUNK_BYTES = 1 << 20
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


NAME_MAX = 255
PATH_MAX = 4096
SHOWN_NAME_CHARACTERS = 100
# What the kernel answers for an entry no file can be made of (a name or
# path too long, an xattr malformed or too big): the layer is wrong.
INVALID_ENTRY_ERRNOS = (errno.ENAMETOOLONG, errno.EINVAL, errno.ERANGE, errno.E2BIG)
# How often (in bytes of tar stream) an unpack looks at the free space left.
SPACE_CHECK_BYTES = CHECK_EVERY_BYTES


class UnsafeLayer(FailedPrecondition):
    """A layer entry that would write outside the layer directory."""


class LayerTooLarge(FailedPrecondition):
    """A layer that expands past image.max_layer_size (a decompression bomb)."""


@dataclass
class UnpackLimits:
    """What one layer may cost the node.

    max_bytes bounds the uncompressed tar stream, so every byte written
    (file data, headers) and every sparse file's apparent size; check_space
    raises when the store's filesystem reaches its reserve."""

    max_bytes: int
    check_space: Callable[[], None] = lambda: None


class _HashingReader:
    """A read-only stream that hashes and counts what passes through, and
    stops a stream that grows past the layer's bound."""

    def __init__(self, raw: BinaryIO, layer_digest: str, limits: UnpackLimits) -> None:
        self.raw = raw
        self.hasher = hashlib.sha256()
        self.size = 0
        self.layer_digest = layer_digest
        self.limits = limits
        self._next_space_check = SPACE_CHECK_BYTES

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(min(size, CHUNK_BYTES) if size >= 0 else CHUNK_BYTES)
        self.hasher.update(data)
        self.size += len(data)
        if self.size > self.limits.max_bytes:
            raise LayerTooLarge(
                f"layer {self.layer_digest} expands to more than {self.limits.max_bytes} bytes "
                "(image.max_layer_size); refusing it, nothing was stored"
            )
        if self.size >= self._next_space_check:
            self._next_space_check += SPACE_CHECK_BYTES
            self.limits.check_space()
        return data

    def drain(self) -> None:
        while self.read(CHUNK_BYTES):
            pass


def _decompressed(blob: BinaryIO) -> BinaryIO:
    """The tar stream inside a blob; the compression is read from the magic
    bytes, because media types on real registries are not always right."""
    magic = blob.read(4)
    blob.seek(0)
    if magic.startswith(GZIP_MAGIC):
        return gzip.GzipFile(fileobj=blob, mode="rb")  # type: ignore[return-value]
    if magic == ZSTD_MAGIC:
        return zstandard.ZstdDecompressor().stream_reader(blob, read_across_frames=True)  # type: ignore[return-value]
    return blob


def shown(name: str) -> str:
    """A layer entry's name for a message: cut, because a hostile one may be
    megabytes long."""
    if len(name) <= SHOWN_NAME_CHARACTERS:
        return repr(name)
    return f"{name[:SHOWN_NAME_CHARACTERS]!r}... ({len(name)} characters)"


def clean_name(name: str, layer_digest: str) -> str:
    """The entry's path relative to the layer root ("" for the root itself)."""
    if name.startswith("/"):
        raise UnsafeLayer(f"layer {layer_digest}: entry {shown(name)} has an absolute path; refusing the layer")
    normalised = posixpath.normpath(name)
    if normalised == ".":
        return ""
    if normalised == ".." or normalised.startswith("../"):
        raise UnsafeLayer(f"layer {layer_digest}: entry {shown(name)} points outside the layer; refusing the layer")
    longest = max(len(part.encode("utf-8", "surrogateescape")) for part in normalised.split("/"))
    if longest > NAME_MAX:
        raise InvalidLayer(
            f"layer {layer_digest}: entry {shown(name)} has a name component of {longest} bytes, more than the "
            f"{NAME_MAX} a Linux file name may have; refusing the layer"
        )
    return normalised


class InvalidLayer(InvalidArgument):
    """A layer entry no filesystem can take as given (a malformed sparse map,
    xattr or name): the image is wrong, not the node."""


class LayerExtractor:
    def __init__(self, root: str, layer_digest: str, max_bytes: int) -> None:
        self.root = root
        self.layer_digest = layer_digest
        self.max_bytes = max_bytes
        self._dir_times: list[tuple[str, float]] = []

    def _path(self, relative: str) -> str:
        return os.path.join(self.root, relative) if relative else self.root

    def _safe_parent(self, relative: str, entry_name: str) -> str:
        """Create missing parents; refuse any parent that is a symlink."""
        current = self.root
        parts = relative.split("/")[:-1]
        for part in parts:
            current = os.path.join(current, part)
            try:
                info = os.lstat(current)
            except FileNotFoundError:
                os.mkdir(current, 0o755)
                continue
            if stat.S_ISLNK(info.st_mode):
                raise UnsafeLayer(
                    f"layer {self.layer_digest}: entry {shown(entry_name)} would be written through the symlink "
                    f"{os.path.relpath(current, self.root)!r}; refusing the layer"
                )
            if not stat.S_ISDIR(info.st_mode):
                os.unlink(current)
                os.mkdir(current, 0o755)
        return self._path(relative)

    @staticmethod
    def _remove(path: str, keep_directory: bool = False) -> None:
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(info.st_mode):
            if keep_directory:
                return
            shutil.rmtree(path)
        else:
            os.unlink(path)

    def _apply_metadata(self, path: str, member: tarfile.TarInfo) -> None:
        os.lchown(path, member.uid, member.gid)
        if not member.issym():
            # After chown: chown clears set-id bits the mode may carry.
            os.chmod(path, stat.S_IMODE(member.mode))
        for key, value in member.pax_headers.items():
            if not key.startswith("SCHILY.xattr."):
                continue
            name = key[len("SCHILY.xattr."):]
            if name.startswith("trusted.overlay."):
                # An image must not forge overlayfs metadata (redirects, opaque flags).
                log.warning("dropping xattr %s of %s in layer %s", name, member.name, self.layer_digest)
                continue
            try:
                os.setxattr(path, name, value.encode("utf-8", "surrogateescape"), follow_symlinks=False)
            except OSError as exc:
                if exc.errno in INVALID_ENTRY_ERRNOS:
                    raise InvalidLayer(
                        f"layer {self.layer_digest}: entry {shown(member.name)} has an xattr {shown(name)} the kernel "
                        f"refuses ({exc.strerror}); refusing the layer"
                    ) from None
                if exc.errno not in (errno.ENOTSUP, errno.EPERM, errno.EOPNOTSUPP):
                    raise
                log.warning("cannot set xattr %s on %s: %s", name, member.name, exc)
        if not member.issym():
            os.utime(path, (member.mtime, member.mtime), follow_symlinks=False)

    def _whiteout(self, relative: str, base: str, member: tarfile.TarInfo) -> None:
        parent_relative = posixpath.dirname(relative)
        if base == OPAQUE_MARKER:
            if parent_relative:
                # Checks and creates every component of the directory itself.
                directory = os.path.dirname(self._safe_parent(f"{parent_relative}/{OPAQUE_MARKER}", member.name))
                os.setxattr(directory, OVERLAY_OPAQUE_XATTR, b"y", follow_symlinks=False)
            return
        hidden = base[len(WHITEOUT_PREFIX):]
        if not hidden or hidden in (".", ".."):
            raise UnsafeLayer(f"layer {self.layer_digest}: malformed whiteout {shown(member.name)}")
        target = self._safe_parent(posixpath.join(parent_relative, hidden), member.name)
        self._remove(target)
        os.mknod(target, stat.S_IFCHR | 0o000, os.makedev(0, 0))

    def extract_checked(self, member: tarfile.TarInfo, tar: tarfile.TarFile) -> None:
        """extract_member, with what the kernel refuses to make of the entry
        told as the layer's fault (not a failure of the node)."""
        clean_name(member.name, self.layer_digest)  # its own refusals first
        if len(self.root) + 1 + len(member.name.encode("utf-8", "surrogateescape")) >= PATH_MAX:
            raise InvalidLayer(
                f"layer {self.layer_digest}: entry {shown(member.name)} has a path of {len(member.name)} characters, "
                f"too long to unpack (PATH_MAX is {PATH_MAX} bytes); refusing the layer"
            )
        try:
            self.extract_member(member, tar)
        except OSError as exc:
            if exc.errno not in INVALID_ENTRY_ERRNOS:
                raise
            raise InvalidLayer(
                f"layer {self.layer_digest}: entry {shown(member.name)} cannot be unpacked ({exc.strerror}); "
                "refusing the layer"
            ) from None

    def extract_member(self, member: tarfile.TarInfo, tar: tarfile.TarFile) -> None:
        relative = clean_name(member.name, self.layer_digest)
        if not relative:
            return  # the layer root itself: its directory is ours
        base = posixpath.basename(relative)
        if base.startswith(WHITEOUT_PREFIX):
            self._whiteout(relative, base, member)
            return
        path = self._safe_parent(relative, member.name)
        if member.isdir():
            self._remove(path, keep_directory=True)
            if not os.path.isdir(path) or os.path.islink(path):
                os.mkdir(path, 0o755)
            self._apply_metadata(path, member)
            self._dir_times.append((path, member.mtime))
            return
        self._remove(path)
        if member.isreg():
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            with os.fdopen(descriptor, "wb") as output:
                if member.sparse is not None:
                    self._write_sparse(member, tar, output)
                else:
                    source = tar.extractfile(member)
                    assert source is not None
                    while chunk := source.read(CHUNK_BYTES):
                        output.write(chunk)
        elif member.issym():
            os.symlink(member.linkname, path)
        elif member.islnk():
            target_relative = clean_name(member.linkname, self.layer_digest)
            if not target_relative:
                raise UnsafeLayer(f"layer {self.layer_digest}: hard link {shown(member.name)} points at the layer root")
            target = self._safe_parent(target_relative, member.name)
            if not os.path.lexists(target):
                raise UnsafeLayer(
                    f"layer {self.layer_digest}: hard link {shown(member.name)} -> {shown(member.linkname)}: "
                    "the target is not in this layer; refusing the layer"
                )
            os.link(target, path, follow_symlinks=False)
            return  # a hard link shares its target's inode and metadata
        elif member.ischr() or member.isblk():
            kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
            os.mknod(path, kind | stat.S_IMODE(member.mode), os.makedev(member.devmajor, member.devminor))
        elif member.isfifo():
            os.mkfifo(path, stat.S_IMODE(member.mode))
        else:
            log.warning("skipping entry %s of unsupported type %r in layer %s", member.name, member.type, self.layer_digest)
            return
        self._apply_metadata(path, member)

    def _write_sparse(self, member: tarfile.TarInfo, tar: tarfile.TarFile, output: BinaryIO) -> None:
        """Write a sparse member's data segments where they go and leave its
        holes as holes: a few hundred bytes of tar may describe gigabytes
        of zeros, which must cost no disk."""
        if member.size > self.max_bytes:
            raise LayerTooLarge(
                f"layer {self.layer_digest}: sparse file {shown(member.name)} is {member.size} bytes, more than the "
                f"{self.max_bytes} a layer may expand to (image.max_layer_size); refusing it, nothing was stored"
            )
        end = 0
        for offset, length in member.sparse or []:
            if offset < end or length < 0 or offset + length > member.size:
                raise InvalidLayer(
                    f"layer {self.layer_digest}: sparse file {shown(member.name)} has a malformed sparse map; "
                    "refusing the layer"
                )
            end = offset + length
        # The segments' data lie one after another in the archive.
        stream = tar.fileobj
        assert stream is not None
        stream.seek(member.offset_data)
        for offset, length in member.sparse or []:
            output.seek(offset)
            while length > 0:
                chunk = stream.read(min(length, CHUNK_BYTES))
                if not chunk:
                    raise InvalidLayer(f"layer {self.layer_digest}: sparse file {shown(member.name)} is truncated")
                output.write(chunk)
                length -= len(chunk)
        output.truncate(member.size)

    def finish(self) -> None:
        # Directory times last: creating entries inside changed them.
        for path, mtime in reversed(self._dir_times):
            os.utime(path, (mtime, mtime), follow_symlinks=False)


def unpack_layer(blob_path: str, target_dir: str, layer_digest: str, limits: UnpackLimits) -> tuple[str, int]:
    """Extract the layer blob at `blob_path` into the empty `target_dir`.

    Returns (diff id, size of the uncompressed tar)."""
    extractor = LayerExtractor(target_dir, layer_digest, limits.max_bytes)
    with open(blob_path, "rb") as blob:
        stream = _HashingReader(_decompressed(blob), layer_digest, limits)
        try:
            with tarfile.open(fileobj=stream, mode="r|", errorlevel=2) as tar:  # type: ignore[call-overload]
                for member in tar:
                    extractor.extract_checked(member, tar)
            stream.drain()  # the tar's end padding counts in the diff id
        except (tarfile.TarError, EOFError, OSError, zlib.error, zstandard.ZstdError) as exc:
            if isinstance(exc, OSError) and exc.errno not in (None, 0) and not isinstance(exc, gzip.BadGzipFile):
                raise
            raise FailedPrecondition(f"layer {layer_digest} is not a valid (compressed) tar archive: {exc}") from None
    extractor.finish()
    return f"sha256:{stream.hasher.hexdigest()}", stream.size
