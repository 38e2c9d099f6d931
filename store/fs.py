"""Every file operation the store's crash safety rests on, behind one small interface.

The store never calls os.* for these directly, so that tests can record the operations
(to build the states a crash could leave) or make any one of them fail (EIO, ENOSPC).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


class FileSystem:
    """The real one. Subclasses in tests record or fail operations."""

    def create(self, path: Path) -> int:
        """A new file opened for writing; an existing one is an error."""
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)

    def write(self, fd: int, data: memoryview) -> None:
        while len(data):
            data = data[os.write(fd, data):]

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def open_append(self, path: Path) -> int:
        """A file opened to append to, created if need be (its name then durable once its
        folder is fsynced)."""
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def fsync_file(self, path: Path) -> None:
        """Make the bytes of a file that another program wrote (and maybe never fsynced) durable."""
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def close(self, fd: int) -> None:
        os.close(fd)

    def mkdir(self, path: Path) -> None:
        os.mkdir(path)

    def rename(self, src: Path, dst: Path) -> None:
        """Atomic on POSIX: DST appears whole or not at all (durable once its folder is fsynced)."""
        os.rename(src, dst)

    def fsync_dir(self, path: Path) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def unlink(self, path: Path) -> None:
        """Remove a file if it is there (durable once its folder is fsynced)."""
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    def remove_tree(self, path: Path) -> None:
        shutil.rmtree(path, ignore_errors=True)

    def free_bytes(self, path: Path) -> int:
        return shutil.disk_usage(path).free


def write_new(fs: FileSystem, path: Path, data: bytes) -> None:
    """A new file at PATH, written and fsynced. Its name is the caller's to make durable:
    by renaming it and fsyncing the folder (`write_durably`), or by fsyncing the staging
    folder it is in before renaming that into place (for all its files at once)."""
    fd = fs.create(path)
    try:
        fs.write(fd, memoryview(data))
        fs.fsync(fd)
    finally:
        fs.close(fd)


def write_durably(fs: FileSystem, path: Path, data: bytes) -> None:
    """PATH holds DATA, whole, even after a crash: written beside it, fsynced, renamed
    over it, and its folder fsynced."""
    tmp = path.with_name(f".{path.name}.tmp")
    if tmp.exists():
        tmp.unlink()
    write_new(fs, tmp, data)
    fs.rename(tmp, path)
    fs.fsync_dir(path.parent)
